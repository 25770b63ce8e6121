"""Correcting for the sampler not being the trainer: truncated importance weights and metrics.

Completions are drawn by the sampler (vLLM) from pi_sampler, but the loss is computed with the
trainer's log-probs pi_trainer of the same weights. Different kernels, dtypes and sampling
filters (top-p/top-k) make the two differ, so the gradient is slightly off-policy. Token-level
truncated importance sampling reweights each token's loss by

    w_t = min(pi_trainer(y_t) / pi_sampler(y_t), C) = min(exp(logp_trainer_t - logp_sampler_t), C)

computed without gradient (a fixed per-token coefficient) and zero outside the completion mask.
The cap C bounds the variance a rare token sampled far more often than the trainer would have
sampled it could add. `mismatch_stats` reports how far apart the two are.

`importance_weights` generalises this to the four rules TRL offers (vllm_importance_sampling_mode;
truncated IS: Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL
training"; masked IS, sequence level: Liu et al. 2025, "When speed kills stability"): per token
or per sequence, truncated (clipped into [lower, upper]) or masked (weight 0 outside it).
`off_policy_sequence_mask` is DeepSeek-V3.2's off-policy sequence masking. Both return fixed
per-token coefficients: the trainer multiplies them into grpo_loss's is_weights, where they
scale the policy term only, and a token of weight 0 still counts in the loss normaliser.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def pad_sampler_logprobs(rows: list[list[float]], width: int) -> torch.Tensor:
    """Ragged per-row sampler log-probs -> [N, width] float32; 0 past each row's end.

    Rows longer than `width` are cut (the trainer's batch may be narrower than the sampler's
    output only if it cut the completions itself).
    """
    out = torch.zeros((len(rows), width), dtype=torch.float32)  # [N, T]
    for i, row in enumerate(rows):
        row = row[:width]
        out[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
    return out


def truncated_is_weights(
    trainer_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor, cap: float
) -> torch.Tensor:
    """w = min(exp(trainer_logp - sampler_logp), cap) * mask, detached. All inputs [N, T].

    A NaN sampler log-prob (a token the sampler did not score) gets weight 1: no correction.
    The same as importance_weights(..., "token_truncate", upper=cap)[0].
    """
    if cap <= 0:
        raise ValueError(f"importance-weight cap must be positive, got {cap}")
    return importance_weights(trainer_logp, sampler_logp, mask, "token_truncate", upper=cap)[0]


def importance_weights(
    trainer_logp: torch.Tensor,
    sampler_logp: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token_truncate",
    lower: float | None = None,
    upper: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sampler-mismatch importance weights [N, T] (detached, 0 off the mask) and 0-d metrics.

    trainer_logp (the trainer's old_logp), sampler_logp (NaN = not scored: log-ratio 0), mask:
    [N, T]. With the per-token and per-sequence ratios::

        token:     w_{i,t} = exp(trainer_logp_{i,t} - sampler_logp_{i,t})
        sequence:  w_i     = exp(sum_t M_{i,t} (trainer_logp_{i,t} - sampler_logp_{i,t}))

    (the sequence ratio is the product of the token ratios, the true IS weight of the sequence,
    not GSPO's length-normalised mean; as TRL) ``mode`` applies to the ratio w of each unit
    (token or sequence, broadcast over its tokens)::

        *_truncate   clip(w, lower, upper)                     (lower=None: no lower bound)
        *_mask       w if lower <= w <= upper else 0           (lower=None: no lower bound)

    ``upper`` is required (it is what bounds the variance); 0 <= lower < upper. token_truncate
    with upper=C and no lower bound is `truncated_is_weights(..., cap=C)` exactly.

    Metrics (0-d, summable over ranks): is_units (active tokens, or sequences with at least
    one active token), is_low / is_high (units whose ratio fell below lower / above upper:
    clipped or masked), is_frac_low / is_frac_high / is_frac (the same over is_units), and
    is_weight_mean (mean weight over active tokens).
    """
    if mode not in IS_MODES:
        raise ValueError(f"importance-sampling mode must be one of {IS_MODES}, got {mode!r}")
    if upper is None or not 0 < upper < math.inf:
        raise ValueError(f"importance-sampling upper bound must be finite and > 0, got {upper}")
    if lower is not None and not 0 <= lower < upper:
        raise ValueError(f"importance-sampling lower bound must be in [0, {upper}), got {lower}")
    with torch.no_grad():
        m = mask.bool()  # [N, T]
        known = ~torch.isnan(sampler_logp)  # [N, T]
        log_ratio = torch.where(known, trainer_logp.detach() - sampler_logp, 0.0)  # [N, T]
        if mode.startswith("token"):
            ratio = torch.exp(log_ratio)  # [N, T]
            units = m  # [N, T]
        else:
            seq = torch.where(m, log_ratio, 0.0).sum(dim=1, keepdim=True)  # [N, 1]
            ratio = torch.exp(seq)  # [N, 1]
            units = m.any(dim=1, keepdim=True)  # [N, 1]
        low = ratio < lower if lower is not None else torch.zeros_like(units)  # [N, T] | [N, 1]
        high = ratio > upper  # [N, T] | [N, 1]
        if mode.endswith("truncate"):
            weights = ratio.clamp(min=lower, max=upper)  # [N, T] | [N, 1]
        else:
            weights = torch.where(low | high, 0.0, ratio)  # [N, T] | [N, 1]
        weights = weights.expand_as(log_ratio) * mask.to(weights.dtype)  # [N, T]
        return weights, _unit_metrics(weights, m, units, low, high)


def _unit_metrics(
    weights: torch.Tensor,
    m: torch.Tensor,
    units: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Counts and fractions of the units (tokens or sequences) each bound touched; 0-d."""
    dtype = weights.dtype
    n_units = units.sum().to(dtype)
    n_low, n_high = (low & units).sum().to(dtype), (high & units).sum().to(dtype)
    per = n_units.clamp(min=1)
    return {
        "is_units": n_units,
        "is_low": n_low,
        "is_high": n_high,
        "is_frac_low": n_low / per,
        "is_frac_high": n_high / per,
        "is_frac": (n_low + n_high) / per,
        "is_weight_mean": torch.where(m, weights, 0.0).sum() / m.sum().clamp(min=1).to(dtype),
    }


def off_policy_sequence_mask(
    logp: torch.Tensor,
    sampler_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    delta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DeepSeek-V3.2's off-policy sequence masking (arXiv:2512.02556, eq. 9): drop the
    sequences with a negative advantage that the current policy has drifted far from. Bool [N]
    (True = keep) and 0-d metrics::

        keep_i = A_i >= 0  or  (1 / |o_i|) sum_t M_{i,t} (sampler_logp_{i,t} - logp_{i,t}) <= delta

    The mean log-ratio is a per-token estimate of KL(pi_sampler || pi_theta) on the sampled
    tokens. logp: the current policy's log-probs [N, T] (read detached; recompute the mask at
    each optimizer step as logp moves); sampler_logp [N, T] (NaN = not scored: log-ratio 0);
    advantages [N] (NaN is a ValueError); mask [N, T]. As TRL's off_policy_mask_threshold. Use as
    is_weights * keep[:, None].

    Metrics: opsm_rows (sequences with a token), opsm_dropped, opsm_frac (their ratio) and
    opsm_token_frac (share of the active tokens dropped).
    """
    if torch.isnan(advantages).any():
        raise ValueError("advantages hold NaN: drop rows without a reward first")
    shapes = (sampler_logp.shape, mask.shape)
    if advantages.shape != logp.shape[:1] or any(x != logp.shape for x in shapes):
        raise ValueError(
            f"need logp, sampler_logp, mask [N, T] and advantages [N], got {tuple(logp.shape)}, "
            f"{tuple(sampler_logp.shape)}, {tuple(mask.shape)}, {tuple(advantages.shape)}"
        )
    if not math.isfinite(delta):
        raise ValueError(f"off-policy mask delta must be finite, got {delta}")
    with torch.no_grad():
        m = mask.bool()  # [N, T]
        dtype = torch.promote_types(logp.dtype, torch.float32)
        counted = m & ~torch.isnan(sampler_logp)  # [N, T]
        diff = torch.where(counted, sampler_logp.to(dtype) - logp.detach().to(dtype), 0.0)  # [N, T]
        lengths = m.sum(dim=1)  # [N]
        mean = diff.sum(dim=1) / lengths.clamp(min=1).to(dtype)  # [N]
        keep = (advantages >= 0) | (mean <= delta)  # [N]
        rows = (lengths > 0).sum().to(dtype)
        dropped = (~keep & (lengths > 0)).sum().to(dtype)
        tokens = (lengths * ~keep).sum().to(dtype)
        stats = {
            "opsm_rows": rows,
            "opsm_dropped": dropped,
            "opsm_frac": dropped / rows.clamp(min=1),
            "opsm_token_frac": tokens / lengths.sum().clamp(min=1).to(dtype),
        }
        return keep, stats


def mismatch_stats(
    trainer_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor
) -> dict[str, float]:
    """Mean and max of |trainer_logp - sampler_logp| over masked tokens the sampler scored.

    Returns {"logp_diff_mean": ..., "logp_diff_max": ...}; both 0.0 when no token counts.
    """
    with torch.no_grad():
        counted = mask.bool() & ~torch.isnan(sampler_logp)  # [N, T]
        diff = (trainer_logp.detach() - sampler_logp).abs()[counted]  # [M]
        if diff.numel() == 0:
            return {"logp_diff_mean": 0.0, "logp_diff_max": 0.0}
        return {"logp_diff_mean": diff.mean().item(), "logp_diff_max": diff.max().item()}


@dataclass(frozen=True)
class CorrectionSettings:
    """Which sampler/trainer corrections the loss applies (all off by default).

    is_mode: one of IS_MODES, or None for no importance weights; is_lower / is_upper: its
    bounds (upper required when a mode is set). off_policy_delta: DeepSeek-V3.2's masking of
    A < 0 sequences whose mean log-ratio to the sampler exceeds it (None: off).
    """

    is_mode: str | None = None
    is_lower: float | None = None
    is_upper: float | None = None
    off_policy_delta: float | None = None


def correction_weights(
    trainer_logp: torch.Tensor,
    policy_logp: torch.Tensor,
    sampler_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    settings: CorrectionSettings,
) -> tuple[torch.Tensor | None, dict[str, float]]:
    """The per-token coefficients [N, T] the loss's policy term is multiplied by (None: no
    correction) and the metrics of every rule, for one batch.

    trainer_logp: the old policy's log-probs (the importance ratio's numerator); policy_logp:
    the current policy's (the off-policy mask's); sampler_logp [N, T] (NaN = not scored);
    advantages [N]; mask [N, T].
    """
    stats = mismatch_stats(trainer_logp, sampler_logp, mask)
    weights = None
    if settings.is_mode is not None:
        weights, metrics = importance_weights(
            trainer_logp, sampler_logp, mask, settings.is_mode, settings.is_lower, settings.is_upper
        )
        stats.update({k: float(v) for k, v in metrics.items()})
    if settings.off_policy_delta is not None:
        keep, metrics = off_policy_sequence_mask(
            policy_logp, sampler_logp, advantages, mask, settings.off_policy_delta
        )
        kept = keep[:, None].to(torch.float32) * mask.to(torch.float32)  # [N, T]
        weights = kept if weights is None else weights * kept
        stats.update({k: float(v) for k, v in metrics.items()})
    return weights, stats
