"""Padding-free (packed) log-prob passes equal the padded ones, and are refused where not exact.

On the tiny text models (tests/text_helpers.py) and the tiny Qwen2.5-VL, with ragged prompts
and completions (an EOS mid-row, a one-token completion; for the VLM prompts with one image,
two images of other sizes and none): policy and reference log-probs, entropy, a GRPO-like loss
and its gradient w.r.t. every LoRA weight, packed (bins of BIN_ROWS x the longest row, and one
bin of all rows as flash-attention gets) against padded, within float32 tolerance; for the VLM
with the image features computed once per prompt and with the (LoRA-trained) vision tower run
inside the pass. Unverified model types, attention implementations and sliding-window
attention are refused with a clear error.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torch.testing import assert_close

from grpo.types import PolicySettings, PromptInput
from models.batch import RolloutBatch
from models.logprobs import completion_logprobs, features_for_rows, reference_logprobs, unwrap
from models.packing import (
    PackingError,
    assign_bins,
    bin_capacity,
    pack_rows,
    packed_image_features,
    packed_rope_positions,
    packing_refusal,
)
from models.policy import Policy
from tests.test_text_models import text_policy
from tests.text_helpers import TEXT_FAMILIES

CPU = torch.device("cpu")
TOL = {"atol": 2e-5, "rtol": 1e-5}
GRAD_TOL = {"atol": 1e-4, "rtol": 1e-4}  # sums over rows in another order: float32 rounding


def test_pack_rows_layout() -> None:
    ids = torch.tensor([[0, 0, 5, 6, 7, 0], [1, 2, 3, 4, 8, 9], [0, 0, 0, 4, 0, 0]])  # [3, 6]
    mask = (torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 0, 0]])).long()
    packed = pack_rows(ids, mask)  # lengths 3, 6, 1 into bins of 6
    assert packed.input_ids.shape == (2, 6) and packed.lengths == [6, 4]
    flat_ids, flat_pos = packed.input_ids.reshape(-1), packed.position_ids.reshape(-1)
    for i in range(3):
        slots = packed.slot[i][mask[i].bool()]
        assert flat_ids[slots].tolist() == ids[i][mask[i].bool()].tolist()
        assert flat_pos[slots].tolist() == list(range(int(mask[i].sum())))
    assert (packed.slot[mask == 0] == -1).all()
    assert packed.position_ids[1].tolist() == [0, 1, 2, 0, 0, 1]  # rows 0, 2, then the tail


def test_assign_bins_first_fit_decreasing() -> None:
    bins, offset, used = assign_bins([4, 2, 5, 1, 3], 5)
    assert used == [5, 5, 5] and all(u <= 5 for u in used)
    assert bins[2] == 0 and bins[0] == 1 and offset[3] == 4  # 5 | 4+1 | 3+2


def ragged_batch(policy: Policy) -> RolloutBatch:
    """3 prompts of 3 lengths x G=2; completions of 1..6 tokens, one EOS mid-row."""
    texts = ["7 + 5?", "Compute 13 - 4 and put the result in a box, please.", "Hi there."]
    content = [[{"type": "text", "text": t}] for t in texts]
    inputs = [policy.prompt_input([{"role": "user", "content": c}], []) for c in content]
    stop = min(policy.stop_ids)
    completions = [[11, 12, 13], [14, stop, 99, 98], [16, 17, 18, 19, 20, 21], [stop], [22], [23]]
    batch = policy.rollout_batch(policy.encode(inputs), completions, 2)
    assert len(set(batch.attention_mask.sum(1).tolist())) >= 4  # ragged rows
    return batch


def capacity(policy: Policy, batch: RolloutBatch, capacity_all: bool) -> int:
    """The bin size the packed pass uses."""
    total = int(batch.attention_mask.sum())
    return total if capacity_all else bin_capacity(unwrap(policy.model), batch.attention_mask)


def loss_and_grads(
    policy: Policy,
    batch: RolloutBatch,
    packing: bool,
    capacity_all: bool = False,
    features: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, ...]:
    """(logp [N, T], entropy [N, T], ref logp [N, T], loss, LoRA gradients...)."""
    policy.model.zero_grad()
    lora = [p for n, p in policy.model.named_parameters() if "lora_" in n]
    with pytest.MonkeyPatch.context() as patch:
        if capacity_all:  # one bin of all rows, the layout flash-attention gets
            patch.setattr("models.logprobs.bin_capacity", lambda m, a: int(a.sum()))
        out = completion_logprobs(
            policy.model, batch, 0.7, True, features, chunk_tokens=5, packing=packing
        )
        ref = reference_logprobs(
            policy.model, batch, 0.7, features, chunk_tokens=5, packing=packing
        )
    mask = batch.completion_mask
    advantages = torch.linspace(-1.0, 1.0, batch.num_rows)[:, None]  # [N, 1]
    ratio = torch.exp(out.logp - out.logp.detach())  # [N, T]
    kl = torch.exp(ref - out.logp) - (ref - out.logp) - 1  # [N, T] k3
    loss = (((-advantages * ratio) + 0.04 * kl) * mask).sum() / mask.sum()
    loss.backward()
    return out.logp, out.entropy, ref, loss.detach(), *[p.grad.clone() for p in lora]


def assert_packed_equals_padded(
    policy: Policy,
    batch: RolloutBatch,
    capacity_all: bool,
    features: list[torch.Tensor] | None = None,
) -> None:
    """Packed log-probs, entropy, reference, loss and LoRA gradients equal the padded ones,
    with at least one bin holding several rows and a non-trivial loss and gradient."""
    padded = loss_and_grads(policy, batch, False, features=features)
    packed = loss_and_grads(policy, batch, True, capacity_all, features)
    bins = pack_rows(batch.input_ids, batch.attention_mask, capacity(policy, batch, capacity_all))
    assert bins.input_ids.shape[0] < batch.num_rows  # some bin holds several rows
    assert padded[3].abs() > 1e-3 and all(g.abs().sum() > 0 for g in padded[4:])
    for a, b in zip(padded[:4], packed[:4], strict=True):  # logp, entropy, ref, loss
        assert_close(b, a, **TOL)
    for a, b in zip(padded[4:], packed[4:], strict=True):  # d loss / d LoRA weights
        assert_close(b, a, **GRAD_TOL)


@pytest.mark.parametrize("family", TEXT_FAMILIES)
@pytest.mark.parametrize("capacity_all", [False, True])
def test_packed_equals_padded(family: str, capacity_all: bool) -> None:
    policy = text_policy(family, scale=0.3)
    batch = ragged_batch(policy)
    assert_packed_equals_padded(policy, batch, capacity_all)


def test_policy_flag_routes_through_packing() -> None:
    policy = text_policy("llama")
    batch = ragged_batch(policy)
    padded = policy.logprobs(batch, 1.0).logp
    policy.settings = dataclasses.replace(policy.settings, packing=True)
    calls = []
    with pytest.MonkeyPatch.context() as patch:
        import models.logprobs as logprobs

        original = logprobs.pack_rows
        patch.setattr(logprobs, "pack_rows", lambda *a: calls.append(1) or original(*a))
        packed = policy.logprobs(batch, 1.0).logp
        ref = policy.reference_logprobs(batch, 1.0)
    assert len(calls) == 2
    assert_close(packed, padded, **TOL)
    assert ref.shape == padded.shape


def test_packing_refused_for_unverified_types() -> None:
    def fake(model_type: str, attention: str) -> SimpleNamespace:
        config = SimpleNamespace(model_type=model_type, _attn_implementation=attention)
        return SimpleNamespace(config=config, model=SimpleNamespace())

    assert packing_refusal(fake("llama", "sdpa")) is None
    assert "not 'gpt2'" in packing_refusal(fake("gpt2", "sdpa"))
    assert "not 'qwen2_vl'" in packing_refusal(fake("qwen2_vl", "sdpa"))  # Qwen2-VL: unverified
    assert "flex_attention" in packing_refusal(fake("qwen2", "flex_attention"))
    sliding = fake("qwen2", "sdpa")
    sliding.config.use_sliding_window = True
    assert "sliding-window" in packing_refusal(sliding)


def test_packing_refusal_reads_a_vlm_text_config() -> None:
    """Qwen2.5-VL keeps the language model's attention in its text config."""
    text = SimpleNamespace(_attn_implementation="flex_attention", use_sliding_window=False)
    config = SimpleNamespace(model_type="qwen2_5_vl", text_config=text)
    vlm = SimpleNamespace(config=config, model=SimpleNamespace())
    assert "'flex_attention'" in packing_refusal(vlm)
    text._attn_implementation = "sdpa"
    assert packing_refusal(vlm) is None


def test_policy_refuses_packing_for_an_unverified_attention(tiny_model_dir: Path) -> None:
    settings = PolicySettings(model=str(tiny_model_dir), packing=True, attn_implementation="eager")
    Policy(settings, CPU)  # eager is verified
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("models.packing.PACKABLE_ATTENTION", ("sdpa",))
        with pytest.raises(PackingError, match=r"--packing refused .*'eager'"):
            Policy(settings, CPU)


# --------------------------------------------------------------------------------------------
# Qwen2.5-VL: 3-D rotary positions, several images of different sizes, text-only rows
# --------------------------------------------------------------------------------------------


def vision_policy(model_dir: Path, lora_vision: bool) -> Policy:
    """The tiny Qwen2.5-VL with non-zero LoRA B (vision tower adapted too if asked)."""
    torch.manual_seed(0)
    settings = PolicySettings(model=str(model_dir), lora_vision=lora_vision, packing=True)
    policy = Policy(settings, CPU)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return policy


def image_batch(policy: Policy, images: list[Image.Image]) -> RolloutBatch:
    """Prompts with one image, two images of two other sizes, none; G=2, ragged completions."""

    def chat(text: str, pictures: list[Image.Image]) -> PromptInput:
        content = [{"type": "image"} for _ in pictures] + [{"type": "text", "text": text}]
        return policy.prompt_input([{"role": "user", "content": content}], pictures)

    inputs = [chat("Read it.", images[:1]), chat("same?", images[1:]), chat("2 + 2 = ?", [])]
    stop = min(policy.stop_ids)
    completions = [[11, 12, 13], [14, stop, 99, 98], [16, 17, 18, 19, 20, 21], [stop], [22], [23]]
    batch = policy.rollout_batch(policy.encode(inputs), completions, 2)
    assert len(set(batch.attention_mask.sum(1).tolist())) >= 4  # ragged rows
    return batch


@pytest.mark.parametrize("capacity_all", [False, True])
@pytest.mark.parametrize("cached_features", [True, False])
def test_vision_language_packed_equals_padded(
    tiny_model_dir: Path, images: list[Image.Image], capacity_all: bool, cached_features: bool
) -> None:
    """cached_features: features once per prompt image (frozen tower); otherwise the tower,
    LoRA-adapted, runs inside both passes and its LoRA weights get gradients too."""
    policy = vision_policy(tiny_model_dir, lora_vision=not cached_features)
    batch = image_batch(policy, images)
    features = policy.image_features(batch.prompts)
    assert (features is not None) == cached_features
    assert_packed_equals_padded(policy, batch, capacity_all, features)


def test_vision_language_packed_positions_are_the_padded_rope_index(
    tiny_model_dir: Path, images: list[Image.Image]
) -> None:
    """Row 0 restarts at 0 per row; rows 1..3 hold, slot for slot, the 3-D positions the
    padded pass computes (which differ from the 1-D ones on image tokens)."""
    policy = vision_policy(tiny_model_dir, lora_vision=False)
    batch = image_batch(policy, images)
    inner = unwrap(policy.model).model
    packed = pack_rows(batch.input_ids, batch.attention_mask, int(batch.attention_mask.sum()))
    positions = packed_rope_positions(inner, batch, packed).reshape(4, -1)  # [4, B * C]
    rope, _ = inner.get_rope_index(
        batch.input_ids,
        batch.mm_token_type_ids,
        batch.image_grid_thw,
        None,
        None,
        batch.attention_mask,
    )  # [3, N, L]
    for i in range(batch.num_rows):
        real = batch.attention_mask[i].bool()
        slots = packed.slot[i][real]
        assert positions[0, slots].tolist() == list(range(int(real.sum())))
        assert torch.equal(positions[1:, slots], rope[:, i, real])
    image_rows = batch.mm_token_type_ids.bool().any(1)
    assert not torch.equal(rope[0][image_rows], rope[1][image_rows])  # really 3-D


def test_vision_language_features_follow_the_packed_order(
    tiny_model_dir: Path, images: list[Image.Image]
) -> None:
    """The features scattered into the packed image tokens are, token for token, the ones
    the padded pass puts at the same (row, column)."""
    policy = vision_policy(tiny_model_dir, lora_vision=False)
    batch = image_batch(policy, images)
    inner = unwrap(policy.model).model
    features = policy.image_features(batch.prompts)
    packed = pack_rows(batch.input_ids, batch.attention_mask, int(batch.attention_mask.sum()))
    flat = packed_image_features(inner, batch, packed, features)  # [tokens, H] packed order
    padded = features_for_rows(features, batch.prompts, batch.prompt_of_row)  # row order
    image = batch.input_ids == unwrap(policy.model).config.image_token_id  # [N, L]
    at = torch.zeros(packed.input_ids.numel(), dtype=torch.long)
    at[packed.slot[image]] = torch.arange(int(image.sum()))  # padded feature index per slot
    packed_image = packed.input_ids.reshape(-1) == unwrap(policy.model).config.image_token_id
    assert torch.equal(flat, padded[at[packed_image]])
    assert not torch.equal(flat, padded)  # the orders do differ here
