"""Correcting for the sampler not being the trainer: truncated importance weights and metrics.

Completions are drawn by the sampler (vLLM) from pi_sampler, but the loss is computed with the
trainer's log-probs pi_trainer of the same weights. Different kernels, dtypes and sampling
filters (top-p/top-k) make the two differ, so the gradient is slightly off-policy. Token-level
truncated importance sampling reweights each token's loss by

    w_t = min(pi_trainer(y_t) / pi_sampler(y_t), C) = min(exp(logp_trainer_t - logp_sampler_t), C)

computed without gradient (a fixed per-token coefficient) and zero outside the completion mask.
The cap C bounds the variance a rare token sampled far more often than the trainer would have
sampled it could add. `mismatch_stats` reports how far apart the two are.
"""

from __future__ import annotations

import torch


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
    """
    if cap <= 0:
        raise ValueError(f"importance-weight cap must be positive, got {cap}")
    with torch.no_grad():
        known = ~torch.isnan(sampler_logp)  # [N, T]
        log_ratio = torch.where(known, trainer_logp.detach() - sampler_logp, 0.0)  # [N, T]
        weights = torch.exp(log_ratio).clamp(max=cap)  # [N, T]
        return weights * mask.to(weights.dtype)


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


def importance_weights(
    trainer_logp: torch.Tensor,
    sampler_logp: torch.Tensor,
    mask: torch.Tensor,
    cap: float | None,
) -> tuple[torch.Tensor | None, dict[str, float]]:
    """The correction the loss applies (None when `cap` is None: no correction) and the
    mismatch statistics, for one batch. All tensors [N, T]."""
    stats = mismatch_stats(trainer_logp, sampler_logp, mask)
    if cap is None:
        return None, stats
    return truncated_is_weights(trainer_logp, sampler_logp, mask, cap), stats
