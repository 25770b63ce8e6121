"""Reward aggregation (GDPO normalise-then-sum), the KL penalty in the reward, and DAPO's
informative-group filter: loop references and hand-derived numbers."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from grpo.advantages import (
    REWARD_AGGREGATIONS,
    aggregate_rewards,
    combine_rewards,
    group_advantages,
    informative_groups,
    kl_penalized_rewards,
)
from grpo.loss import kl_estimate

NAN = float("nan")
F64 = torch.float64


def reference_normalize_then_sum(
    f: list[list[float]], w: list[float], g: int, eps: float
) -> list[float]:
    """One group and one reward function at a time, with the statistics module."""
    n, k = len(f), len(w)
    norm = [[NAN] * k for _ in range(n)]
    for j in range(0, n, g):
        for c in range(k):
            known = [f[i][c] for i in range(j, j + g) if not math.isnan(f[i][c])]
            mean = statistics.fmean(known) if known else 0.0
            std = statistics.stdev(known) if len(known) > 1 else 0.0
            for i in range(j, j + g):
                if math.isnan(f[i][c]):
                    continue
                norm[i][c] = 0.0 if len(set(known)) == 1 else (f[i][c] - mean) / (std + eps)
    out = []
    for row in norm:
        terms = [wc * x for wc, x in zip(w, row, strict=True) if not math.isnan(x)]
        out.append(sum(terms) if terms else NAN)
    return out


def random_rewards(seed: int, n: int = 24, k: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(n, k, generator=gen, dtype=F64) * torch.tensor([1.0, 10.0, 0.1], dtype=F64)
    f[torch.rand(n, k, generator=gen) < 0.25] = NAN
    f[4:8, 0] = 0.5  # a group where function 0 is constant
    f[8:12] = NAN  # a group without any reward
    f[13, :] = NAN  # one sample without any reward
    return f


def test_sum_mode_is_combine_rewards() -> None:
    f = random_rewards(0)
    w = [0.5, 1.0, 2.0]
    for out in (aggregate_rewards(f, w, 4), aggregate_rewards(f, w, 4, "sum")):
        torch.testing.assert_close(out, combine_rewards(f, w), rtol=0, atol=0, equal_nan=True)
    assert REWARD_AGGREGATIONS == ("sum", "normalize_then_sum")


@pytest.mark.parametrize("eps", [1e-4, 0.0])
def test_normalize_then_sum_matches_loop_reference(eps: float) -> None:
    f = random_rewards(1)
    w = [0.5, 1.0, 2.0]
    out = aggregate_rewards(f, torch.tensor(w), 4, "normalize_then_sum", eps)
    ref = torch.tensor(reference_normalize_then_sum(f.tolist(), w, 4, eps), dtype=F64)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12, equal_nan=True)
    assert torch.isnan(out[8:12]).all() and torch.isnan(out[13])


def test_normalize_then_sum_hand_computed() -> None:
    # One group of 2, eps = 0. f1 = [1, 0]: mean 1/2, std 1/sqrt 2, normalised [+s, -s] with
    # s = 1/sqrt 2. f2 = [10, 30]: mean 20, std 10 sqrt 2, normalised [-s, +s].
    # Weights [1, 1]: r = [0, 0] (the plain sum [11, 30] would call sample 2 better);
    # weights [2, 1]: r = [2s - s, -2s + s] = [s, -s].
    f = torch.tensor([[1.0, 10.0], [0.0, 30.0]], dtype=F64)
    s = 1 / math.sqrt(2)
    even = aggregate_rewards(f, [1.0, 1.0], 2, "normalize_then_sum", eps=0.0)
    torch.testing.assert_close(even, torch.zeros(2, dtype=F64), atol=1e-15, rtol=0)
    skew = aggregate_rewards(f, [2.0, 1.0], 2, "normalize_then_sum", eps=0.0)
    torch.testing.assert_close(skew, torch.tensor([s, -s], dtype=F64))
    # Then GDPO's batch normalisation: group_advantages(..., "batch"); one group of [s, -s]:
    # batch std = sqrt((s^2 + s^2) / 1) = 1, so A = [s, -s].
    adv = group_advantages(skew, 2, "batch", eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([s, -s], dtype=F64))


def test_aggregate_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="aggregation"):
        aggregate_rewards(torch.zeros(4, 2), [1.0, 1.0], 2, "mean")
    with pytest.raises(ValueError, match="N, K"):
        aggregate_rewards(torch.zeros(4), [1.0], 2, "normalize_then_sum")
    with pytest.raises(ValueError, match="groups of 3"):
        aggregate_rewards(torch.zeros(4, 2), [1.0, 1.0], 3, "normalize_then_sum")
    with pytest.raises(ValueError, match="weights"):
        aggregate_rewards(torch.zeros(4, 2), [1.0], 2, "normalize_then_sum")


def test_kl_penalized_rewards_hand_computed() -> None:
    # r = [1, 0, NaN]; kl rows [0.5, 0.25, (pad 9)], [-0.1, 0.3, 0.2], [1, 1, 1]; beta 0.1:
    # [1 - 0.1 * 0.75, 0 - 0.1 * 0.4, NaN] = [0.925, -0.04, NaN].
    r = torch.tensor([1.0, 0.0, NAN], dtype=F64)
    kl = torch.tensor([[0.5, 0.25, 9.0], [-0.1, 0.3, 0.2], [1.0, 1.0, 1.0]], dtype=F64)
    m = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1]])
    out = kl_penalized_rewards(r, kl, m, beta=0.1)
    torch.testing.assert_close(out, torch.tensor([0.925, -0.04, NAN], dtype=F64), equal_nan=True)


def test_kl_penalized_rewards_match_loop_with_k1_of_the_sampler() -> None:
    gen = torch.Generator().manual_seed(3)
    old = -torch.rand(8, 6, generator=gen, dtype=F64) * 3
    ref = old + 0.3 * torch.randn(8, 6, generator=gen, dtype=F64)
    m = torch.arange(6)[None, :] < torch.randint(0, 7, (8,), generator=gen)[:, None]
    r = torch.randn(8, generator=gen, dtype=F64)
    out = kl_penalized_rewards(r, kl_estimate(old, ref, m, "k1"), m, beta=0.05)
    for i in range(8):
        total = sum(old[i, t].item() - ref[i, t].item() for t in range(6) if m[i, t])
        assert out[i].item() == pytest.approx(r[i].item() - 0.05 * total, abs=1e-12)
    assert not out.requires_grad


def test_kl_penalized_rewards_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="kl"):
        kl_penalized_rewards(torch.zeros(3), torch.zeros(2, 4), torch.ones(2, 4), 0.1)
    with pytest.raises(ValueError, match="mask"):
        kl_penalized_rewards(torch.zeros(2), torch.zeros(2, 4), torch.ones(2, 3), 0.1)
    with pytest.raises(ValueError, match="beta"):
        kl_penalized_rewards(torch.zeros(2), torch.zeros(2, 4), torch.ones(2, 4), -0.1)


def test_informative_groups_hand_computed() -> None:
    r = torch.tensor(
        [
            *[1.0, 0.0, 1.0],  # spread: informative
            *[1.0, 1.0, 1.0],  # all right
            *[0.0, 0.0, 0.0],  # all wrong
            *[1.0, NAN, 1.0],  # known rewards equal
            *[NAN, 0.3, NAN],  # a single known reward
            *[NAN, NAN, NAN],  # no reward
            *[0.2, NAN, 0.7],  # spread among the known
        ]
    )
    assert informative_groups(r, 3).tolist() == [True, False, False, False, False, False, True]


def test_informative_groups_match_loop_and_nonzero_advantages() -> None:
    gen = torch.Generator().manual_seed(4)
    r = (torch.rand(40, generator=gen) > 0.6).float()  # binary rewards, G = 4
    r[torch.rand(40, generator=gen) < 0.2] = NAN
    keep = informative_groups(r, 4)
    adv = group_advantages(r, 4)
    for j in range(10):
        known = [x for x in r[4 * j : 4 * j + 4].tolist() if not math.isnan(x)]
        assert keep[j].item() == (len(set(known)) > 1)
        # The filter keeps exactly the groups with some non-zero advantage.
        group_adv = adv[4 * j : 4 * j + 4]
        assert keep[j].item() == bool((group_adv[~torch.isnan(group_adv)] != 0).any())
    assert keep.any() and not keep.all()
    with pytest.raises(ValueError, match="groups of 3"):
        informative_groups(r, 3)
    with pytest.raises(ValueError, match="1-D"):
        informative_groups(r.view(4, 10), 4)
