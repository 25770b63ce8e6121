"""Merged LoRA weights, computed beside the policy: against hand numbers and peft's own merge."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from grpo.types import PolicySettings
from models.loading import load_base_model
from models.merge import merged_lora_weights, merged_state_dict, merged_weight
from models.policy import Policy
from models.tiny import tiny_model_path

LM_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _randomise_lora(model: nn.Module, seed: int = 0) -> None:
    """peft starts B at zero (merge = base); give every factor values so the merge shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


@pytest.fixture(scope="module")
def policy() -> Policy:
    torch.manual_seed(0)
    policy = Policy(PolicySettings(), torch.device("cpu"))
    _randomise_lora(policy.model)
    return policy


@pytest.fixture(scope="module")
def peft_merged(policy: Policy) -> dict[str, torch.Tensor]:
    """peft's merge_and_unload on a copy: the plain transformers model with LoRA folded in."""
    return copy.deepcopy(policy.model).merge_and_unload().state_dict()


def test_merge_on_hand_numbers() -> None:
    from peft import LoraConfig, get_peft_model

    class One(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(3, 2, bias=False)

    model = get_peft_model(One(), LoraConfig(r=1, lora_alpha=2, target_modules=["proj"]))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.base_layer.weight.copy_(torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]]))
        layer.lora_A["default"].weight.copy_(torch.tensor([[1.0, 2.0, 3.0]]))  # [r=1, in=3]
        layer.lora_B["default"].weight.copy_(torch.tensor([[0.5], [-1.0]]))  # [out=2, r=1]
    # W + (alpha / r) * B @ A, with alpha / r = 2
    expected = torch.tensor([[1.0 + 1.0, 0.0 + 2.0, 2.0 + 3.0], [0.0 - 2.0, 1.0 - 4.0, -1.0 - 6.0]])
    torch.testing.assert_close(merged_weight(layer), expected)
    with model.disable_adapter():  # adapters off: the base weight itself
        torch.testing.assert_close(merged_weight(layer), layer.base_layer.weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_elements", [1, 3 * 5, 10**6])  # a row, three rows, all
def test_merge_in_row_blocks_equals_elementwise_sum(
    dtype: torch.dtype, block_elements: int
) -> None:
    """W'[i, j] = W[i, j] + s * sum_k B[i, k] A[k, j], however many rows a block holds; W
    itself is left as it was."""
    from peft import LoraConfig, get_peft_model

    class One(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(5, 7, bias=False, dtype=dtype)  # W [out=7, in=5]

    model = get_peft_model(One(), LoraConfig(r=2, lora_alpha=6, target_modules=["proj"]))
    layer = model.base_model.model.proj
    _randomise_lora(model, seed=3)
    with torch.no_grad():
        layer.base_layer.weight.copy_(torch.randn(7, 5, generator=torch.Generator().manual_seed(4)))
    w = layer.base_layer.weight.detach().clone()
    a, b = layer.lora_A["default"].weight.float(), layer.lora_B["default"].weight.float()
    expected = torch.empty(7, 5, dtype=dtype)
    for i in range(7):
        for j in range(5):
            change = sum(float(b[i, k]) * float(a[k, j]) for k in range(2))
            expected[i, j] = float(w[i, j]) + 3.0 * change  # s = alpha / r = 3
    merged = merged_weight(layer, block_elements=block_elements)
    assert merged.dtype == dtype
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-6 if dtype == torch.float32 else 0)
    assert torch.equal(layer.base_layer.weight, w)


def test_merged_weights_equal_peft_merge(
    policy: Policy, peft_merged: dict[str, torch.Tensor]
) -> None:
    pairs = dict(merged_lora_weights(policy))
    layers = policy.model.config.text_config.num_hidden_layers
    expected_names = {
        f"model.language_model.layers.{i}.{block}.{proj}.weight"
        for i in range(layers)
        for block, proj in [("self_attn", p) for p in LM_PROJECTIONS[:4]]
        + [("mlp", p) for p in LM_PROJECTIONS[4:]]
    }
    assert set(pairs) == expected_names
    for name, tensor in pairs.items():
        torch.testing.assert_close(tensor, peft_merged[name], rtol=0, atol=1e-6)
        assert not torch.equal(tensor, policy.model.get_parameter(_peft_name(name)))


def _peft_name(name: str) -> str:
    """Base-weight parameter name in the peft model for a merged in-memory name."""
    module, _, leaf = name.rpartition(".")
    return f"base_model.model.{module}.base_layer.{leaf}"


def test_merged_state_dict_equals_peft_merge(
    policy: Policy, peft_merged: dict[str, torch.Tensor]
) -> None:
    ours = merged_state_dict(policy)
    assert set(ours) == set(peft_merged)
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, peft_merged[name], rtol=0, atol=1e-6)


def test_merging_leaves_the_policy_untouched(policy: Policy) -> None:
    before = _snapshot(policy.model)
    merged = dict(merged_lora_weights(policy))
    merged_state_dict(policy)
    for tensor in merged.values():
        tensor.add_(1.0)  # the results are the caller's: writing them changes nothing upstream
    after = _snapshot(policy.model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert not any(getattr(m, "merged", False) for m in policy.model.modules())


def test_fused_siblings_of_adapted_projections_are_included() -> None:
    """LoRA on q_proj and v_proj only: k_proj shares vLLM's fused qkv_proj, so its (base)
    weight travels too; nothing else does."""
    from peft import LoraConfig, get_peft_model

    base = load_base_model(str(tiny_model_path()), torch.device("cpu"))
    original_k = base.model.language_model.layers[0].self_attn.k_proj.weight.detach().clone()
    targets = r".*language_model.*\.(q_proj|v_proj)"
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    _randomise_lora(model, seed=1)
    pairs = dict(merged_lora_weights(model))
    layers = base.config.text_config.num_hidden_layers
    assert set(pairs) == {
        f"model.language_model.layers.{i}.self_attn.{p}.weight"
        for i in range(layers)
        for p in ("q_proj", "k_proj", "v_proj")
    }
    prefix = "model.language_model.layers.0.self_attn"
    assert torch.equal(pairs[f"{prefix}.k_proj.weight"], original_k)
    assert not torch.equal(
        pairs[f"{prefix}.q_proj.weight"],
        model.get_parameter(f"base_model.model.{prefix}.q_proj.base_layer.weight"),
    )
