"""FSDP2 for our policies: which modules become sharding units, and the root unit whose hooks
our lean forwards go through.

`shard_model(model, mesh, settings)` calls `torch.distributed.fsdp.fully_shard` bottom-up:

- every decoder layer of the language model, and every block of the vision tower, is one unit
  (its parameters all-gathered in one collective before its forward, freed after it, and its
  gradients reduce-scattered in one collective after its backward);
- everything else (token embeddings, final norm, LM head, the vision patch embedding and
  merger, and the LoRA-free rest) belongs to one root unit, `RootUnit`. Tied embeddings
  (embed_tokens.weight is lm_head.weight, as in SmolLM2 and Qwen2.5-VL-3B) thereby stay in one
  unit: a parameter can be sharded only once.

Why a root module of our own: the log-prob pass (models/logprobs.py) calls the backbone and reads
`lm_head.weight` for chunked projections; it never calls the HF model's `forward`, so hooks on
the HF model would not fire and the root parameters would stay sharded. `RootUnit.forward(step,
*args)` runs `step(model, *args)` inside the root unit's pre/post-forward hooks instead: the root
parameters are gathered for the whole step (embeddings, every chunk of the LM head) and its
outputs, plain tensors, carry the pre-backward hook that gathers them again for the backward.
Every forward through the policy (log-probs, reference log-probs, image features, sampling)
goes through it.

Gradients: FSDP2 reduce-scatters each unit's gradient as a mean over the ranks (it divides by
the world size), which is what grpo.trainer.average_gradients does for unsharded runs; the
trainer skips its own all-reduce when the policy is sharded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from grpo.types import ShardSettings
from models.logprobs import unwrap


class RootUnit(nn.Module):
    """The root FSDP unit: owns every parameter outside the blocks; `forward(step, ...)` runs
    `step(model, ...)` with them gathered."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, step: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return step(self.model, *args, **kwargs)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of the model: the vision tower's, then the language model's layers.

    Qwen2.5-VL: model.visual.blocks and model.language_model.layers; a text-only causal LM
    (Llama, Qwen2): model.layers."""
    inner = unwrap(model).model
    blocks: list[nn.Module] = []
    if hasattr(inner, "visual"):
        blocks.extend(inner.visual.blocks)
    decoder = inner.language_model if hasattr(inner, "language_model") else inner
    if not hasattr(decoder, "layers"):
        raise NotImplementedError(f"--fsdp: no decoder layers found in {type(inner).__name__}")
    blocks.extend(decoder.layers)
    return blocks


def fsdp_policies(settings: ShardSettings) -> dict[str, Any]:
    """fully_shard's mixed-precision and offload arguments for `settings`."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

    precision = MixedPrecisionPolicy(
        param_dtype=settings.param_dtype, reduce_dtype=settings.reduce_dtype
    )
    offload = CPUOffloadPolicy(pin_memory=True) if settings.cpu_offload else OffloadPolicy()
    return {"mp_policy": precision, "offload_policy": offload}


def shard_model(model: nn.Module, mesh: Any, settings: ShardSettings) -> RootUnit:
    """Shard `model` (a peft model or a plain HF one) in place: one unit per block, the rest
    in the returned root unit. The model's parameters are DTensors (Shard(0)) afterwards."""
    from torch.distributed.fsdp import fully_shard

    policies = fsdp_policies(settings)
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, **policies)
    root = RootUnit(model)
    # the root's parameters are freed after forward too: the reference pass has no backward
    # to free them, and the LM head + embeddings are the largest matrices of a small model
    fully_shard(root, mesh=mesh, reshard_after_forward=True, **policies)
    return root


def unit_prefixes(root: RootUnit) -> dict[nn.Module, str]:
    """Each block unit's module name inside the (peft) model."""
    from torch.distributed.fsdp import FSDPModule

    return {m: name for name, m in root.model.named_modules() if isinstance(m, FSDPModule)}


def gathered_units(
    root: RootUnit, wanted: Callable[[str | None], bool] = lambda name: True
) -> Iterator[tuple[str | None, nn.Module]]:
    """(block name inside the model, block), each block unsharded while the caller holds it
    and resharded before the next one is gathered; then (None, root) with the root's own
    parameters gathered. At most one unit's full parameters exist at a time. Units for which
    `wanted(name)` is False are skipped (not gathered); it must answer alike on every rank."""
    for unit, name in unit_prefixes(root).items():
        if not wanted(name):
            continue
        unit.unshard()
        try:
            yield name, unit
        finally:
            unit.reshard()
    if not wanted(None):
        return
    root.unshard()
    try:
        yield None, root
    finally:
        root.reshard()


def is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def gathered_state(root: RootUnit, trained_only: bool = True) -> dict[str, torch.Tensor]:
    """The trainable parameters (or, trained_only False, the whole state) as full CPU tensors
    on rank 0 ({} on the others), named as in the wrapped (peft or HF) model: a collective.

    Fine for an adapter. For full fine-tuning this holds the whole model in rank 0's host
    memory (a 72B bf16 model: ~145 GB): the resumable state never goes this way
    (torch.distributed.checkpoint saves it sharded), only the consolidated export does.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=trained_only
    )
    state = get_model_state_dict(root, options=options)  # names start with "model."
    if trained_only:  # a tied frozen weight (lm_head = embed_tokens) can slip through
        trained = {name for name, p in root.named_parameters() if p.requires_grad}
        state = {n: t for n, t in state.items() if n in trained}
    # clone: on one rank the "gathered" tensors can be the parameters themselves
    return {n.removeprefix("model."): t.clone() for n, t in state.items()}


def sharded_sync_batches(
    root: RootUnit, full_names: set[str] | None
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """What a weight sync pushes, one FSDP unit at a time: each list holds one unit's tensors
    (in-memory names) while that unit alone is gathered; push it before asking for the next.

    LoRA (full_names None): the unit's adapted linears merged, W + s * B @ A, with their fused
    siblings; the root unit holds no adapted linear. Full fine-tuning: the unit's own trained
    parameters (`full_names`, the policy's trained_names). So at most one block's full weights
    (and its merged copies) exist at once, never the whole model.
    """
    from models.merge import in_memory_name, lora_linears, merged_lora_weights

    model = root.model
    blocks = list(unit_prefixes(root).values())
    adapted = list(lora_linears(model))  # in-memory names of the LoRA linears

    def wanted(prefix: str | None) -> bool:  # a unit with nothing to push is not gathered
        if full_names is None:
            inside = f"{in_memory_name(prefix)}." if prefix is not None else None
            return inside is not None and any(a.startswith(inside) for a in adapted)
        if prefix is None:
            return any(not any(n.startswith(f"{b}.") for b in blocks) for n in full_names)
        return any(n.startswith(f"{prefix}.") for n in full_names)

    for prefix, unit in gathered_units(root, wanted):
        if full_names is None:
            if prefix is not None:
                yield list(merged_lora_weights(model, within=in_memory_name(prefix)))
            continue
        if prefix is None:  # the root's own parameters, a tied head under both its names:
            # the engine refreshes (on CPU: repacks) only the layers a reload names
            own = [
                (n, p)
                for n, p in model.named_parameters(remove_duplicate=False)
                if not any(n.startswith(f"{b}.") for b in blocks)
            ]
            trained = {id(p) for n, p in own if n in full_names}
            yield [(n, p.detach()) for n, p in own if id(p) in trained]
        else:
            own = [(f"{prefix}.{n}", p) for n, p in unit.named_parameters()]
            yield [(n, p.detach()) for n, p in own if n in full_names]
