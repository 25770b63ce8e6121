"""Tiny random text-only causal LMs for the text-model tests, built offline and cached.

- "llama": LlamaForCausalLM with SmolLM2's tokenizer (49,152 tokens, <|im_start|>/<|im_end|>
  chat template, pad <|endoftext|>) and tied embeddings, as SmolLM2 itself;
- "qwen2": Qwen2ForCausalLM with the offline Qwen2.5 tokenizer (151,936 rows) and an untied
  lm_head, so both ways of holding the output projection are covered.

Both have hidden 64 and 2 heads: head_dim 32, the smallest vLLM's CPU attention kernels take.
"""

from __future__ import annotations

from pathlib import Path

import torch

import models  # noqa: F401  (first: lets torchvision import beside CPU torch)
from data.cache import build_once, cache_root

TEXT_FAMILIES = ("llama", "qwen2")
TEXT_TINY_VERSION = 1


def _tokenizer(family: str):  # -> PreTrainedTokenizerBase
    from transformers import AutoTokenizer

    if family == "llama":
        from models.smollm2 import smollm2_model_path

        return AutoTokenizer.from_pretrained(smollm2_model_path())
    from models.tiny import tokenizer_path

    return AutoTokenizer.from_pretrained(tokenizer_path())


def _config(family: str, tokenizer):  # -> PretrainedConfig
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
    )
    if family == "llama":
        return LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=True, **common)
    return Qwen2Config(vocab_size=151936, tie_word_embeddings=False, **common)


def _write(out_dir: Path, family: str) -> None:
    from transformers import AutoModelForCausalLM, GenerationConfig

    tokenizer = _tokenizer(family)
    config = _config(family, tokenizer)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    with torch.no_grad():  # larger embeddings: logits spread beyond ±1, distributions not flat
        model.get_input_embeddings().weight.normal_(0.0, 1.0)
    model.generation_config = GenerationConfig(
        eos_token_id=[config.eos_token_id], pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def tiny_text_model_path(family: str) -> Path:
    """The cached tiny checkpoint of `family` ("llama" or "qwen2")."""
    if family not in TEXT_FAMILIES:
        raise ValueError(f"family must be one of {TEXT_FAMILIES}, got {family!r}")
    target = cache_root() / f"tiny-text-{family}-v{TEXT_TINY_VERSION}"
    return build_once(target, lambda out: _write(out, family))
