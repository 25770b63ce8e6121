"""grpo.advantages against hand-derived numbers and a slow loop-based reference."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from grpo.advantages import combine_rewards, group_advantages

NAN = float("nan")


def reference_advantages(rewards: list[float], g: int, scale: str, eps: float) -> list[float]:
    """One prompt at a time with the statistics module (stdev is Bessel-corrected)."""
    known_all = [r for r in rewards if not math.isnan(r)]
    batch_std = statistics.stdev(known_all) if len(known_all) > 1 else 0.0
    out = []
    for j in range(0, len(rewards), g):
        group = rewards[j : j + g]
        known = [r for r in group if not math.isnan(r)]
        mean = statistics.fmean(known) if known else 0.0
        std = {"group": statistics.stdev(known) if len(known) > 1 else 0.0, "batch": batch_std}
        for r in group:
            if math.isnan(r):
                out.append(NAN)
            elif len(set(known)) == 1:
                out.append(0.0)
            elif scale == "none":
                out.append(r - mean)
            else:
                out.append((r - mean) / (std[scale] + eps))
    return out


def test_two_completions_give_plus_minus_one_over_sqrt2() -> None:
    # Group {1, 0}: mean 1/2, sample std sqrt((1/4 + 1/4) / 1) = 1/sqrt(2), so A = +-1/sqrt(2).
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64), 2, eps=0.0)
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(adv, torch.tensor([s, -s, -s, s], dtype=torch.float64))
    adv_eps = group_advantages(torch.tensor([1.0, 0.0], dtype=torch.float64), 2, eps=0.1)
    torch.testing.assert_close(adv_eps[0], torch.tensor(0.5 / (s + 0.1), dtype=torch.float64))


def test_hand_computed_scales() -> None:
    r = torch.tensor([0.0, 1.0, 2.0, 5.0, 5.0, 5.0], dtype=torch.float64)
    # Group 1: mean 1, std 1. Group 2: all equal.
    group = group_advantages(r, 3, "group", eps=0.0)
    torch.testing.assert_close(group, torch.tensor([-1.0, 0, 1, 0, 0, 0], dtype=torch.float64))
    none = group_advantages(r, 3, "none")
    torch.testing.assert_close(none, torch.tensor([-1.0, 0, 1, 0, 0, 0], dtype=torch.float64))
    # Batch {1, 0, 3, 3}: mean 7/4, squared deviations sum to 6.75, /3 = 2.25, std 1.5;
    # group 1 is centred on its own mean 1/2: A = +-0.5 / 1.5.
    r2 = torch.tensor([1.0, 0.0, 3.0, 3.0], dtype=torch.float64)
    batch = group_advantages(r2, 2, "batch", eps=0.0)
    torch.testing.assert_close(batch, torch.tensor([1 / 3, -1 / 3, 0, 0], dtype=torch.float64))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_matches_loop_reference_with_nan(scale: str) -> None:
    gen = torch.Generator().manual_seed(0)
    r = torch.randn(40, generator=gen, dtype=torch.float64)
    r[[3, 17, 18, 19]] = NAN  # group 4 (rows 16..19 with G=4) keeps a single known reward
    r[24:28] = 0.25  # an all-equal group
    adv = group_advantages(r, 4, scale, eps=1e-4)
    ref = torch.tensor(reference_advantages(r.tolist(), 4, scale, 1e-4), dtype=torch.float64)
    torch.testing.assert_close(adv, ref, rtol=1e-12, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_shifting_rewards_changes_nothing(scale: str) -> None:
    r = torch.randn(24, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(
        group_advantages(r + 7.25, 6, scale), group_advantages(r, 6, scale), rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_all_equal_groups_are_exactly_zero(scale: str, dtype: torch.dtype) -> None:
    # 0.1 * 3 / 3 rounds away from 0.1: the zero must not depend on that rounding.
    r = torch.tensor([0.1, 0.1, 0.1, 1.0, 1.0, 1.0, -3.0, NAN, -3.0], dtype=dtype)
    for eps in (1e-4, 0.0):
        adv = group_advantages(r, 3, scale, eps=eps)
        assert adv[[0, 1, 2, 3, 4, 5, 6, 8]].eq(0).all()
        assert torch.isnan(adv[7])


def test_nan_rewards_are_left_out_of_the_statistics() -> None:
    with_nan = torch.tensor([1.0, NAN, 0.0, 3.0], dtype=torch.float64)
    adv = group_advantages(with_nan, 4, eps=0.0)
    alone = group_advantages(torch.tensor([1.0, 0.0, 3.0], dtype=torch.float64), 3, eps=0.0)
    torch.testing.assert_close(adv[[0, 2, 3]], alone)
    assert torch.isnan(adv[1])
    # A group with no reward at all stays NaN; the trainer must drop it.
    assert torch.isnan(group_advantages(torch.full((2,), NAN), 2)).all()


def test_dtype_rule_at_least_float32() -> None:
    assert group_advantages(torch.zeros(4, dtype=torch.bfloat16), 2).dtype == torch.float32
    assert group_advantages(torch.zeros(4, dtype=torch.float16), 2).dtype == torch.float32
    assert group_advantages(torch.zeros(4, dtype=torch.float64), 2).dtype == torch.float64


def test_bad_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(4), 2, scale="global")
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 2), 2)
    with pytest.raises(ValueError, match="eps"):
        group_advantages(torch.zeros(4), 2, eps=-1.0)


def test_combine_rewards_hand_computed() -> None:
    f = torch.tensor([[1.0, NAN], [0.5, 1.0], [NAN, NAN], [0.0, -1.0]])
    out = combine_rewards(f, [2.0, 3.0])
    torch.testing.assert_close(out, torch.tensor([2.0, 4.0, NAN, -3.0]), equal_nan=True)


def test_combine_rewards_matches_loop() -> None:
    gen = torch.Generator().manual_seed(2)
    f = torch.randn(30, 3, generator=gen, dtype=torch.float64)
    f[torch.rand(30, 3, generator=gen) < 0.4] = NAN
    w = [0.5, 1.0, 2.0]
    expected = []
    for row in f.tolist():
        terms = [wk * x for wk, x in zip(w, row, strict=True) if not math.isnan(x)]
        expected.append(sum(terms) if terms else NAN)
    out = combine_rewards(f, torch.tensor(w))
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64), equal_nan=True)
    with pytest.raises(ValueError, match="weights"):
        combine_rewards(f, [1.0, 2.0])
    with pytest.raises(ValueError, match="N, K"):
        combine_rewards(f[:, 0], [1.0])
