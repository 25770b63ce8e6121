"""grpo.loss against hand-derived numbers and a slow token-by-token reference (loss, gradient)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from grpo.loss import LOSS_TYPES, LossSettings, grpo_loss

F64 = torch.float64


def reference_loss(
    logp: torch.Tensor,
    old: torch.Tensor,
    ref: torch.Tensor | None,
    adv: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    eps_low: float,
    eps_high: float | None,
    loss_type: str,
    max_len: int | None,
    num_items: float | None,
    w: torch.Tensor | None,
) -> torch.Tensor:
    """PPO's min() written as a branch per token, with no clamp and no vectorisation."""
    eps_high = eps_low if eps_high is None else eps_high
    n_rows, n_cols = logp.shape
    row_sums, row_lens = [], []
    for i in range(n_rows):
        row_sum, row_len = logp.new_zeros(()), 0
        for t in range(n_cols):
            if not mask[i, t]:
                continue
            ratio = torch.exp(logp[i, t] - old[i, t])
            a = float(adv[i])
            if ratio.item() < 1 - eps_low:
                clipped = torch.tensor(1 - eps_low, dtype=F64)  # constant: no gradient
            elif ratio.item() > 1 + eps_high:
                clipped = torch.tensor(1 + eps_high, dtype=F64)
            else:
                clipped = ratio
            unclipped_term, clipped_term = ratio * a, clipped * a
            surrogate = (
                unclipped_term if unclipped_term.item() <= clipped_term.item() else clipped_term
            )
            token = -surrogate * (1.0 if w is None else w[i, t])
            if beta:
                d = ref[i, t] - logp[i, t]
                token = token + beta * (torch.exp(d) - d - 1)
            row_sum, row_len = row_sum + token, row_len + 1
        row_sums.append(row_sum)
        row_lens.append(row_len)
    total = sum(row_sums)
    if loss_type == "grpo":
        return sum(s / max(n, 1) for s, n in zip(row_sums, row_lens, strict=True)) / n_rows
    if loss_type == "bnpo":
        return total / max(sum(row_lens), 1)
    if loss_type == "dapo":
        return total / (num_items if num_items is not None else max(sum(row_lens), 1))
    return total / (n_rows * (max_len if max_len is not None else n_cols))


def make_batch(seed: int, n: int = 6, t: int = 7, spread: float = 0.3) -> dict[str, torch.Tensor]:
    """Random float64 batch with ragged masks (one row empty) and ratios around both clips."""
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n, t, generator=gen, dtype=F64) * 3
    lengths = torch.randint(1, t + 1, (n,), generator=gen)
    lengths[2] = 0
    return {
        "logp": logp,
        "old_logp": logp + spread * torch.randn(n, t, generator=gen, dtype=F64),
        "ref_logp": logp + spread * torch.randn(n, t, generator=gen, dtype=F64),
        "advantages": torch.randn(n, generator=gen, dtype=F64),
        "mask": (torch.arange(t)[None, :] < lengths[:, None]).to(F64),
        "is_weights": torch.rand(n, t, generator=gen, dtype=F64) + 0.5,
    }


def loss_and_grad(fn, batch: dict[str, torch.Tensor], **kw) -> tuple[torch.Tensor, torch.Tensor]:
    logp = batch["logp"].clone().requires_grad_(True)
    loss = fn(logp, batch["old_logp"], batch["ref_logp"], batch["advantages"], batch["mask"], **kw)
    loss = loss[0] if isinstance(loss, tuple) else loss
    loss.backward()
    return loss.detach(), logp.grad


CASES = list(itertools.product(LOSS_TYPES, [0.0, 0.04], [None, 0.28], [False, True]))


@pytest.mark.parametrize(("loss_type", "beta", "eps_high", "use_w"), CASES)
def test_matches_reference_loss_and_gradient(
    loss_type: str, beta: float, eps_high: float | None, use_w: bool
) -> None:
    batch = make_batch(seed=3)
    w = batch["is_weights"] if use_w else None
    extra = {"dapo": {"num_items": 50.0}, "dr_grpo": {"max_completion_length": 9}}
    for kw in ({}, extra.get(loss_type, {})):
        common = {"beta": beta, "eps_low": 0.2, "eps_high": eps_high, "loss_type": loss_type}
        settings = LossSettings(**common, max_completion_length=kw.get("max_completion_length"))
        num_items = kw.get("num_items")
        loss, grad = loss_and_grad(
            grpo_loss, batch, settings=settings, is_weights=w, num_items=num_items
        )
        ref_kw = {"max_len": kw.get("max_completion_length"), "num_items": num_items}
        ref_loss, ref_grad = loss_and_grad(reference_loss, batch, w=w, **common, **ref_kw)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-14)


def test_reference_batch_exercises_both_clips() -> None:
    # Guards the test above: its data must reach both clip branches, or it proves little.
    _, stats = grpo_loss(**{k: v for k, v in make_batch(seed=3).items() if k != "is_weights"})
    assert stats["clip_frac_low"] > 0 and stats["clip_frac_high"] > 0


@pytest.mark.parametrize("eps_high", [None, 0.28])
def test_clip_fractions_and_ratio_stats_match_loop(eps_high: float | None) -> None:
    b = make_batch(seed=4, spread=0.4)
    _, stats = grpo_loss(**b, settings=LossSettings(eps_low=0.2, eps_high=eps_high))
    high = 0.2 if eps_high is None else eps_high
    low_n = high_n = 0
    ratios = []
    for i, t in itertools.product(range(6), range(7)):
        if b["mask"][i, t]:
            r, a = math.exp(b["logp"][i, t] - b["old_logp"][i, t]), b["advantages"][i].item()
            ratios.append(r)
            low_n += r < 0.8 and a < 0
            high_n += r > 1 + high and a > 0
    n = len(ratios)
    assert low_n > 0 and high_n > 0
    assert stats["clip_frac_low"].item() == pytest.approx(low_n / n, abs=1e-12)
    assert stats["clip_frac_high"].item() == pytest.approx(high_n / n, abs=1e-12)
    assert stats["clip_frac"].item() == pytest.approx((low_n + high_n) / n, abs=1e-12)
    assert stats["ratio_mean"].item() == pytest.approx(sum(ratios) / n, abs=1e-12)
    assert stats["ratio_min"].item() == pytest.approx(min(ratios), abs=1e-12)
    assert stats["ratio_max"].item() == pytest.approx(max(ratios), abs=1e-12)
    assert all(v.dim() == 0 and not v.requires_grad for v in stats.values())


@pytest.mark.parametrize(("a", "loss", "grads", "low", "high"), [
    # ratios 1.5 and 0.5, eps 0.2. A = +1: min(1.5, 1.2) = 1.2 (clipped, no gradient) and
    # min(0.5, 0.8) = 0.5 (gradient rho * A = 0.5). Mean over the 2 tokens.
    (1.0, -(1.2 + 0.5) / 2, [0.0, -0.5 / 2], 0.0, 0.5),
    # A = -1: min(-1.5, -1.2) = -1.5 (gradient -1.5) and min(-0.5, -0.8) = -0.8 (clipped).
    (-1.0, (1.5 + 0.8) / 2, [1.5 / 2, 0.0], 0.5, 0.0),
])  # fmt: skip
def test_hand_computed_clipping(
    a: float, loss: float, grads: list[float], low: float, high: float
) -> None:
    old = torch.zeros(1, 2, dtype=F64)
    logp = torch.tensor([[math.log(1.5), math.log(0.5)]], dtype=F64, requires_grad=True)
    out, stats = grpo_loss(logp, old, None, torch.tensor([a], dtype=F64), torch.ones(1, 2))
    out.backward()
    assert out.item() == pytest.approx(loss, abs=1e-12)
    torch.testing.assert_close(logp.grad, torch.tensor([grads], dtype=F64))
    assert stats["clip_frac_low"].item() == low and stats["clip_frac_high"].item() == high
    assert stats["clip_frac"].item() == low + high


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_on_policy_gradient_is_minus_advantage_over_normaliser(loss_type: str) -> None:
    b = make_batch(seed=5)
    logp = b["logp"].clone().requires_grad_(True)
    settings = LossSettings(loss_type=loss_type)
    loss, _ = grpo_loss(logp, logp.detach(), None, b["advantages"], b["mask"], settings)
    loss.backward()
    m, adv = b["mask"], b["advantages"][:, None]
    lengths = m.sum(dim=1, keepdim=True)
    normaliser = {
        "grpo": lengths.clamp(min=1) * m.shape[0],
        "bnpo": m.sum(),
        "dapo": m.sum(),
        "dr_grpo": torch.tensor(m.numel(), dtype=F64),
    }[loss_type]
    torch.testing.assert_close(logp.grad, -adv * m / normaliser, rtol=1e-13, atol=0)
    # rho = 1 everywhere, so the loss is -sum(A * M) / normaliser.
    torch.testing.assert_close(loss, (-adv * m / normaliser).sum(), rtol=1e-13, atol=1e-15)


def test_kl_zero_at_reference_and_positive_elsewhere() -> None:
    b = make_batch(seed=6)
    args = (b["logp"], b["old_logp"])
    base, stats0 = grpo_loss(*args, None, b["advantages"], b["mask"])
    same, stats_same = grpo_loss(
        *args, b["logp"], b["advantages"], b["mask"], LossSettings(beta=0.5)
    )
    assert stats0["kl"].item() == 0 and stats_same["kl"].item() == 0
    torch.testing.assert_close(same, base)
    beta_half = LossSettings(beta=0.5)
    moved, stats_moved = grpo_loss(*args, b["ref_logp"], b["advantages"], b["mask"], beta_half)
    assert stats_moved["kl"] > 0 and moved > base
    # The KL statistic is reported even when it is not in the loss (beta = 0).
    _, stats_b0 = grpo_loss(*args, b["ref_logp"], b["advantages"], b["mask"])
    torch.testing.assert_close(stats_b0["kl"], stats_moved["kl"])
    # Every active token's k3 is positive: check one token at a time.
    m1 = torch.zeros_like(b["mask"])
    m1[0, 0] = 1
    _, s1 = grpo_loss(*args, b["ref_logp"], b["advantages"], m1)
    d = (b["ref_logp"][0, 0] - b["logp"][0, 0]).item()
    assert s1["kl"].item() == pytest.approx(math.exp(d) - d - 1, rel=1e-12) and s1["kl"] > 0


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_all_equal_groups_give_finite_zero_loss(loss_type: str) -> None:
    from grpo.advantages import group_advantages

    adv = group_advantages(torch.ones(6), group_size=3)
    b = make_batch(seed=7)
    logp = b["logp"].clone().requires_grad_(True)
    loss, _ = grpo_loss(
        logp, b["old_logp"], None, adv, b["mask"], LossSettings(loss_type=loss_type)
    )
    loss.backward()
    assert loss.item() == 0 and logp.grad.eq(0).all()


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradcheck(loss_type: str) -> None:
    b = make_batch(seed=8, n=4, t=5)

    def f(logp: torch.Tensor) -> torch.Tensor:
        settings = LossSettings(beta=0.1, eps_high=0.28, loss_type=loss_type)
        args = (logp, b["old_logp"], b["ref_logp"], b["advantages"], b["mask"], settings)
        return grpo_loss(*args, is_weights=b["is_weights"])[0]

    assert torch.autograd.gradcheck(f, (b["logp"].clone().requires_grad_(True),))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_large_log_ratios_stay_finite(dtype: torch.dtype, loss_type: str) -> None:
    # Tokens: log-ratio +50 and -50, advantages of both signs, reference 50 nats away both ways.
    delta = torch.tensor([[50.0, -50.0], [50.0, -50.0]])
    old = torch.zeros(2, 2, dtype=dtype)
    logp = delta.to(dtype).requires_grad_(True)
    ref = torch.tensor([[100.0, -100.0], [0.0, 0.0]], dtype=dtype)
    adv = torch.tensor([1.0, -1.0], dtype=dtype)
    settings = LossSettings(beta=0.1, loss_type=loss_type)
    loss, stats = grpo_loss(logp, old, ref, adv, torch.ones(2, 2), settings)
    loss.backward()
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert all(torch.isfinite(v) for v in stats.values())


def test_beyond_the_bound_the_clipped_branch_is_exact() -> None:
    # A > 0, rho = e^50: PPO's clipped branch (1 + eps) * A, no gradient.
    # A < 0, rho = e^-50: clipped branch (1 - eps) * A, no gradient.
    # A > 0, rho = e^-50: unclipped rho * A, gradient rho * A (tiny, computed exactly).
    logp = torch.tensor([[50.0], [-50.0], [-50.0]], dtype=F64, requires_grad=True)
    adv = torch.tensor([2.0, -2.0, 2.0], dtype=F64)
    loss, _ = grpo_loss(logp, torch.zeros(3, 1, dtype=F64), None, adv, torch.ones(3, 1))
    loss.backward()
    tiny = math.exp(-50) * 2
    assert loss.item() == pytest.approx((-1.2 * 2 + 0.8 * 2 - tiny) / 3, rel=1e-12)
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0], [0.0], [-tiny / 3]], dtype=F64))


def test_padding_values_are_never_read() -> None:
    b = make_batch(seed=9)
    pad = b["mask"] == 0
    clean = loss_and_grad(grpo_loss, b, settings=LossSettings(beta=0.1), is_weights=b["is_weights"])
    dirty = {k: v.clone() for k, v in b.items()}
    for key, value in [("logp", -math.inf), ("old_logp", math.nan), ("ref_logp", math.inf)]:
        dirty[key][pad] = value
    dirty["is_weights"][pad] = math.nan
    logp = dirty["logp"].clone().requires_grad_(True)
    args = (dirty["old_logp"], dirty["ref_logp"], dirty["advantages"], dirty["mask"])
    loss, _ = grpo_loss(logp, *args, LossSettings(beta=0.1), is_weights=dirty["is_weights"])
    loss.backward()
    torch.testing.assert_close(loss.detach(), clean[0])
    torch.testing.assert_close(logp.grad, clean[1])


def test_empty_row_contributes_zero_in_grpo_mode() -> None:
    b = make_batch(seed=10)
    keep = b["mask"].sum(dim=1) > 0
    full, _ = grpo_loss(b["logp"], b["old_logp"], None, b["advantages"], b["mask"])
    sub = [b[k][keep] for k in ("logp", "old_logp")]
    part, _ = grpo_loss(*sub, None, b["advantages"][keep], b["mask"][keep])
    # The empty row adds 0 to the sum but still counts in the mean over rows.
    torch.testing.assert_close(full, part * keep.sum() / len(keep))


def test_bool_and_float_masks_agree() -> None:
    b = make_batch(seed=11)
    a, _ = grpo_loss(b["logp"], b["old_logp"], None, b["advantages"], b["mask"])
    c, _ = grpo_loss(b["logp"], b["old_logp"], None, b["advantages"], b["mask"].bool())
    torch.testing.assert_close(a, c)


def test_bad_input_is_rejected() -> None:
    b = make_batch(seed=12)
    args = (b["logp"], b["old_logp"], None)
    adv_nan = b["advantages"].clone()
    adv_nan[1] = math.nan
    with pytest.raises(ValueError, match=r"NaN at rows \[1\]"):
        grpo_loss(*args, adv_nan, b["mask"])
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(*args, b["advantages"], b["mask"], LossSettings(beta=0.1))
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(*args, b["advantages"], b["mask"], LossSettings(loss_type="ppo"))
    with pytest.raises(ValueError, match="0 and 1"):
        grpo_loss(*args, b["advantages"], b["mask"] * 0.5)
    with pytest.raises(ValueError, match="old_logp"):
        grpo_loss(b["logp"], b["old_logp"][:, 1:], None, b["advantages"], b["mask"])
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(*args, b["advantages"][1:], b["mask"])
    with pytest.raises(ValueError, match="max_completion_length"):
        dr2 = LossSettings(loss_type="dr_grpo", max_completion_length=2)
        grpo_loss(*args, b["advantages"], b["mask"], dr2)
    with pytest.raises(ValueError, match="num_items"):
        grpo_loss(*args, b["advantages"], b["mask"], LossSettings(loss_type="dapo"), num_items=0)
    with pytest.raises(ValueError, match="eps_low"):
        grpo_loss(*args, b["advantages"], b["mask"], LossSettings(eps_low=1.0))


def frozen_loss_before_settings(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    eps_low: float,
    eps_high: float,
    loss_type: str,
    max_len: int | None,
    num_items: float | None,
    is_weights: torch.Tensor | None,
) -> torch.Tensor:
    """A frozen copy of grpo_loss's arithmetic before LossSettings existed (commit 1d6bb08)."""
    dtype = torch.promote_types(logp.dtype, torch.float32)
    m = mask.bool()  # [N, T]
    logp = logp.to(dtype)  # [N, T]
    adv = advantages.detach().to(dtype).unsqueeze(1)  # [N, 1]
    log_ratio = torch.where(m, logp - old_logp.detach().to(dtype), 0.0)  # [N, T]
    ratio = torch.exp(log_ratio.clamp(max=20.0))  # [N, T]
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high)  # [N, T]
    per_token = -torch.minimum(ratio * adv, clipped * adv)  # [N, T]
    if is_weights is not None:
        per_token = per_token * torch.where(m, is_weights.detach().to(dtype), 0.0)  # [N, T]
    kl = torch.zeros_like(logp)  # [N, T]
    if ref_logp is not None:
        d = torch.where(m, ref_logp.detach().to(dtype) - logp, 0.0).clamp(max=20.0)  # [N, T]
        kl = torch.exp(d) - d - 1  # [N, T]
    if beta > 0:
        per_token = per_token + beta * kl  # [N, T]
    per_token = torch.where(m, per_token, 0.0)  # [N, T]
    mf = m.to(dtype)  # [N, T]
    row_sum, lengths = per_token.sum(dim=1), mf.sum(dim=1)  # [N], [N]
    if loss_type == "grpo":
        return (row_sum / lengths.clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return row_sum.sum() / lengths.sum().clamp(min=1.0)
    if loss_type == "dapo":
        if num_items is None:
            return row_sum.sum() / lengths.sum().clamp(min=1.0)
        return row_sum.sum() / num_items
    return row_sum.sum() / (
        per_token.shape[0] * (per_token.shape[1] if max_len is None else max_len)
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("loss_type", "beta", "eps_high", "use_w"), CASES)
def test_defaults_are_bit_identical_to_the_formula_before_settings(
    loss_type: str, beta: float, eps_high: float | None, use_w: bool, dtype: torch.dtype
) -> None:
    b = {k: v.to(dtype) for k, v in make_batch(seed=21, n=8, t=9, spread=0.5).items()}
    w = b["is_weights"] if use_w else None
    kw = {"beta": beta, "eps_low": 0.2, "loss_type": loss_type}
    for max_len, num_items in [(None, None), (12, 61.0)]:
        settings = LossSettings(**kw, eps_high=eps_high, max_completion_length=max_len)
        logp = b["logp"].clone().requires_grad_(True)
        args = (b["old_logp"], b["ref_logp"], b["advantages"], b["mask"])
        loss, _ = grpo_loss(logp, *args, settings, num_items=num_items, is_weights=w)
        (grad,) = torch.autograd.grad(loss, logp)
        logp2 = b["logp"].clone().requires_grad_(True)
        high = 0.2 if eps_high is None else eps_high
        frozen = frozen_loss_before_settings(logp2, *args, **kw, eps_high=high, max_len=max_len,
                                             num_items=num_items, is_weights=w)  # fmt: skip
        (frozen_grad,) = torch.autograd.grad(frozen, logp2)
        assert torch.equal(loss, frozen) and torch.equal(grad, frozen_grad)
