"""Full fine-tuning: every language-model weight trained, a frozen copy of the base as reference.

Which weights train. The language model's: token embeddings, every decoder block, the final
norm and the LM head (tied to the embeddings in the small Qwen models; a tied pair is one
Parameter, so it stays tied and is updated once). The vision tower stays frozen unless asked
(`lora_vision`, the flag that also adds LoRA to it in LoRA mode): a frozen tower means each
prompt's image features are computed once per step and shared by its G rows.

The reference. With LoRA the reference is the same model with its adapter switched off; a
fully fine-tuned model has no such switch, so the base is kept as a second, frozen copy:
`frozen_copy`, made before the first update and only when the loss needs it (beta > 0). It
costs the weights once more (no gradients, no optimizer state).

Checkpoints. `save_full` writes the model with transformers' own `save_pretrained` (safetensors,
config.json, generation_config.json, the checkpoint's original tensor names) and the processor
or tokenizer beside it: a directory that transformers' from_pretrained and vLLM load like the
original model. `load_full_weights` reads such a directory back into a live model (resume).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

VISION_MARKER = ".visual."  # in the names of Qwen2.5-VL's vision-tower parameters


def is_vision_parameter(name: str) -> bool:
    return VISION_MARKER in f".{name}"


def make_fully_trainable(model: nn.Module, train_vision: bool) -> list[str]:
    """requires_grad on every language-model parameter (and the vision tower's with
    `train_vision`), off elsewhere. Returns the names of the trained parameters."""
    trained = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(train_vision or not is_vision_parameter(name))
        if parameter.requires_grad:
            trained.append(name)
    return trained


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` with gradients off, in eval mode: the reference policy."""
    reference = copy.deepcopy(model)
    reference.requires_grad_(False)
    return reference.eval()


def changed_weights(model: nn.Module, names: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(in-memory name, tensor) of the parameters called `names` (the trained ones): what a
    full-weight sync pushes, whether `model` is the trained model or its frozen reference.

    A tied LM head is the embedding Parameter under a second name, and it is sent under both:
    the engine re-runs its post-load processing (on CPU a repacked copy of the matrix) only for
    the layers a reload names, so a head left out keeps computing with the old weights. Lazy:
    nothing is copied."""
    trained = {id(p) for name, p in model.named_parameters() if name in names}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in trained:
            yield name, tensor.detach()


@contextmanager
def checkpointing_active(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Let transformers' gradient checkpointing run inside the block.

    Its decoder layers recompute activations only when `module.training` is set, and the policy
    stays in eval mode for good (no dropout: the trained policy must be the sampled one). So
    for the block only the checkpointing layers themselves are flagged as training; their
    submodules (attention, dropout) keep eval behaviour.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [
        m
        for m in model.modules()
        if enabled and isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing
    ]
    flags = [m.training for m in layers]
    for m in layers:
        m.training = True
    try:
        yield
    finally:
        for m, flag in zip(layers, flags, strict=True):
            m.training = flag


def save_full(policy: Any, directory: Path) -> None:
    """The policy's whole model as a transformers directory (module docstring)."""
    from models.export import save_processor

    directory.mkdir(parents=True, exist_ok=True)
    policy.model.save_pretrained(directory)
    save_processor(policy, directory)


def load_full_weights(model: nn.Module, directory: Path) -> None:
    """Copy the weights saved by `save_full` in `directory` into `model`, in place.

    The directory is read by transformers' own loader (which maps the stored names back to the
    in-memory ones), so the weights pass through a second model for a moment. A model of
    another shape is an error naming the checkpoint and the first tensors that differ.
    """
    from models.loading import load_base_model

    where = directory.parent
    dtype = next(model.parameters()).dtype
    saved = load_base_model(str(directory), torch.device("cpu"), dtype).state_dict()
    ours = model.state_dict()
    problems = [f"{k}: missing in the checkpoint" for k in ours if k not in saved]
    problems += [f"{k}: not in this model" for k in saved if k not in ours]
    problems += [
        f"{k}: checkpoint {tuple(saved[k].shape)}, model {tuple(v.shape)}"
        for k, v in ours.items()
        if k in saved and saved[k].shape != v.shape
    ]
    if problems:
        raise RuntimeError(
            f"{where}: the model weights do not fit this model (was it trained from another "
            f"base model?): {'; '.join(problems[:3])}"
        )
    with torch.no_grad():
        for name, tensor in ours.items():
            tensor.copy_(saved[name])
