"""Truncated importance weights and sampler/trainer mismatch metrics, on hand numbers."""

from __future__ import annotations

import math

import pytest
import torch

from grpo.sampler_correction import mismatch_stats, pad_sampler_logprobs, truncated_is_weights

NAN = float("nan")


def test_truncated_weights_on_hand_numbers() -> None:
    trainer = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -0.1, -0.2]])
    sampler = torch.tensor([[-1.5, -1.0, -0.5], [-3.0, -0.3, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    weights = truncated_is_weights(trainer, sampler, mask, cap=1.5)
    expected = torch.tensor(
        [
            [1.5, math.exp(-1.0), 0.0],  # exp(0.5) = 1.65 is capped; the masked token is 0
            [1.0, math.exp(0.2), 1.5],  # exp(8.8) is capped
        ]
    )
    torch.testing.assert_close(weights, expected)


def test_weights_are_constants() -> None:
    trainer = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    weights = truncated_is_weights(trainer, torch.tensor([[-1.2, -1.0]]), torch.ones(1, 2), 2.0)
    assert not weights.requires_grad


def test_unscored_token_gets_weight_one_and_is_left_out_of_stats() -> None:
    trainer = torch.tensor([[-1.0, -2.0]])
    sampler = torch.tensor([[-1.25, NAN]])
    mask = torch.ones(1, 2)
    weights = truncated_is_weights(trainer, sampler, mask, cap=10.0)
    torch.testing.assert_close(weights, torch.tensor([[math.exp(0.25), 1.0]]))
    assert mismatch_stats(trainer, sampler, mask) == {"logp_diff_mean": 0.25, "logp_diff_max": 0.25}


def test_nonpositive_cap_is_rejected() -> None:
    with pytest.raises(ValueError, match="cap"):
        truncated_is_weights(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), cap=0.0)


def test_mismatch_stats_on_hand_numbers() -> None:
    trainer = torch.tensor([[-1.0, -2.0, -4.0], [-0.5, -0.5, -0.5]])
    sampler = torch.tensor([[-1.5, -1.0, -0.0], [-0.25, -0.5, -0.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])  # the 4.0 gap is masked out
    stats = mismatch_stats(trainer, sampler, mask)
    assert stats["logp_diff_mean"] == pytest.approx((0.5 + 1.0 + 0.25 + 0.0) / 4)
    assert stats["logp_diff_max"] == pytest.approx(1.0)


def test_mismatch_stats_without_tokens() -> None:
    stats = mismatch_stats(torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2, 3))
    assert stats == {"logp_diff_mean": 0.0, "logp_diff_max": 0.0}


def test_weights_match_a_loop_reference() -> None:
    generator = torch.Generator().manual_seed(0)
    trainer = -torch.rand(4, 7, generator=generator) * 5
    sampler = -torch.rand(4, 7, generator=generator) * 5
    mask = (torch.rand(4, 7, generator=generator) > 0.3).float()
    cap = 2.0
    weights = truncated_is_weights(trainer, sampler, mask, cap)
    for i in range(4):
        for t in range(7):
            ratio = math.exp(trainer[i, t].item() - sampler[i, t].item())
            expected = min(ratio, cap) if mask[i, t] else 0.0
            assert weights[i, t].item() == pytest.approx(expected, rel=1e-6)


def test_pad_sampler_logprobs() -> None:
    padded = pad_sampler_logprobs([[-1.0, -2.0, -3.0], [-0.5]], width=2)
    torch.testing.assert_close(padded, torch.tensor([[-1.0, -2.0], [-0.5, 0.0]]))
