"""A tiny, randomly initialised Qwen2.5-VL that runs on a CPU and loads like the real one.

`--model tiny` everywhere a model is accepted resolves to `tiny_model_path()`: a normal
checkpoint directory (config.json, model.safetensors, tokenizer, processor, chat template)
that transformers and vLLM load with from_pretrained. It has the real Qwen2.5 tokenizer and
vocabulary size, and the real architecture at toy width, so every code path (3-D rotary
positions, windowed vision attention, patch merging, LoRA targets, weight names) is the one a
7B model takes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from data.cache import build_once, cache_root
from models.tokenizer import SPECIAL_TOKENS, VOCAB_SIZE, build_qwen25_tokenizer
from models.tokenizer_cache import load_tokenizer

TINY_VERSION = 1  # bump when the build changes, so stale caches are not reused
SHAPED_BUILD = 2  # the same for the real-shaped checkpoints (2: weights drawn once)


@dataclass(frozen=True)
class TinySpec:
    """Sizes of the tiny model. head_dim = hidden / heads; mrope_section sums to head_dim / 2."""

    hidden_size: int = 64
    num_layers: int = 2
    # head_dim 32: vLLM's CPU attention kernels have no head size below 32
    num_heads: int = 2
    num_kv_heads: int = 1
    intermediate_size: int = 128
    mrope_section: tuple[int, int, int] = (4, 6, 6)
    vision_hidden_size: int = 32
    vision_depth: int = 2
    vision_heads: int = 2
    vision_intermediate_size: int = 64
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    # Std of the (tied) token embeddings; None: initializer_range. At 0.02 every logit of a
    # 64-wide model stays within ~±1, so no token can ever get much probability: a policy
    # that must learn to prefer some tokens needs larger embeddings (the learning test).
    embedding_std: float | None = None


def tiny_config(spec: TinySpec):  # -> Qwen2_5_VLConfig
    from transformers import Qwen2_5_VLConfig

    text = {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "initializer_range": spec.initializer_range,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1e6,
            "mrope_section": list(spec.mrope_section),
        },
        "tie_word_embeddings": spec.tie_word_embeddings,
        "bos_token_id": SPECIAL_TOKENS["<|endoftext|>"],
        "eos_token_id": SPECIAL_TOKENS["<|im_end|>"],
        "pad_token_id": SPECIAL_TOKENS["<|endoftext|>"],
    }
    vision = {
        "depth": spec.vision_depth,
        "hidden_size": spec.vision_hidden_size,
        "num_heads": spec.vision_heads,
        "intermediate_size": spec.vision_intermediate_size,
        "out_hidden_size": spec.hidden_size,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [spec.vision_depth - 1],
        "tokens_per_second": 2,
        "initializer_range": spec.initializer_range,
    }
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=SPECIAL_TOKENS["<|image_pad|>"],
        video_token_id=SPECIAL_TOKENS["<|video_pad|>"],
        vision_start_token_id=SPECIAL_TOKENS["<|vision_start|>"],
        vision_end_token_id=SPECIAL_TOKENS["<|vision_end|>"],
        tie_word_embeddings=spec.tie_word_embeddings,
    )


def tokenizer_path() -> Path:
    """The offline-built Qwen2.5 tokenizer directory (built once, ~10 s)."""
    return build_once(cache_root() / f"qwen2.5-tokenizer-v{TINY_VERSION}", build_qwen25_tokenizer)


def _write_tiny_checkpoint(out_dir: Path, spec: TinySpec, seed: int) -> None:
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    from models.processor import build_processor

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_config(spec)).to(torch.float32)
    if spec.embedding_std is not None:
        with torch.no_grad():
            model.get_input_embeddings().weight.normal_(0.0, spec.embedding_std)
    model.generation_config = GenerationConfig(
        eos_token_id=[SPECIAL_TOKENS["<|im_end|>"], SPECIAL_TOKENS["<|endoftext|>"]],
        pad_token_id=SPECIAL_TOKENS["<|endoftext|>"],
    )
    model.save_pretrained(out_dir)
    tokenizer = load_tokenizer(tokenizer_path())
    build_processor(tokenizer).save_pretrained(out_dir)
    (out_dir / "tiny_spec.json").write_text(json.dumps({**asdict(spec), "seed": seed}, indent=1))


def is_text_only(published: dict[str, Any]) -> bool:
    """Whether a published config.json is a text-only Qwen2.5 (model_type "qwen2")."""
    return published.get("model_type") == "qwen2"


def shaped_config(published: dict[str, Any], text_layers: int, vision_layers: int):
    """The config of a published config.json with only the layer counts cut: Qwen2Config for a
    text-only Qwen2.5 (`vision_layers` must be 0), Qwen2_5_VLConfig for a Qwen2.5-VL.

    Every width, head count, head_dim, rope setting, vocabulary size and tie setting stays as
    published; a vision tower keeps one windowed block and ends on a full-attention one (the
    published towers interleave them), so both attention paths run.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2Config

    config = json.loads(json.dumps(published))  # a deep copy: the caller's dict stays as given
    config["num_hidden_layers"] = text_layers
    config["pad_token_id"] = SPECIAL_TOKENS["<|endoftext|>"]
    if is_text_only(published):
        if vision_layers:
            raise ValueError(f"vision_layers={vision_layers}: a text-only config has no tower")
        return Qwen2Config.from_dict(config)
    vision = config["vision_config"]
    vision["depth"] = vision_layers
    vision["fullatt_block_indexes"] = [vision_layers - 1]
    return Qwen2_5_VLConfig.from_dict(config)


def fill_random(model: torch.nn.Module, std: float, seed: int) -> None:
    """Every parameter drawn once, as transformers initialises these models: normalisation
    weights 1, biases 0, every other weight N(0, std^2). Tied weights are one parameter,
    drawn once."""
    generator = torch.Generator().manual_seed(seed)
    norms = {id(p) for m in model.modules() if "Norm" in type(m).__name__ for p in m.parameters()}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif id(param) in norms:
                param.fill_(1.0)
            else:
                param.normal_(0.0, std, generator=generator)


def _write_shaped_checkpoint(
    out_dir: Path, published: dict[str, Any], text_layers: int, vision_layers: int, dtype: str
) -> None:
    from transformers import (
        GenerationConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2ForCausalLM,
    )

    from models.processor import build_processor

    config = shaped_config(published, text_layers, vision_layers)
    text_only = is_text_only(published)
    architecture = Qwen2ForCausalLM if text_only else Qwen2_5_VLForConditionalGeneration
    # built directly in the target dtype (a 72B-wide model in float32 would need twice the
    # RAM), on the meta device and then filled once: transformers' own construction draws
    # every weight two or three times over (torch's default init, then its own)
    with torch.device("meta"):
        model = architecture._from_config(config, dtype=getattr(torch, dtype))
    model.to_empty(device="cpu")
    model.tie_weights()  # to_empty gives each module its own tensor, a tied pair included
    text = getattr(config, "text_config", config)
    fill_random(model, text.initializer_range, seed=0)
    model.generation_config = GenerationConfig(
        eos_token_id=[SPECIAL_TOKENS["<|im_end|>"], SPECIAL_TOKENS["<|endoftext|>"]],
        pad_token_id=SPECIAL_TOKENS["<|endoftext|>"],
    )
    model.save_pretrained(out_dir)
    del model
    tokenizer = load_tokenizer(tokenizer_path())
    if text_only:
        tokenizer.save_pretrained(out_dir)
    else:
        build_processor(tokenizer).save_pretrained(out_dir)


def shaped_model_path(
    published: dict[str, Any], text_layers: int = 1, vision_layers: int = 2, dtype: str = "float32"
) -> Path:
    """A cached checkpoint with a real model's shapes (`published`: its config.json as a dict,
    Qwen2.5-VL or text-only Qwen2.5 with vision_layers=0), `text_layers` / `vision_layers`
    deep, random weights (the config's initializer_range, 0.02: logits stay finite and
    near-uniform), the offline Qwen2.5 tokenizer (and processor for Qwen2.5-VL).
    """
    blob = json.dumps([published, text_layers, vision_layers, dtype, SHAPED_BUILD], sort_keys=True)
    key = hashlib.sha1(blob.encode()).hexdigest()[:8]
    kind = "qwen2.5" if is_text_only(published) else "qwen2.5-vl"
    target = cache_root() / f"shaped-{kind}-v{TINY_VERSION}-{key}"
    return build_once(
        target,
        lambda out: _write_shaped_checkpoint(out, published, text_layers, vision_layers, dtype),
    )


def tiny_model_path(seed: int = 0, spec: TinySpec | None = None) -> Path:
    """Path of the tiny checkpoint for `seed` and `spec`, built and cached on first use.

    Deterministic: the same seed and spec give the same weights on every machine.
    """
    spec = spec or TinySpec()
    key = hashlib.sha1(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()[:8]
    target = cache_root() / f"tiny-qwen2.5-vl-v{TINY_VERSION}-{key}-seed{seed}"
    return build_once(target, lambda out: _write_tiny_checkpoint(out, spec, seed))
