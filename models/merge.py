"""Merged weights of the LoRA-adapted linears, computed beside the policy, never in it.

A peft LoRA linear keeps the frozen base weight W [out, in] and, per adapter a, the factors
A_a [r, in], B_a [out, r] and the scale s_a = alpha / r. The model it computes is the plain
linear with

    W' = W + sum_a s_a * B_a @ A_a          (over the active adapters not merged in place yet)

Everything here reads the peft tensors and builds W' as a new tensor; the policy's parameters
are never written (peft's own merge_adapter/unmerge_adapter would change W in place and, after
the round trip, leave it off by rounding). Names are transformers' in-memory names, which is
also what vLLM's Qwen2.5-VL loader accepts: peft's `base_model.model.` prefix and the
`.base_layer` infix are dropped, e.g. `model.language_model.layers.0.self_attn.q_proj.weight`.

vLLM fuses q/k/v into one `qkv_proj` and gate/up into one `gate_up_proj`, and a reload of a fused
layer must deliver all of its parts (a part left out is re-allocated uninitialised). So
`merged_lora_weights` also yields the (unchanged) weights of the siblings of every adapted
projection, e.g. k_proj when LoRA targets only q_proj and v_proj.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

import models.cpu_compat  # noqa: F401  (peft imports transformers' image code)

PEFT_PREFIX = "base_model.model."
# Projections the engine stores as one fused matrix: a reload must carry the whole group.
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# float32 elements merged at a time (64 MB): bounds the transient of merged_weight
MERGE_BLOCK_ELEMENTS = 2**24
LORA_TENSOR_MARKERS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude")


def peft_model(policy_or_model: Any) -> nn.Module:
    """The module itself, or `policy.model` for a models.policy.Policy."""
    return policy_or_model if isinstance(policy_or_model, nn.Module) else policy_or_model.model


def in_memory_name(peft_name: str) -> str:
    """`base_model.model.X.base_layer.weight` -> `X.weight` (transformers' own naming)."""
    return peft_name.removeprefix(PEFT_PREFIX).replace(".base_layer", "")


def lora_linears(model: nn.Module) -> dict[str, nn.Module]:
    """peft LoRA layers by in-memory module name, in module order."""
    from peft.tuners.lora import LoraLayer

    return {
        in_memory_name(name): module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
    }


@torch.no_grad()
def merged_weight(layer: nn.Module, block_elements: int = MERGE_BLOCK_ELEMENTS) -> torch.Tensor:
    """W + sum_a s_a * B_a @ A_a for one peft LoRA linear: a new tensor [out, in], W's dtype.

    Each element is formed in float32 (as peft does on CPU for half precision) and cast back
    once. Rows are merged a block at a time (about `block_elements` per block): a float32 copy
    of a whole matrix would cost 4 bytes per weight beside the model (1 GB for one 72B MLP
    projection, three such transients at once in the whole-matrix form), a block costs 64 MB.
    """
    base = layer.get_base_layer()
    if not isinstance(base, nn.Linear):
        raise NotImplementedError(f"merging LoRA into {type(base).__name__} is not supported")
    weight = base.weight.detach()  # [out, in] (stored [in, out] if fan_in_fan_out)
    factors = [] if layer.disable_adapters else _unmerged_factors(layer)
    merged = torch.empty_like(weight)  # never a view of W: the caller owns the result
    rows_per_block = max(1, block_elements // max(1, weight.shape[1]))
    for start in range(0, weight.shape[0], rows_per_block):
        rows = slice(start, start + rows_per_block)
        block = weight[rows].to(torch.float32, copy=True)  # [rows, in]; W is never written
        for a, b, scale in factors:  # a [r, in], b [out, r], float32
            if layer.fan_in_fan_out:  # stored W^T: these rows are columns of B @ A
                block += scale * (b @ a[:, rows]).T  # [rows, out]
            else:
                block += scale * (b[rows] @ a)  # [rows, in]
        merged[rows] = block.to(weight.dtype)
    return merged


def _unmerged_factors(layer: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """(A_a, B_a, s_a) in float32 for each active adapter not already merged into W."""
    factors = []
    for adapter in layer.active_adapters:
        if adapter not in layer.lora_A or adapter in layer.merged_adapters:
            continue  # not on this layer, or already inside W
        if layer.use_dora.get(adapter, False):
            raise NotImplementedError("DoRA adapters are not supported by this merge")
        a = layer.lora_A[adapter].weight.float()  # [r, in]
        b = layer.lora_B[adapter].weight.float()  # [out, r]
        factors.append((a, b, layer.scaling[adapter]))
    return factors


def _fused_siblings(module_name: str) -> list[str]:
    """Module names that share a fused engine matrix with `module_name` (itself included)."""
    parent, _, leaf = module_name.rpartition(".")
    for group in FUSED_GROUPS:
        if leaf in group:
            return [f"{parent}.{member}" for member in group]
    return [module_name]


def merged_lora_weights(
    policy_or_model: Any, within: str | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, weight) for every LoRA-adapted linear, merged, plus its fused siblings' weights;
    with `within` (a module's in-memory name) only those inside that module.

    Lazy: each merged tensor is built when the consumer asks for it, so streaming a large model
    holds one extra matrix at a time. Order follows the model's modules, which keeps the parts
    of one fused layer adjacent.
    """
    model = peft_model(policy_or_model)
    adapted = lora_linears(model)
    wanted = {sibling for name in adapted for sibling in _fused_siblings(name)}
    for peft_name, module in model.named_modules():
        name = in_memory_name(peft_name)
        if name not in wanted or peft_name.endswith(".base_layer"):  # the wrapper stands for it
            continue
        if within is not None and not name.startswith(f"{within}."):
            continue
        if name in adapted:
            yield f"{name}.weight", merged_weight(module)
        elif isinstance(module, nn.Linear):
            yield f"{name}.weight", module.weight.detach()


def merged_state_dict(policy_or_model: Any) -> dict[str, torch.Tensor]:
    """The full model as plain transformers would hold it: LoRA merged, adapter tensors gone.

    Untouched tensors are the policy's own (detached, not copied): clone before modifying.
    """
    model = peft_model(policy_or_model)
    adapted = lora_linears(model)
    out: dict[str, torch.Tensor] = {}
    for peft_name, tensor in model.state_dict(keep_vars=True).items():
        if any(f".{marker}." in peft_name for marker in LORA_TENSOR_MARKERS):
            continue
        name = in_memory_name(peft_name)
        module_name, _, leaf = name.rpartition(".")
        if leaf == "weight" and module_name in adapted:
            out[name] = merged_weight(adapted[module_name])
        else:
            out[name] = tensor.detach()
    return out
