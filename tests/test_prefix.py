"""Prefix-shared log-prob passes (models/prefix.py) equal the padded full-sequence pass, and
micro-batches of whole groups give the whole batch's gradient.

Against tests/naive.py's references (the model's logits at every position, a float32
log_softmax over the whole vocabulary, images encoded once per row): policy and reference
log-probs, entropy, a GRPO loss and its gradient w.r.t. every LoRA weight, for ragged prompts
and completions (an EOS mid-row, a one-token completion, groups with a row dropped), on the
tiny text LMs (SmolLM2's Llama shape with its tokenizer, and Qwen2) and on the tiny Qwen2.5-VL
with several images of different sizes per batch and a prompt without one, its image features
cached or the vision tower run (then once per prompt, not per row). Then the trainer's
micro-batched loss_and_backward against one pass over all rows, for every loss_type.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.testing import assert_close

from grpo.loss import LOSS_TYPES, LossSettings, grpo_loss
from grpo.sampler_correction import CorrectionSettings
from grpo.trainer import Trajectory, loss_and_backward, micro_batch_weight, micro_batches
from grpo.types import PolicySettings, SamplingSettings
from models.batch import RolloutBatch
from models.logprobs import unwrap
from models.policy import Policy
from models.prefix import (
    bin_continuations,
    packs_continuations,
    prefix_shared_logprobs,
    prefix_shared_reference_logprobs,
    select_prompts,
)
from tests.naive import naive_completion_logprobs, naive_reference_logprobs
from tests.test_lean_paths import fixed_batch, prepare
from tests.test_packing import ragged_batch
from tests.test_text_models import text_policy
from tests.text_helpers import TEXT_FAMILIES

CPU = torch.device("cpu")
TOL = {"atol": 2e-5, "rtol": 1e-5}
GRAD_TOL = {"atol": 1e-4, "rtol": 1e-4}  # as tests/test_packing.py: sums in another order


def lora_grads(policy: Policy) -> list[torch.Tensor]:
    grads = [p.grad.clone() for p in policy.trainable_parameters()]
    policy.model.zero_grad(set_to_none=True)
    return grads


def passes(
    policy: Policy,
    batch: RolloutBatch,
    prefix: bool,
    features: list | None = None,
    packed: bool | None = None,
) -> tuple[torch.Tensor, ...]:
    """(logp, entropy, ref logp [N, T], a GRPO loss with KL, its LoRA gradients...);
    prefix-shared with continuations packed or as trimmed rows (None: the default)."""
    model, temperature = policy.model, 0.7
    if prefix:
        args = (features, 5, policy.suppressed, packed)
        out = prefix_shared_logprobs(model, batch, temperature, True, *args)
        ref = prefix_shared_reference_logprobs(model, batch, temperature, *args)
    else:
        out = naive_completion_logprobs(model, batch, temperature, True, policy.suppressed)
        ref = naive_reference_logprobs(model, batch, temperature, policy.suppressed)
    mask = batch.completion_mask
    advantages = torch.linspace(-1.0, 1.0, batch.num_rows)  # [N]
    old = out.logp.detach() - 0.05 * mask  # ratios away from 1
    settings = LossSettings(beta=0.04, loss_type="bnpo")
    loss, _ = grpo_loss(out.logp, old, ref, advantages, mask, settings)
    loss.backward()
    return out.logp.detach(), out.entropy, ref, loss.detach(), *lora_grads(policy)


def assert_same(prefix: tuple[torch.Tensor, ...], padded: tuple[torch.Tensor, ...]) -> None:
    assert padded[3].abs() > 1e-3 and all(g.abs().sum() > 0 for g in padded[4:])
    for a, b in zip(padded[:4], prefix[:4], strict=True):  # logp, entropy, ref, loss
        assert_close(b, a, **TOL)
    for a, b in zip(padded[4:], prefix[4:], strict=True):  # d loss / d LoRA weights
        assert_close(b, a, **GRAD_TOL)


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_prefix_shared_equals_padded_text(family: str, packed: bool) -> None:
    policy = text_policy(family, scale=0.3)
    assert packs_continuations(policy.model)  # sdpa: the default packs
    batch = ragged_batch(policy)
    assert_same(passes(policy, batch, True, None, packed), passes(policy, batch, False))
    # a group with a row dropped (as mask_truncated_completions does), groups out of order
    part = batch.select([5, 4, 0, 2, 3])
    shared = passes(policy, part, True, None, packed)
    assert_same(shared, passes(policy, part, False))
    assert (shared[0] - shared[2]).abs().max() > 1e-2


@pytest.fixture(scope="module")
def vl_policy(tiny_model_dir: Path) -> Policy:
    torch.manual_seed(0)
    return prepare(Policy(PolicySettings(model=str(tiny_model_dir)), CPU), seed=4)


@pytest.mark.parametrize("packed", [True, False])
def test_prefix_shared_equals_padded_vision(
    vl_policy: Policy, images: list[Image.Image], packed: bool
) -> None:
    batch = fixed_batch(vl_policy, images)  # prompts with 1, 2 (other sizes) and 0 images
    assert len({tuple(g) for g in batch.image_grid_thw.tolist()}) == 3
    assert packs_continuations(vl_policy.model)
    padded = passes(vl_policy, batch, False)
    features = vl_policy.image_features(batch.prompts)
    assert_same(passes(vl_policy, batch, True, features, packed), padded)
    calls: list[int] = []
    visual = unwrap(vl_policy.model).model.visual
    hook = visual.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        assert_same(passes(vl_policy, batch, True, None, packed), padded)  # vision tower runs
    finally:
        hook.remove()
    # policy and reference: each prompt's patches once per pass, not once per row
    assert calls == [batch.prompts.pixel_values.shape[0]] * 2
    for rows in ([1, 4, 5], [2, 3, 0]):  # rows dropped, groups out of order
        part = batch.select(rows)
        shared = passes(vl_policy, part, True, features, packed)
        assert_same(shared, passes(vl_policy, part, False))


def test_select_prompts_drops_shared_left_padding(vl_policy: Policy, images) -> None:
    prompts = fixed_batch(vl_policy, images).prompts
    lengths = prompts.attention_mask.sum(1)  # [P]
    for used in ([0], [2], [0, 2], [1, 2]):
        sub = select_prompts(prompts, torch.tensor(used))
        assert sub.input_ids.shape[1] == int(lengths[used].max())
        assert sub.images_per_prompt == [prompts.images_per_prompt[j] for j in used]
        images_there = sum(sub.images_per_prompt)
        assert (sub.image_grid_thw is None) == (images_there == 0)


def test_policy_defaults_to_prefix_sharing_and_keeps_the_padded_path() -> None:
    policy = text_policy("llama", scale=0.3)
    batch = ragged_batch(policy)
    calls: list[int] = []
    with pytest.MonkeyPatch.context() as patch:
        import models.policy as module

        original = module.prefix_shared_logprobs
        patch.setattr(module, "prefix_shared_logprobs", lambda *a: calls.append(1) or original(*a))
        shared = policy.logprobs(batch, 1.0).logp
        assert calls == [1]
        policy.settings = dataclasses.replace(policy.settings, prefix_sharing=False)
        padded = policy.logprobs(batch, 1.0).logp
        assert calls == [1]
    assert_close(shared, padded, **TOL)


# --- micro-batches of whole groups --------------------------------------------------------------
def trajectory(policy: Policy, rows: list[int]) -> Trajectory:
    """A ragged text batch (3 groups, one row dropped) with advantages, reference and sampler
    log-probs, as `collect` leaves it."""
    batch = ragged_batch(policy).select(rows)
    mask = batch.completion_mask
    with torch.no_grad():
        ref = policy.reference_logprobs(batch, 0.8)
        sampler = policy.logprobs(batch, 0.8).logp + 0.03 * mask
    advantages = torch.linspace(-1.0, 1.2, batch.num_rows)  # [n]
    return Trajectory(batch, advantages, None, sampler, ref_logp=ref)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_micro_batched_gradient_equals_whole_batch(loss_type: str) -> None:
    policy = text_policy("llama", scale=0.3)
    traj = trajectory(policy, [0, 1, 2, 4, 5])  # group 1 has one row left
    settings = LossSettings(
        loss_type=loss_type, beta=0.04, max_completion_length=8, entropy_coef=0.01
    )
    correction = CorrectionSettings(is_mode="token_truncate", is_upper=2.0, off_policy_delta=0.01)
    results = []
    for groups in (0, 1, 2):
        stats = loss_and_backward(policy, traj, settings, correction, 0.8, 11.0, 0.5, groups)
        results.append((stats, lora_grads(policy)))
    assert [len(micro_batches(traj, g)) for g in (0, 1, 2)] == [1, 3, 2]
    (whole, whole_grads), *split = results
    assert all(g.abs().sum() > 0 for g in whole_grads)
    for stats, grads in split:
        assert stats.keys() == whole.keys()
        for key in whole:  # statistics of log-probs: as close as the log-probs (TOL)
            assert stats[key] == pytest.approx(whole[key], rel=1e-4, abs=TOL["atol"]), key
        for a, b in zip(whole_grads, grads, strict=True):
            assert_close(b, a, **GRAD_TOL)


def test_micro_batch_weights_sum_the_whole_batch_loss() -> None:
    """By hand: 2 micro-batches of 3 and 1 rows holding 7 and 2 of 9 tokens."""
    for loss_type, weights in {
        "grpo": (0.75, 0.25),
        "dr_grpo": (0.75, 0.25),
        "bnpo": (7 / 9, 2 / 9),
        "dapo": (1.0, 1.0),
    }.items():
        settings = LossSettings(loss_type=loss_type)
        got = (
            micro_batch_weight(settings, 3, 7.0, 4, 9.0),
            micro_batch_weight(settings, 1, 2, 4, 9),
        )
        assert got == pytest.approx(weights), loss_type


def test_top_entropy_quantile_keeps_one_pass() -> None:
    policy = text_policy("llama", scale=0.3)
    traj = trajectory(policy, [0, 1, 2, 3, 4, 5])
    settings = LossSettings(top_entropy_quantile=0.5)
    calls: list[int] = []
    original = policy.logprobs
    policy.logprobs = lambda b, *a, **k: calls.append(b.num_rows) or original(b, *a, **k)
    loss_and_backward(policy, traj, settings, CorrectionSettings(), 0.8, 10.0, 1.0, 1)
    assert calls == [6]  # the batch-wide entropy threshold needs every row at once


# --- the adapter merged for sampling ----------------------------------------------------------
def test_merged_for_sampling_samples_the_policy_and_restores_its_weights() -> None:
    policy = text_policy("llama", scale=0.3)
    prompts = policy.encode(ragged_prompts(policy))
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    settings = SamplingSettings(max_new_tokens=6, greedy=True)
    merged = policy.sample(prompts, 2, settings)
    policy.settings = dataclasses.replace(policy.settings, merge_for_sampling=False)
    plain = policy.sample(prompts, 2, settings)
    assert merged.tokens == plain.tokens
    for a, b in zip(merged.logprobs, plain.logprobs, strict=True):
        assert_close(torch.tensor(a), torch.tensor(b), **TOL)
    for name, p in policy.model.named_parameters():  # bit for bit: swapped, never written
        assert torch.equal(p, before[name]), name
    with policy.adapter_disabled():  # the merge changed what is sampled: not the base model
        base = policy.sample(prompts, 2, settings)
    assert base.tokens != merged.tokens


def ragged_prompts(policy: Policy) -> list:
    texts = ["7 + 5?", "Compute 13 - 4 and put the result in a box, please."]
    return [policy.prompt_input([{"role": "user", "content": t}], []) for t in texts]


def test_bin_continuations_layout_against_a_loop() -> None:
    tokens = torch.arange(1, 31).view(5, 6)  # [N=5, W=6], token ids 1..30
    fed, slot = [3, 0, 6, 2, 4], [1, 1, 0, 1, 0]  # row 1 feeds nothing
    bins = bin_continuations(tokens, fed, slot, capacity=6)
    # prompt 0: rows 2 (6) and 4 (4) need a bin each; prompt 1: rows 0 (3) and 3 (2) share one
    assert bins.prompt.tolist() == [0, 0, 1]
    b, c = bins.tokens.shape
    assert (b, c) == (3, 6)
    row_at = {}  # (bin, column) -> (row, t), filled the slow way
    for i in range(5):
        for t in range(fed[i]):
            flat = int(bins.index[i, t])
            assert bins.tokens.view(-1)[flat] == tokens[i, t]
            assert bins.offsets.view(-1)[flat] == t
            assert int(bins.prompt[flat // c]) == slot[i]
            row_at[(flat // c, flat % c)] = (i, t)
    assert len(row_at) == sum(fed)  # no two tokens share a slot
    for bi in range(b):
        for q in range(c):
            for k in range(c):
                if (bi, q) in row_at:
                    (i, t), other = row_at[(bi, q)], row_at.get((bi, k))
                    expected = other is not None and other[0] == i and other[1] <= t
                else:  # a tail slot sees only itself
                    expected = q == k
                assert bool(bins.sees[bi, q, k]) == expected, (bi, q, k)


def test_packed_continuations_in_several_bins_per_prompt(monkeypatch) -> None:
    import models.prefix as module

    policy = text_policy("llama", scale=0.3)
    batch = ragged_batch(policy).select([2, 0, 2, 1, 3])  # row 2 (6 tokens) twice in its group
    monkeypatch.setattr(module, "BIN_ROWS", 1)  # bins of one longest row: a group spans several
    built: list = []
    original = module.bin_continuations
    monkeypatch.setattr(
        module, "bin_continuations", lambda *a: built.append(original(*a)) or built[-1]
    )
    shared = passes(policy, batch, True, None, True)
    prompts = built[0].prompt.tolist()  # the policy pass's bins
    assert len(prompts) > len(set(prompts))  # some prompt's continuations span 2+ bins
    assert_same(shared, passes(policy, batch, False))


def test_packed_continuations_refused_where_not_exact(monkeypatch) -> None:
    import models.prefix as module

    policy = text_policy("qwen2", scale=0.3)
    batch = ragged_batch(policy)
    monkeypatch.setattr(module, "attention_of", lambda model: "flash_attention_2")
    assert not packs_continuations(policy.model)
    with pytest.raises(ValueError, match="sdpa"):
        prefix_shared_logprobs(policy.model, batch, packed=True)
    packed_calls: list[int] = []
    original = module.packed_continuation_hidden
    monkeypatch.setattr(
        module, "packed_continuation_hidden", lambda *a: packed_calls.append(1) or original(*a)
    )
    with torch.no_grad():
        fallback = prefix_shared_logprobs(policy.model, batch, suppressed=policy.suppressed)
        naive = naive_completion_logprobs(policy.model, batch, 1.0, False, policy.suppressed)
    assert packed_calls == []  # the trimmed rows ran
    assert_close(fallback.logp, naive.logp, **TOL)
