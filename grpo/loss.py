"""The GRPO loss: PPO's clipped surrogate with group advantages, a k3 KL penalty, and the four
ways of averaging token losses that the literature uses. Derivation: docs/algorithm.md.

Per token t of completion i, with mask M (1 = completion token, 0 = padding)::

    rho   = exp(logp - old_logp)
    l     = -min(rho * A_i, clip(rho, 1 - eps_low, 1 + eps_high) * A_i) * w     (w: is_weights)
    kl    = exp(ref_logp - logp) - (ref_logp - logp) - 1                     (k3, always >= 0)
    loss_t = l + beta * kl

aggregated by ``loss_type`` (N rows; M_i = sum_t M_it, its completion length)::

    grpo     mean_i (sum_t loss_t M / max(M_i, 1))   per-sequence mean (DeepSeekMath)
    bnpo     sum loss_t M / sum M                    token mean of the local batch
    dapo     sum loss_t M / num_items * world_size   token mean of the generation batch (DAPO)
    dr_grpo  sum loss_t M / (N * max_completion_length)   constant normaliser (Dr. GRPO)

Distributed convention: each rank returns a loss whose MEAN over ranks is the global loss,
which is what DDP's gradient averaging assumes. grpo and dr_grpo have it when ranks hold equal
row counts; dapo divides by the all-rank token count ``num_items`` and so is scaled by the world
size. bnpo is by definition local.

Numerics: computed in at least float32 (float64 stays float64); gradients flow through logp
only. Log-ratios are clamped from above at LOG_RATIO_BOUND = 20 before exp (exp of a negative is
harmless). The clip range lies inside (0, e^20), so wherever logp - old_logp <= 20 everything is
PPO's exactly; above it, A > 0 was on the constant clipped branch anyway, and only A < 0 changes:
PPO's unbounded rho * |A| is capped at e^20 * |A| with zero gradient. kl is capped likewise where
ref_logp - logp > 20. Padding positions are never read: they may hold anything, even NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from grpo.distributed import get_world_size

LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")
LOG_RATIO_BOUND = 20.0


def _check_inputs(
    logp: Tensor, named: dict[str, Tensor | None], advantages: Tensor, mask: Tensor
) -> None:
    """Raise ValueError naming the offending tensor."""
    if logp.dim() != 2 or not logp.is_floating_point():
        raise ValueError(f"logp must be a [N, T] float tensor, got {logp.dtype} {logp.shape}")
    if logp.shape[0] == 0:
        raise ValueError("empty batch: logp has no rows")
    for name, t in named.items():
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, logp {tuple(logp.shape)}")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must be [{logp.shape[0]}], got {tuple(advantages.shape)}")
    if torch.isnan(advantages).any():
        rows = torch.isnan(advantages).nonzero().flatten().tolist()
        raise ValueError(f"advantages are NaN at rows {rows}: drop rows without a reward first")
    if ((mask != 0) & (mask != 1)).any():
        raise ValueError("mask must hold only 0 and 1")


@dataclass(frozen=True)
class LossSettings:
    """Every option of `grpo_loss`, validated once. The defaults are plain GRPO (DeepSeekMath).

    loss_type: how token losses are averaged, one of LOSS_TYPES (module docstring).
    beta: KL coefficient, >= 0 (0: no KL term, ref_logp may be None).
    eps_low, eps_high: the clip range [1 - eps_low, 1 + eps_high]; eps_high=None means eps_low.
    max_completion_length: the dr_grpo denominator (None: the padded width T).
    """

    loss_type: str = "grpo"
    beta: float = 0.0
    eps_low: float = 0.2
    eps_high: float | None = None
    max_completion_length: int | None = None

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if not self.beta >= 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        # The clip range must stay inside the clamp's range, or clamping would change the clip.
        high = self.clip_high
        if not (0 <= self.eps_low < 1 and high >= 0 and math.log1p(high) < LOG_RATIO_BOUND):
            raise ValueError(
                f"need 0 <= eps_low < 1 and 0 <= eps_high < e^20 - 1, got eps_low={self.eps_low}, "
                f"eps_high={self.eps_high}"
            )
        if self.max_completion_length is not None and self.max_completion_length < 1:
            raise ValueError(
                f"max_completion_length must be None or >= 1, got {self.max_completion_length}"
            )

    @property
    def clip_high(self) -> float:
        """eps_high, with None resolved to eps_low."""
        return self.eps_low if self.eps_high is None else self.eps_high


def _aggregate(
    per_token: Tensor,
    mf: Tensor,
    loss_type: str,
    max_len: int | None,
    num_items: float | Tensor | None,
) -> Tensor:
    """Reduce masked token losses [N, T] (already zero on padding) to the scalar loss."""
    row_sum = per_token.sum(dim=1)  # [N]
    lengths = mf.sum(dim=1)  # [N]
    if loss_type == "grpo":
        return (row_sum / lengths.clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return row_sum.sum() / lengths.sum().clamp(min=1.0)
    if loss_type == "dapo":
        if num_items is None:
            return row_sum.sum() / lengths.sum().clamp(min=1.0) * get_world_size()
        if float(num_items) <= 0:
            raise ValueError(f"num_items must be > 0, got {num_items}")
        return row_sum.sum() / num_items * get_world_size()
    length = per_token.shape[1] if max_len is None else max_len
    if length < 1 or lengths.max() > length:
        longest = int(lengths.max())
        raise ValueError(f"dr_grpo: max_completion_length={length} < completion of {longest}")
    return row_sum.sum() / (per_token.shape[0] * length)


def _stats(
    ratio: Tensor, adv: Tensor, kl: Tensor, m: Tensor, eps_low: float, eps_high: float
) -> dict[str, Tensor]:
    """Token-level diagnostics over the active tokens (0-d, detached)."""
    ratio, kl = ratio.detach(), kl.detach()
    n = m.sum().clamp(min=1).to(ratio.dtype)
    low = (ratio < 1 - eps_low) & (adv < 0) & m  # [N, T] clipped branch active, A < 0
    high = (ratio > 1 + eps_high) & (adv > 0) & m  # [N, T] clipped branch active, A > 0
    one = torch.ones((), dtype=ratio.dtype, device=ratio.device)
    has = m.any()
    return {
        "kl": torch.where(m, kl, 0.0).sum() / n,
        "clip_frac_low": low.sum() / n,
        "clip_frac_high": high.sum() / n,
        "clip_frac": (low | high).sum() / n,
        "ratio_mean": torch.where(has, torch.where(m, ratio, 0.0).sum() / n, one),
        "ratio_min": torch.where(has, torch.where(m, ratio, torch.inf).amin(), one),
        "ratio_max": torch.where(has, torch.where(m, ratio, -torch.inf).amax(), one),
    }


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    ref_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    settings: LossSettings = LossSettings(),
    *,
    num_items: float | Tensor | None = None,
    is_weights: Tensor | None = None,
    entropy: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO loss (formulas in the module docstring) and detached 0-d statistics.

    logp, old_logp, ref_logp, mask, is_weights, entropy: [N, T]; advantages: [N] (NaN is a
    ValueError). settings: every option (LossSettings). ref_logp may be None when beta == 0
    (then stats["kl"] is 0). mask is 0/1, bool or float; a row with no active token contributes
    0. num_items: the dapo denominator, the active-token count of the whole generation batch
    over all ranks (None: this batch's count). is_weights multiply the surrogate only, not the
    KL term. entropy: per-token entropy of the policy, read only by the entropy options.

    stats: kl (token mean), clip_frac_low (rho < 1 - eps_low and A < 0), clip_frac_high
    (rho > 1 + eps_high and A > 0), clip_frac (their sum), ratio_mean / ratio_min / ratio_max,
    all over this rank's active tokens.
    """
    eps_low, eps_high, beta = settings.eps_low, settings.clip_high, settings.beta
    named = {"old_logp": old_logp, "ref_logp": ref_logp, "mask": mask, "is_weights": is_weights}
    named["entropy"] = entropy
    _check_inputs(logp, named, advantages, mask)
    if beta > 0 and ref_logp is None:
        raise ValueError(f"beta={beta} > 0 needs ref_logp")
    dtype = torch.promote_types(logp.dtype, torch.float32)
    m = mask.bool()  # [N, T]
    logp = logp.to(dtype)  # [N, T]
    adv = advantages.detach().to(dtype).unsqueeze(1)  # [N, 1]

    # where() first, so padding values (possibly inf/NaN) never reach exp or the backward pass.
    log_ratio = torch.where(m, logp - old_logp.detach().to(dtype), 0.0)  # [N, T]
    ratio = torch.exp(log_ratio.clamp(max=LOG_RATIO_BOUND))  # [N, T]
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high)  # [N, T]
    per_token = -torch.minimum(ratio * adv, clipped * adv)  # [N, T]
    if is_weights is not None:
        per_token = per_token * torch.where(m, is_weights.detach().to(dtype), 0.0)  # [N, T]

    kl = torch.zeros_like(logp)  # [N, T]
    if ref_logp is not None:
        d = torch.where(m, ref_logp.detach().to(dtype) - logp, 0.0)  # [N, T]
        d = d.clamp(max=LOG_RATIO_BOUND)  # [N, T]
        kl = torch.exp(d) - d - 1  # [N, T]
    if beta > 0:
        per_token = per_token + beta * kl  # [N, T]
    per_token = torch.where(m, per_token, 0.0)  # [N, T]

    loss = _aggregate(
        per_token, m.to(dtype), settings.loss_type, settings.max_completion_length, num_items
    )
    return loss, _stats(ratio, adv, kl, m, eps_low, eps_high)
