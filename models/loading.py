"""Load a policy model: Qwen2.5-VL or any text-only causal LM, chosen from the checkpoint's
config; dtype policy, attention kernel choice, LoRA, checkpointing."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import models.cpu_compat  # noqa: F401  (must precede transformers' image code)
from models.cpu_half import upcast_half_linears
from models.tiny import tiny_model_path

# LoRA on the language model only: the projection names below also exist in the vision
# tower's blocks, so the match is anchored on `language_model`.
LM_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
VISION_LORA_TARGETS = r".*visual\.blocks.*\.(qkv|proj|gate_proj|up_proj|down_proj)"
# A text-only causal LM (Llama, Qwen2, ...): every attention/MLP projection of the whole model.
TEXT_LORA_TARGETS = r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
VISION_LANGUAGE_TYPES = ("qwen2_5_vl",)  # config.model_type of the checkpoints with images


class ModelLoadError(RuntimeError):
    """A model cannot be loaded as asked (missing path, unmet attention request, ...)."""


@dataclass(frozen=True)
class LoraSettings:
    r: int = 8
    alpha: int = 32
    dropout: float = 0.05
    train_vision: bool = False  # also adapt the vision tower (then its features are not cached)


def resolve_model_path(name: str) -> str:
    """'tiny' -> the cached tiny checkpoint, 'smollm2' -> the converted SmolLM2-135M-Instruct;
    an existing directory or a hub id as given."""
    if name == "tiny":
        return str(tiny_model_path())
    if name == "smollm2":
        from models.smollm2 import smollm2_model_path

        return str(smollm2_model_path())
    if name.startswith(("/", ".", "~")) and not Path(name).expanduser().is_dir():
        raise ModelLoadError(f"model directory not found: {name}")
    return str(Path(name).expanduser()) if Path(name).expanduser().is_dir() else name


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (what Qwen2.5-VL is trained in); float32 on CPU, where bf16 is slow."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def choose_attention(
    device: torch.device, requested: str | None, dtype: torch.dtype | None = None
) -> str:
    """flash_attention_2 when CUDA and flash_attn are present and the weights are 16-bit (its
    kernels take only fp16/bf16; full fine-tuning keeps float32 weights), sdpa otherwise.

    An explicit request that cannot be met is an error rather than a silent fallback: the
    user asked for a kernel and would otherwise benchmark or train with another one.
    """
    has_flash = device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
    sixteen_bit = dtype is None or dtype in (torch.bfloat16, torch.float16)
    if requested in (None, "auto"):
        return "flash_attention_2" if has_flash and sixteen_bit else "sdpa"
    if requested == "flash_attention_2" and not has_flash:
        why = "CUDA is not available" if device.type != "cuda" else "flash_attn is not installed"
        raise ModelLoadError(
            f"attn_implementation='flash_attention_2' was requested but {why}; "
            "install flash-attn on a CUDA machine (pip install '.[gpu]') or use 'sdpa'"
        )
    if requested == "flash_attention_2" and not sixteen_bit:
        raise ModelLoadError(
            f"attn_implementation='flash_attention_2' needs bfloat16/float16 weights, these are "
            f"{dtype}; use 'sdpa'"
        )
    return requested


def is_vision_language(path: str) -> bool:
    """Whether the checkpoint at `path` is a Qwen2.5-VL (images) rather than a text-only LM."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    architectures = getattr(config, "architectures", None) or []
    return config.model_type in VISION_LANGUAGE_TYPES or any(
        "Qwen2_5_VL" in name for name in architectures
    )


def load_base_model(
    name: str,
    device: torch.device,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
) -> Any:
    """Qwen2_5_VLForConditionalGeneration, or AutoModelForCausalLM for a text-only checkpoint,
    from a local path or hub id, on `device`."""
    from transformers import AutoModelForCausalLM, Qwen2_5_VLForConditionalGeneration

    path = resolve_model_path(name)
    dtype = dtype or default_dtype(device)
    attention = choose_attention(device, attn_implementation, dtype)
    kind = Qwen2_5_VLForConditionalGeneration if is_vision_language(path) else AutoModelForCausalLM
    model = kind.from_pretrained(path, dtype=dtype, attn_implementation=attention).to(device)
    upcast_half_linears(model)  # bf16 on a CPU without bf16 kernels: float32 products
    return model


def add_lora(
    model: Any, lora: LoraSettings, gradient_checkpointing: bool = False, vision: bool = True
) -> Any:
    """Wrap `model` with a peft LoRA adapter; only adapter weights stay trainable.

    vision False: a text-only LM, adapted on every projection (it has no vision tower)."""
    from peft import LoraConfig, get_peft_model

    targets = LM_LORA_TARGETS if vision else TEXT_LORA_TARGETS
    if lora.train_vision and not vision:
        raise ModelLoadError("lora_vision was asked for, but the model has no vision tower")
    if lora.train_vision:
        targets = f"({LM_LORA_TARGETS})|({VISION_LORA_TARGETS})"
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        bias="none",
    )
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # frozen embeddings: checkpointed blocks need an input that requires grad
        model.enable_input_require_grads()
    return get_peft_model(model, config)
