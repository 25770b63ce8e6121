"""The loss variants (GSPO, CISPO, SAPO, two-sided and dual clip, KL estimators, entropy bonus and
top-entropy mask) against a slow token-by-token reference written from the papers' formulas, and
on hand-derived numbers. Float64, ragged masks, G = 4, both advantage signs, every clip hit."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from grpo.advantages import group_advantages
from grpo.loss import (
    IS_LEVELS,
    KL_ESTIMATORS,
    LOSS_TYPES,
    POLICY_LOSSES,
    LossSettings,
    entropy_threshold,
    grpo_loss,
    high_entropy_mask,
    kl_estimate,
)

F64 = torch.float64
G = 4


def const(x: float) -> torch.Tensor:
    """A constant (no gradient)."""
    return torch.tensor(x, dtype=F64)


def python_quantile(values: list[float], q: float) -> float:
    """Linear-interpolation quantile, by hand."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (pos - lo) * (v[hi] - v[lo])


def reference_token_ratio(
    logp: torch.Tensor, old: torch.Tensor, i: int, t: int, active: list[int], level: str
) -> torch.Tensor:
    """rho_{i,t} (PPO), s_i (GSPO) or sg[s_i] * pi / sg[pi] (GSPO-token)."""
    if level == "token":
        return torch.exp(logp[i, t] - old[i, t])
    total = const(0.0)
    for u in active:
        total = total + (logp[i, u] - old[i, u])
    s_i = torch.exp(total / len(active))
    if level == "sequence":
        return s_i
    return s_i.detach() * torch.exp(logp[i, t] - logp[i, t].detach())


def reference_policy_token(rho: torch.Tensor, logp_t: torch.Tensor, a: float, s: LossSettings):
    """One token's policy loss, each paper's formula written as branches on plain numbers."""
    lo, hi = 1 - s.eps_low, 1 + s.clip_high
    r = rho.item()
    if s.policy_loss == "cispo":  # -sg[clip(rho)] * A * logp
        return -min(max(r, lo), hi) * a * logp_t
    if s.policy_loss == "sapo":  # -sigmoid(tau (rho - 1)) * 4 / tau * A
        tau = s.sapo_tau_pos if a > 0 else s.sapo_tau_neg
        return -(1 / (1 + torch.exp(-tau * (rho - 1)))) * 4 / tau * a
    unclipped = const(s.delta) if s.delta is not None and r > s.delta else rho  # INTELLECT-2
    clipped = const(lo) if r < lo else const(hi) if r > hi else rho
    u, c = unclipped * a, clipped * a
    token = -(u if u.item() <= c.item() else c)
    if s.clip_ratio_c is not None and a < 0 and token.item() > -s.clip_ratio_c * a:
        token = const(-s.clip_ratio_c * a)  # dual clip: min(l, -c A) for A < 0
    return token


def reference_kl(lp: torch.Tensor, rf: torch.Tensor, estimator: str) -> torch.Tensor:
    x = rf - lp
    if estimator == "k1":
        return lp - rf
    if estimator == "k2":
        return 0.5 * (lp - rf) ** 2
    k3 = torch.exp(x) - x - 1
    if estimator == "low_var_kl" and abs(k3.item()) > 10:
        return const(math.copysign(10.0, k3.item()))
    return k3


def reference_loss(
    logp: torch.Tensor,
    old: torch.Tensor,
    ref: torch.Tensor | None,
    adv: torch.Tensor,
    mask: torch.Tensor,
    s: LossSettings,
    num_items: float | None = None,
    w: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> torch.Tensor:
    n_rows, n_cols = logp.shape
    threshold = -math.inf
    if s.top_entropy_quantile < 1:
        active_h = [
            entropy[i, t].item() for i in range(n_rows) for t in range(n_cols) if mask[i, t]
        ]
        threshold = python_quantile(active_h, 1 - s.top_entropy_quantile)
    row_sums, row_lens = [], []
    for i in range(n_rows):
        active = [t for t in range(n_cols) if mask[i, t]]
        a = float(adv[i])
        row_sum = const(0.0)
        for t in active:
            rho = reference_token_ratio(logp, old, i, t, active, s.importance_sampling_level)
            token = reference_policy_token(rho, logp[i, t], a, s)
            if w is not None:
                token = token * w[i, t]
            if entropy is not None and entropy[i, t].item() < threshold:
                token = token * 0.0
            if s.beta and not s.kl_in_reward:
                token = token + s.beta * reference_kl(logp[i, t], ref[i, t], s.kl_estimator)
            if s.entropy_coef:
                token = token - s.entropy_coef * entropy[i, t]
            row_sum = row_sum + token
        row_sums.append(row_sum)
        row_lens.append(len(active))
    total = sum(row_sums)
    if s.loss_type == "grpo":
        return sum(x / max(n, 1) for x, n in zip(row_sums, row_lens, strict=True)) / n_rows
    if s.loss_type == "bnpo":
        return total / max(sum(row_lens), 1)
    if s.loss_type == "dapo":
        return total / (num_items if num_items is not None else max(sum(row_lens), 1))
    length = s.max_completion_length or n_cols
    return total / (n_rows * length)


def make_batch(seed: int, n: int = 12, t: int = 9, spread: float = 0.4) -> dict[str, torch.Tensor]:
    """Group-major float64 batch (G = 4): ragged masks (row 2 empty), advantages of both signs
    from group_advantages, per-token weights and entropies."""
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n, t, generator=gen, dtype=F64) * 3
    lengths = torch.randint(1, t + 1, (n,), generator=gen)
    lengths[2] = 0
    return {
        "logp": logp,
        "old_logp": logp + spread * torch.randn(n, t, generator=gen, dtype=F64),
        "ref_logp": logp + spread * torch.randn(n, t, generator=gen, dtype=F64),
        "advantages": group_advantages(torch.randn(n, generator=gen, dtype=F64), G),
        "mask": (torch.arange(t)[None, :] < lengths[:, None]).to(F64),
        "is_weights": torch.rand(n, t, generator=gen, dtype=F64) + 0.5,
        "entropy": torch.rand(n, t, generator=gen, dtype=F64) * 3,
    }


def eps_for(level: str) -> dict[str, float]:
    """Clip ranges that both sides of the batch's ratios cross (sequence ratios are closer to 1)."""
    return (
        {"eps_low": 0.2, "eps_high": 0.28}
        if level == "token"
        else {"eps_low": 0.04, "eps_high": 0.06}
    )


def caps_for(level: str) -> dict[str, float]:
    return (
        {"delta": 1.35, "clip_ratio_c": 1.5}
        if level == "token"
        else {"delta": 1.1, "clip_ratio_c": 1.15}
    )


def run(fn, b: dict[str, torch.Tensor], s: LossSettings, *, w: bool, num_items=None):
    """(loss, d loss / d logp, d loss / d entropy) in float64."""
    logp = b["logp"].clone().requires_grad_(True)
    entropy = b["entropy"].clone().requires_grad_(True)
    args = (logp, b["old_logp"], b["ref_logp"], b["advantages"], b["mask"], s)
    weights = b["is_weights"] if w else None
    use_h = s.needs_entropy
    if fn is grpo_loss:
        loss = grpo_loss(
            *args, num_items=num_items, is_weights=weights, entropy=entropy if use_h else None
        )[0]
    else:
        loss = fn(*args, num_items=num_items, w=weights, entropy=entropy if use_h else None)
    inputs = [logp, entropy] if use_h else [logp]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)
    return loss.detach(), grads[0], grads[1] if use_h else None


def assert_matches(s: LossSettings, *, w: bool = True, seed: int = 3, num_items=None) -> None:
    b = make_batch(seed)
    loss, grad, grad_h = run(grpo_loss, b, s, w=w, num_items=num_items)
    ref_loss, ref_grad, ref_grad_h = run(reference_loss, b, s, w=w, num_items=num_items)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-13)
    if grad_h is not None:
        torch.testing.assert_close(grad_h, ref_grad_h, rtol=1e-10, atol=1e-13)


# --- loop references --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("level", "policy", "loss_type"), list(itertools.product(IS_LEVELS, POLICY_LOSSES, LOSS_TYPES))
)
def test_levels_and_policy_losses_match_reference(level: str, policy: str, loss_type: str) -> None:
    s = LossSettings(
        loss_type=loss_type, beta=0.04, importance_sampling_level=level, policy_loss=policy,
        max_completion_length=11 if loss_type == "dr_grpo" else None, **eps_for(level),
    )  # fmt: skip
    assert_matches(s, num_items=70.0 if loss_type == "dapo" else None)
    assert_matches(s, w=False)


@pytest.mark.parametrize("level", IS_LEVELS)
@pytest.mark.parametrize("cap", ["delta", "clip_ratio_c", "both"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_two_sided_and_dual_clip_match_reference(level: str, cap: str, loss_type: str) -> None:
    caps = caps_for(level)
    chosen = caps if cap == "both" else {cap: caps[cap]}
    s = LossSettings(
        loss_type=loss_type, importance_sampling_level=level, **eps_for(level), **chosen
    )
    assert_matches(s)


def test_reference_batch_exercises_every_clip() -> None:
    # Guards the tests above: each clip side, delta and the dual clip must be reached.
    b = make_batch(3)
    args = (b["logp"], b["old_logp"], None, b["advantages"], b["mask"])
    for level in IS_LEVELS:
        s = LossSettings(importance_sampling_level=level, **eps_for(level), **caps_for(level))
        _, stats = grpo_loss(*args, s)
        for key in ("clip_frac_low", "clip_frac_high", "clip_frac_delta", "clip_frac_dual"):
            assert stats[key] > 0, (level, key)
        _, cispo = grpo_loss(
            *args,
            LossSettings(policy_loss="cispo", importance_sampling_level=level, **eps_for(level)),
        )
        assert cispo["clip_frac_low"] > 0 and cispo["clip_frac_high"] > 0
    assert (b["advantages"] > 0).any() and (b["advantages"] < 0).any()


@pytest.mark.parametrize(
    ("estimator", "loss_type"), list(itertools.product(KL_ESTIMATORS, LOSS_TYPES))
)
def test_kl_estimators_match_reference(estimator: str, loss_type: str) -> None:
    assert_matches(LossSettings(loss_type=loss_type, beta=0.3, kl_estimator=estimator))


def test_low_var_kl_clamp_is_exercised_and_matches_reference() -> None:
    b = make_batch(3)
    far = b["ref_logp"].clone()
    row = int(b["mask"].sum(dim=1).argmax())  # a row with at least 3 tokens
    # x = 13, 25 (clamped to 20), -14: k3 = e^13 - 14, e^20 - 21, e^-14 + 13, all above 10.
    far[row, :3] = b["logp"][row, :3] + torch.tensor([13.0, 25.0, -14.0], dtype=F64)
    b["ref_logp"] = far
    s = LossSettings(beta=0.3, kl_estimator="low_var_kl")
    loss, grad, _ = run(grpo_loss, b, s, w=True)
    ref_loss, ref_grad, _ = run(reference_loss, b, s, w=True)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-13)
    kl = kl_estimate(b["logp"], far, b["mask"], "low_var_kl")
    assert kl[row, :3].tolist() == [10.0, 10.0, 10.0]


@pytest.mark.parametrize(
    ("policy", "loss_type"), list(itertools.product(POLICY_LOSSES, LOSS_TYPES))
)
@pytest.mark.parametrize("coef", [0.0, 0.05])
def test_entropy_bonus_and_top_entropy_mask_match_reference(
    policy: str, loss_type: str, coef: float
) -> None:
    # rho = 0.3 over 55 active tokens: quantile position 0.7 * 54 = 37.8, not a tie.
    for rho in (1.0, 0.3):
        s = LossSettings(loss_type=loss_type, beta=0.04, policy_loss=policy, entropy_coef=coef,
                         top_entropy_quantile=rho)  # fmt: skip
        if s.needs_entropy:
            assert_matches(s)


def test_kl_in_reward_drops_the_loss_kl_but_reports_it() -> None:
    b = make_batch(5)
    args = (b["logp"], b["old_logp"], b["ref_logp"], b["advantages"], b["mask"])
    on, stats_on = grpo_loss(*args, LossSettings(beta=0.5, kl_in_reward=True))
    no_kl, stats_none = grpo_loss(*args, LossSettings())
    assert torch.equal(on, no_kl) and stats_on["kl"] > 0
    torch.testing.assert_close(stats_on["kl"], stats_none["kl"])
    # ...and ref_logp is then optional.
    grpo_loss(
        b["logp"],
        b["old_logp"],
        None,
        b["advantages"],
        b["mask"],
        LossSettings(beta=0.5, kl_in_reward=True),
    )


# --- hand-computed cases ----------------------------------------------------------------------


def one_row(logp: list[float], a: float, s: LossSettings, **kw) -> tuple[float, list[float], dict]:
    x = torch.tensor([logp], dtype=F64, requires_grad=True)
    old = torch.zeros(1, len(logp), dtype=F64)
    loss, stats = grpo_loss(x, old, kw.pop("ref", None), torch.tensor([a], dtype=F64),
                            torch.ones(1, len(logp)), s, **kw)  # fmt: skip
    loss.backward()
    return loss.item(), x.grad[0].tolist(), stats


L2, L15, L05 = math.log(2.0), math.log(1.5), math.log(0.5)
R2 = math.sqrt(2.0)


def test_hand_gspo_sequence_ratio() -> None:
    # logp - old = [ln 2, 0]: s = exp(ln 2 / 2) = sqrt 2 = 1.4142 for both tokens.
    # A = +1: clipped at 1.2, loss -1.2, no gradient.
    loss, grad, stats = one_row([L2, 0.0], 1.0, LossSettings(importance_sampling_level="sequence"))
    assert loss == pytest.approx(-1.2, abs=1e-12) and grad == [0.0, 0.0]
    assert stats["ratio_min"].item() == pytest.approx(R2) and stats["clip_frac_high"] == 1
    # A = -1: the unclipped sqrt 2 wins, loss sqrt 2; d s / d logp_t = s / |o| = sqrt 2 / 2 for
    # each token, even the one whose own ratio is 1.
    loss, grad, _ = one_row([L2, 0.0], -1.0, LossSettings(importance_sampling_level="sequence"))
    assert loss == pytest.approx(R2, abs=1e-12)
    assert grad == pytest.approx([R2 / 2, R2 / 2], abs=1e-12)


def test_hand_gspo_token_differs_from_gspo_only_in_gradient() -> None:
    # Same row, A = -1, per-token weights w = [1, 0.5] (grpo: mean over 2 tokens).
    # sequence:       loss_t = s w_t, loss = s (1 + 0.5) / 2 = 0.75 sqrt 2;
    #                 d loss / d logp_t = (1.5 / 2) s / 2 = 0.375 sqrt 2 for both tokens.
    # sequence_token: same value; d s_{i,t} / d logp_t = s for its own token only, so
    #                 d loss / d logp_t = w_t s / 2 = [0.5 sqrt 2, 0.25 sqrt 2].
    w = torch.tensor([[1.0, 0.5]], dtype=F64)
    seq = one_row([L2, 0.0], -1.0, LossSettings(importance_sampling_level="sequence"), is_weights=w)
    tok = one_row(
        [L2, 0.0], -1.0, LossSettings(importance_sampling_level="sequence_token"), is_weights=w
    )
    assert seq[0] == pytest.approx(0.75 * R2, abs=1e-12) and tok[0] == pytest.approx(
        0.75 * R2, abs=1e-12
    )
    assert seq[1] == pytest.approx([0.375 * R2, 0.375 * R2], abs=1e-12)
    assert tok[1] == pytest.approx([0.5 * R2, 0.25 * R2], abs=1e-12)


def test_hand_cispo_keeps_the_gradient_of_clipped_tokens() -> None:
    # ratios 1.5, 0.5, eps 0.2: weights clip to 1.2 and 0.8. A = +1:
    # loss = (-1.2 ln 1.5 - 0.8 ln 0.5) / 2 = (-0.486558 + 0.554518) / 2 = 0.033980;
    # gradient -w_t A / 2 = [-0.6, -0.4] (PPO would give [0, -0.25]).
    loss, grad, stats = one_row([L15, L05], 1.0, LossSettings(policy_loss="cispo"))
    assert loss == pytest.approx((-1.2 * L15 - 0.8 * L05) / 2, abs=1e-12)
    assert loss == pytest.approx(0.033980, abs=1e-6)
    assert grad == pytest.approx([-0.6, -0.4], abs=1e-12)
    assert stats["clip_frac_low"] == 0.5 and stats["clip_frac_high"] == 0.5


def test_hand_sapo_gate() -> None:
    # On-policy, rho = 1: gate = sigmoid(0) 4 / tau = 2 / tau; d gate / d rho = 4 * 1/4 = 1.
    # A = +1, tau_pos = 1: loss -2, gradient -1 (PPO's). A = -1, tau_neg = 1.05: loss 2 / 1.05.
    loss, grad, _ = one_row([0.0], 1.0, LossSettings(policy_loss="sapo"))
    assert loss == pytest.approx(-2.0, abs=1e-12) and grad == pytest.approx([-1.0], abs=1e-12)
    loss, grad, _ = one_row([0.0], -1.0, LossSettings(policy_loss="sapo"))
    assert loss == pytest.approx(2 / 1.05, abs=1e-12) and grad == pytest.approx([1.0], abs=1e-12)
    # rho = 1.5, A = +1, tau = 1: sigma(0.5) = 0.6224593, gate 2.4898373; gradient
    # -4 sigma (1 - sigma) rho = -4 * 0.2350037 * 1.5 = -1.4100222 (soft, not PPO's hard 0).
    loss, grad, _ = one_row([L15], 1.0, LossSettings(policy_loss="sapo"))
    assert loss == pytest.approx(-2.4898373, abs=1e-7) and grad == pytest.approx(
        [-1.4100222], abs=1e-7
    )


def test_hand_two_sided_clip() -> None:
    # A = -1, rho = 2, eps 0.2: PPO loss -min(-2, -1.2) = 2 with gradient 2;
    # delta = 1.5 caps it: -min(-1.5, -1.2) = 1.5 with gradient 0. A = +1: -1.2 either way.
    assert one_row([L2], -1.0, LossSettings())[:2] == (pytest.approx(2.0), pytest.approx([2.0]))
    assert one_row([L2], -1.0, LossSettings(delta=1.5))[:2] == (pytest.approx(1.5), [0.0])
    assert one_row([L2], 1.0, LossSettings(delta=1.5))[:2] == (pytest.approx(-1.2), [0.0])


def test_hand_dual_clip() -> None:
    # c = 1.8. A = -1, rho = 2: min(2, 1.8) = 1.8, gradient 0. rho = 1.5: 1.5 < 1.8 stays,
    # gradient 1.5. A = -2, rho = 2: min(4, 3.6) = 3.6. A = +1, rho = 2: -1.2 unchanged.
    assert one_row([L2], -1.0, LossSettings(clip_ratio_c=1.8))[:2] == (pytest.approx(1.8), [0.0])
    loss, grad, stats = one_row([L15], -1.0, LossSettings(clip_ratio_c=1.8))
    assert (
        loss == pytest.approx(1.5) and grad == pytest.approx([1.5]) and stats["clip_frac_dual"] == 0
    )
    assert one_row([L2], -2.0, LossSettings(clip_ratio_c=1.8))[0] == pytest.approx(3.6)
    assert one_row([L2], 1.0, LossSettings(clip_ratio_c=1.8))[0] == pytest.approx(-1.2)


@pytest.mark.parametrize(("estimator", "value", "grad"), [
    # logp = 0, ref = ln 2, x = ref - logp = ln 2 = 0.693147:
    ("k1", -L2, 1.0),                  # logp - ref; gradient 1
    ("k2", 0.5 * L2**2, -L2),          # 0.240227; gradient logp - ref
    ("k3", 2 - L2 - 1, 1 - 2.0),       # e^x - x - 1 = 0.306853; gradient 1 - e^x = -1
    ("low_var_kl", 2 - L2 - 1, -1.0),  # inside [-10, 10]: k3
])  # fmt: skip
def test_hand_kl_estimators(estimator: str, value: float, grad: float) -> None:
    # beta = 1, A = 0 (no policy term): the loss is the KL of the single token.
    ref = torch.tensor([[L2]], dtype=F64)
    loss, g, stats = one_row([0.0], 0.0, LossSettings(beta=1.0, kl_estimator=estimator), ref=ref)
    assert loss == pytest.approx(value, abs=1e-12) and g == pytest.approx([grad], abs=1e-12)
    assert stats["kl"].item() == pytest.approx(value, abs=1e-12)
    # ref 30 nats above: k3 = e^20 - 21 after the clamp; low_var_kl = 10 with zero gradient.
    far = one_row([0.0], 0.0, LossSettings(beta=1.0, kl_estimator="low_var_kl"), ref=ref + 30)
    assert far[:2] == (10.0, [0.0])


def test_hand_entropy_bonus() -> None:
    # A = 0, entropies [1, 3], coef 0.1, grpo: loss = -0.1 (1 + 3) / 2 = -0.2,
    # d loss / d H_t = -0.1 / 2 = -0.05.
    h = torch.tensor([[1.0, 3.0]], dtype=F64, requires_grad=True)
    x = torch.zeros(1, 2, dtype=F64, requires_grad=True)
    s = LossSettings(entropy_coef=0.1)
    loss, _ = grpo_loss(
        x, x.detach(), None, torch.zeros(1, dtype=F64), torch.ones(1, 2), s, entropy=h
    )
    loss.backward()
    assert loss.item() == pytest.approx(-0.2) and h.grad[0].tolist() == pytest.approx(
        [-0.05, -0.05]
    )


def test_hand_top_entropy_mask() -> None:
    # Active entropies 0, 1, 2, 3, 4 (the 9 is padding). rho = 0.5: quantile 0.5, position
    # 0.5 * 4 = 2, threshold 2, keep {2, 3, 4}. rho = 0.4: position 0.6 * 4 = 2.4, threshold
    # 2 + 0.4 * (3 - 2) = 2.4, keep {3, 4}. rho = 1: threshold = min = 0, keep all.
    h = torch.tensor([[0.0, 3.0, 9.0], [4.0, 1.0, 2.0]], dtype=F64)
    m = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=F64)
    keep, thr = high_entropy_mask(h, m, 0.5)
    assert thr.item() == 2.0 and keep.tolist() == [[False, True, False], [True, False, True]]
    keep, thr = high_entropy_mask(h, m, 0.4)
    assert thr.item() == pytest.approx(2.4) and keep.tolist() == [
        [False, True, False],
        [True, False, False],
    ]
    assert high_entropy_mask(h, m, 1.0)[0].tolist() == [[True, True, False], [True, True, True]]
    # In the loss: A = +1 on-policy, grpo over 5 tokens... per row: row 0 keeps 1 of 2 tokens.
    x = torch.zeros(2, 3, dtype=F64, requires_grad=True)
    adv = torch.ones(2, dtype=F64)
    loss, stats = grpo_loss(
        x, x.detach(), None, adv, m, LossSettings(top_entropy_quantile=0.4), entropy=h
    )
    loss.backward()
    # row 0: -(0 + 1) / 2; row 1: -(1 + 0 + 0) / 3; mean = -(1/2 + 1/3) / 2 = -5/12.
    assert loss.item() == pytest.approx(-5 / 12)
    torch.testing.assert_close(
        x.grad, torch.tensor([[0.0, -0.25, 0.0], [-1 / 6, 0.0, 0.0]], dtype=F64)
    )
    assert stats["entropy_kept_frac"].item() == pytest.approx(2 / 5)
    assert stats["entropy_threshold"].item() == pytest.approx(2.4)


def test_quantile_matches_torch_quantile() -> None:
    gen = torch.Generator().manual_seed(0)
    h = torch.rand(7, 13, generator=gen, dtype=F64)
    m = torch.rand(7, 13, generator=gen) > 0.3
    for rho in (0.0, 0.2, 0.37, 0.5, 1.0):
        expected = torch.quantile(h[m], 1 - rho)
        torch.testing.assert_close(entropy_threshold(h, m, rho), expected, rtol=1e-14, atol=0)
    assert entropy_threshold(h, torch.zeros_like(m), 0.2).item() == math.inf


# --- numerics and validation ------------------------------------------------------------------


@pytest.mark.parametrize("level", IS_LEVELS)
@pytest.mark.parametrize("policy", POLICY_LOSSES)
def test_variants_ignore_padding_and_stay_finite(level: str, policy: str) -> None:
    b = make_batch(9)
    pad = b["mask"] == 0
    s = LossSettings(
        beta=0.1, importance_sampling_level=level, policy_loss=policy, entropy_coef=0.01,
        top_entropy_quantile=0.5, kl_estimator="k2",
    )  # fmt: skip
    clean = run(grpo_loss, b, s, w=True)
    dirty = {k: v.clone() for k, v in b.items()}
    for key, value in [("logp", -math.inf), ("old_logp", math.nan), ("ref_logp", math.inf),
                       ("is_weights", math.nan), ("entropy", math.nan)]:  # fmt: skip
        dirty[key][pad] = value
    out = run(grpo_loss, dirty, s, w=True)
    for a, c in zip(out, clean, strict=True):
        torch.testing.assert_close(a, c)
    # +-50 nats of log-ratio: finite loss and gradient.
    big = {k: v.clone() for k, v in b.items()}
    big["old_logp"] = big["logp"] + 50.0 * torch.sign(
        torch.randn(big["logp"].shape, generator=torch.Generator().manual_seed(1))
    )
    assert all(torch.isfinite(t).all() for t in run(grpo_loss, big, s, w=True))


@pytest.mark.parametrize(("kw", "match"), [
    ({"importance_sampling_level": "seq"}, "importance_sampling_level"),
    ({"policy_loss": "grpo"}, "policy_loss"),
    ({"kl_estimator": "k4"}, "kl_estimator"),
    ({"delta": 1.1}, "delta"),                            # not above 1 + eps_high = 1.2
    ({"delta": 2.0, "policy_loss": "cispo"}, "delta"),
    ({"clip_ratio_c": 1.0}, "clip_ratio_c"),
    ({"clip_ratio_c": 3.0, "policy_loss": "sapo"}, "clip_ratio_c"),
    ({"sapo_tau_neg": 0.0}, "sapo_tau"),
    ({"kl_in_reward": True}, "kl_in_reward"),
    ({"entropy_coef": math.nan}, "entropy_coef"),
    ({"top_entropy_quantile": 1.5}, "top_entropy_quantile"),
    ({"beta": -1.0}, "beta"),
    ({"max_completion_length": 0}, "max_completion_length"),
])  # fmt: skip
def test_bad_settings_are_rejected(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LossSettings(**kw)


def test_missing_entropy_is_rejected() -> None:
    b = make_batch(1)
    args = (b["logp"], b["old_logp"], None, b["advantages"], b["mask"])
    with pytest.raises(ValueError, match="entropy"):
        grpo_loss(*args, LossSettings(entropy_coef=0.1))
    with pytest.raises(ValueError, match="entropy"):
        grpo_loss(*args, LossSettings(top_entropy_quantile=0.2))
    with pytest.raises(ValueError, match="entropy"):
        grpo_loss(*args, entropy=b["entropy"][:, 1:])
    with pytest.raises(ValueError, match="kl_estimator"):
        kl_estimate(b["logp"], b["ref_logp"], b["mask"], "k5")


def test_settings_are_frozen() -> None:
    with pytest.raises(AttributeError):
        LossSettings().beta = 1.0  # type: ignore[misc]
