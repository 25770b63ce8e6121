"""The four importance-sampling rules and DeepSeek-V3.2's off-policy sequence mask against loop
references and hand numbers; truncated_is_weights unchanged bit for bit."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from grpo.sampler_correction import (
    IS_MODES,
    importance_weights,
    off_policy_sequence_mask,
    truncated_is_weights,
)

NAN = float("nan")
F64 = torch.float64


def frozen_truncated_is_weights(trainer, sampler, mask, cap):
    """A frozen copy of truncated_is_weights before importance_weights existed (1d6bb08)."""
    with torch.no_grad():
        known = ~torch.isnan(sampler)
        log_ratio = torch.where(known, trainer.detach() - sampler, 0.0)
        weights = torch.exp(log_ratio).clamp(max=cap)
        return weights * mask.to(weights.dtype)


def make(seed: int, n: int = 10, t: int = 8, dtype: torch.dtype = F64):
    gen = torch.Generator().manual_seed(seed)
    trainer = -torch.rand(n, t, generator=gen, dtype=dtype) * 3
    sampler = trainer + 0.5 * torch.randn(n, t, generator=gen, dtype=dtype)
    sampler[torch.rand(n, t, generator=gen) < 0.1] = NAN
    lengths = torch.randint(1, t + 1, (n,), generator=gen)
    lengths[3] = 0
    mask = (torch.arange(t)[None, :] < lengths[:, None]).to(dtype)
    return trainer, sampler, mask


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("cap", [0.5, 1.5, 2.0, 10.0])
def test_truncated_is_weights_bit_identical(dtype: torch.dtype, cap: float) -> None:
    trainer, sampler, mask = make(0, dtype=dtype)
    frozen = frozen_truncated_is_weights(trainer, sampler, mask, cap)
    assert torch.equal(truncated_is_weights(trainer, sampler, mask, cap), frozen)
    assert torch.equal(importance_weights(trainer, sampler, mask, upper=cap)[0], frozen)


def reference_weights(trainer, sampler, mask, mode, lower, upper):
    """Loop over rows and tokens; returns (weights, units, low count, high count)."""
    n, t = trainer.shape
    out = [[0.0] * t for _ in range(n)]
    units = n_low = n_high = 0
    lo = -math.inf if lower is None else lower
    for i in range(n):
        active = [u for u in range(t) if mask[i, u]]
        diffs = {
            u: 0.0 if math.isnan(sampler[i, u]) else trainer[i, u].item() - sampler[i, u].item()
            for u in active
        }
        if mode.startswith("sequence"):
            if not active:
                continue
            groups = [(math.exp(sum(diffs.values())), active)]
        else:
            groups = [(math.exp(diffs[u]), [u]) for u in active]
        for ratio, tokens in groups:
            units += 1
            n_low += ratio < lo
            n_high += ratio > upper
            if mode.endswith("truncate"):
                w = min(max(ratio, lo), upper)
            else:
                w = ratio if lo <= ratio <= upper else 0.0
            for u in tokens:
                out[i][u] = w
    return torch.tensor(out, dtype=F64), units, n_low, n_high


@pytest.mark.parametrize(
    ("mode", "bounds"), list(itertools.product(IS_MODES, [(None, 1.5), (0.7, 1.3), (0.2, 4.0)]))
)
def test_modes_match_loop_reference(mode: str, bounds: tuple[float | None, float]) -> None:
    trainer, sampler, mask = make(1)
    lower, upper = bounds
    weights, metrics = importance_weights(trainer, sampler, mask, mode, lower, upper)
    ref, units, n_low, n_high = reference_weights(trainer, sampler, mask, mode, lower, upper)
    torch.testing.assert_close(weights, ref, rtol=1e-12, atol=1e-14)
    assert metrics["is_units"].item() == units
    assert metrics["is_low"].item() == n_low and metrics["is_high"].item() == n_high
    assert metrics["is_frac"].item() == pytest.approx((n_low + n_high) / units)
    active = ref[mask.bool()]
    assert metrics["is_weight_mean"].item() == pytest.approx(active.mean().item())
    if bounds == (0.7, 1.3):  # guards: both bounds are reached in every mode
        assert n_low > 0 and n_high > 0


def test_modes_hand_computed() -> None:
    # Row 0: log-ratios [0.5, -1.0] (ratios 1.6487, 0.3679), sequence log-ratio -0.5 (0.6065).
    # Row 1: log-ratios [0.2, 0.0, padding], sequence 0.2 (1.2214). Bounds [0.5, 1.5].
    trainer = torch.tensor([[-1.0, -2.0, 0.0], [-0.8, -0.3, 5.0]], dtype=F64)
    sampler = torch.tensor([[-1.5, -1.0, 0.0], [-1.0, -0.3, 0.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=F64)
    e = math.exp
    cases = {
        "token_truncate": [[1.5, 0.5, 0], [e(0.2), 1.0, 0]],  # both tokens of row 0 clipped
        "token_mask": [[0.0, 0.0, 0], [e(0.2), 1.0, 0]],  # ...or zeroed
        "sequence_truncate": [[e(-0.5)] * 2 + [0], [e(0.2)] * 2 + [0]],  # inside: unchanged
        "sequence_mask": [[e(-0.5)] * 2 + [0], [e(0.2)] * 2 + [0]],
    }
    for mode, expected in cases.items():
        w, metrics = importance_weights(trainer, sampler, mask, mode, lower=0.5, upper=1.5)
        torch.testing.assert_close(w, torch.tensor(expected, dtype=F64))
        token = mode.startswith("token")
        assert metrics["is_units"].item() == (4 if token else 2)
        assert metrics["is_low"].item() == (1 if token else 0)
        assert metrics["is_high"].item() == (1 if token else 0)
    # Sequence bounds [0.8, 1.1]: row 0 (0.6065) is below, row 1 (1.2214) above.
    w, metrics = importance_weights(trainer, sampler, mask, "sequence_mask", lower=0.8, upper=1.1)
    assert w.eq(0).all() and metrics["is_frac"].item() == 1.0
    w, _ = importance_weights(trainer, sampler, mask, "sequence_truncate", lower=0.8, upper=1.1)
    torch.testing.assert_close(w, torch.tensor([[0.8, 0.8, 0], [1.1, 1.1, 0]], dtype=F64))


def test_weights_are_detached_and_bad_bounds_rejected() -> None:
    trainer, sampler, mask = make(2)
    trainer.requires_grad_(True)
    for mode in IS_MODES:
        assert not importance_weights(trainer, sampler, mask, mode, upper=2.0)[0].requires_grad
    for kw, match in [
        ({"mode": "token"}, "mode"),
        ({"upper": None}, "upper"),
        ({"upper": math.inf}, "upper"),
        ({"upper": 2.0, "lower": 2.0}, "lower"),
        ({"upper": 2.0, "lower": -0.1}, "lower"),
    ]:
        with pytest.raises(ValueError, match=match):
            importance_weights(trainer, sampler, mask, **{"upper": 2.0, **kw})


def test_off_policy_mask_hand_computed() -> None:
    # Mean of (sampler - logp) over active tokens; delta = 0.3:
    # row 0: A < 0, [0.5, 0.3] -> 0.4 > 0.3: dropped.
    # row 1: A > 0, the same drift: kept (only negative advantages are masked).
    # row 2: A < 0, [0.1, 0.2, (pad 9)] -> 0.15: kept.
    # row 3: A < 0, [0.7, NaN sampler] -> 0.7 / 2 = 0.35: dropped.
    # row 4: A = 0, [5, 5]: kept (A >= 0).
    logp = torch.zeros(5, 3, dtype=F64)
    sampler = torch.tensor(
        [[0.5, 0.3, 0], [0.5, 0.3, 0], [0.1, 0.2, 9], [0.7, NAN, 0], [5.0, 5.0, 0]], dtype=F64
    )
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 0], [1, 1, 0], [1, 1, 0]], dtype=F64)
    adv = torch.tensor([-1.0, 1.0, -0.5, -2.0, 0.0], dtype=F64)
    keep, stats = off_policy_sequence_mask(logp, sampler, adv, mask, delta=0.3)
    assert keep.tolist() == [False, True, True, False, True]
    assert stats["opsm_dropped"].item() == 2 and stats["opsm_rows"].item() == 5
    assert stats["opsm_frac"].item() == pytest.approx(0.4)
    assert stats["opsm_token_frac"].item() == pytest.approx(4 / 10)


def test_off_policy_mask_matches_loop() -> None:
    trainer, sampler, mask = make(3, n=16)
    gen = torch.Generator().manual_seed(3)
    adv = torch.randn(16, generator=gen, dtype=F64)
    logp = trainer + 0.4 * torch.randn(16, 8, generator=gen, dtype=F64)
    delta = 0.1
    keep, _ = off_policy_sequence_mask(logp, sampler, adv, mask, delta)
    for i in range(16):
        active = [t for t in range(8) if mask[i, t]]
        diffs = [
            0.0 if math.isnan(sampler[i, t]) else sampler[i, t].item() - logp[i, t].item()
            for t in active
        ]
        mean = sum(diffs) / max(len(active), 1)
        assert keep[i].item() == (adv[i].item() >= 0 or mean <= delta)
    assert (~keep).any() and (keep & (adv < 0)).any()  # guards: both outcomes for A < 0
    bad = adv.clone()
    bad[0] = NAN
    with pytest.raises(ValueError, match="advantages"):
        off_policy_sequence_mask(logp, sampler, bad, mask, delta)
    with pytest.raises(ValueError, match="sampler_logp"):
        off_policy_sequence_mask(logp, sampler[:, 1:], adv, mask, delta)
    with pytest.raises(ValueError, match="delta"):
        off_policy_sequence_mask(logp, sampler, adv, mask, math.nan)
