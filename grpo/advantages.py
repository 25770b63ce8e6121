"""Group-relative advantages: GRPO's replacement for PPO's learned value baseline.

Each prompt is sampled G times. A completion's advantage is its reward compared with its
siblings' (DeepSeekMath, arXiv:2402.03300, section 4.1.2)::

    A_i = (r_i - mean_g(r)) / (std(r) + eps)

where mean_g is the mean of r_i's group and std depends on ``scale``:

- "group": std of r_i's group (DeepSeekMath).
- "batch": std of the whole batch (all ranks under torch.distributed) around the batch mean;
  the centre stays the group mean. A hard or easy prompt (low group std) is then not up-weighted.
- "none":  no division, A_i = r_i - mean_g(r) (Dr. GRPO, arXiv:2503.20783).

std is the Bessel-corrected sample std, sqrt(sum (r - mean)^2 / (n - 1)), taken as 0 when fewer
than two rewards are known. NaN rewards (no reward function applied) are left out of every mean
and std, and their advantage is NaN: the trainer must drop them or mask them out.

Also here: `aggregate_rewards` (several reward functions into one reward, plain weighted sum or
GDPO's normalise-then-sum), `kl_penalized_rewards` (the KL penalty folded into the reward, as
RLHF-PPO / verl / OpenRLHF do) and `informative_groups` (DAPO's dynamic-sampling filter).

Numerics: computed in at least float32 (float64 stays float64). Rows are group-major:
the G completions of prompt j are rows j*G .. j*G+G-1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from grpo.distributed import all_reduce_sum

SCALES = ("group", "batch", "none")
REWARD_AGGREGATIONS = ("sum", "normalize_then_sum")


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """At least float32: bf16/fp16 are promoted, float64 is kept."""
    return torch.promote_types(t.dtype, torch.float32)


def _batch_std(r: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Bessel-corrected std of the known entries of ``r`` over every rank; 0-d.

    Two passes (mean, then squared deviations) to avoid the cancellation of E[r^2] - E[r]^2.
    """
    r0 = torch.where(known, r, 0.0)
    totals = all_reduce_sum(torch.stack([r0.sum(), known.sum().to(r.dtype)]))  # [2]
    count = totals[1]
    mean = totals[0] / count.clamp(min=1.0)
    sq = all_reduce_sum(torch.where(known, (r - mean) ** 2, 0.0).sum())
    return torch.where(count > 1, sq / (count - 1).clamp(min=1.0), 0.0).sqrt()


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4
) -> torch.Tensor:
    """Advantages A [N] from rewards [N] (N = prompts * group_size, group-major, NaN = unknown).

    A_i = (r_i - mean_group) / (std + eps), with std per ``scale`` (see the module docstring).
    A group whose known rewards are all equal gets exactly 0. With scale="batch" under
    torch.distributed every rank must call this (it all-reduces the batch statistics).
    """
    if rewards.dim() != 1 or not rewards.is_floating_point():
        raise ValueError(f"rewards must be a 1-D float tensor, got {rewards.dtype} {rewards.shape}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")

    r = rewards.to(_compute_dtype(rewards)).reshape(-1, group_size)  # [P, G]
    known = ~torch.isnan(r)  # [P, G]
    count = known.sum(dim=1, keepdim=True).to(r.dtype)  # [P, 1]
    mean = torch.where(known, r, 0.0).sum(dim=1, keepdim=True) / count.clamp(min=1.0)  # [P, 1]
    centred = torch.where(known, r - mean, 0.0)  # [P, G]
    # The mean of equal values can round (0.1 * 3 / 3 != 0.1): force the exact zero.
    hi = torch.where(known, r, -torch.inf).amax(dim=1, keepdim=True)  # [P, 1]
    lo = torch.where(known, r, torch.inf).amin(dim=1, keepdim=True)  # [P, 1]
    centred = torch.where(hi == lo, 0.0, centred)  # [P, G]

    if scale == "none":
        adv = centred  # [P, G]
    else:
        if scale == "group":
            var = (centred**2).sum(dim=1, keepdim=True) / (count - 1).clamp(min=1.0)  # [P, 1]
            denom = var.sqrt() + eps  # [P, 1]
        else:
            denom = _batch_std(r, known) + eps  # []
        # denom is 0 only with eps = 0 and no spread, where centred is 0: give 0, not 0/0.
        adv = centred / torch.where(denom > 0, denom, 1.0)  # [P, G]
    return torch.where(known, adv, torch.nan).view(-1)  # [N]


def combine_rewards(
    per_function: torch.Tensor, weights: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """Weighted sum of K reward functions: [N, K] -> [N].

    r_i = sum_{k applicable} w_k * f_k(i), where NaN in column k means f_k does not apply to
    sample i. A row where no function applies is NaN (no reward, see group_advantages).
    """
    if per_function.dim() != 2 or not per_function.is_floating_point():
        raise ValueError(
            f"per_function must be a [N, K] float tensor, got {per_function.dtype} "
            f"{tuple(per_function.shape)}"
        )
    dtype = _compute_dtype(per_function)
    f = per_function.to(dtype)  # [N, K]
    w = torch.as_tensor(weights, dtype=dtype, device=f.device)  # [K]
    if w.shape != (f.shape[1],):
        raise ValueError(f"{f.shape[1]} reward functions but weights of shape {tuple(w.shape)}")
    applies = ~torch.isnan(f)  # [N, K]
    total = torch.where(applies, f * w, 0.0).sum(dim=1)  # [N]
    return torch.where(applies.any(dim=1), total, torch.nan)  # [N]


def aggregate_rewards(
    per_function: torch.Tensor,
    weights: Sequence[float] | torch.Tensor,
    group_size: int,
    mode: str = "sum",
    eps: float = 1e-4,
) -> torch.Tensor:
    """K reward functions [N, K] (NaN = does not apply) into one reward per sample [N].

    "sum": combine_rewards, r_i = sum_k w_k f_k(i).
    "normalize_then_sum" (GDPO, arXiv:2601.05242): each reward function's
    column is first normalised within its group, then weighted and summed::

        r_i = sum_k w_k (f_k(i) - mean_g f_k) / (std_g f_k + eps)

    (mean_g, std_g over the known entries of the column in i's group, Bessel-corrected, as
    group_advantages(column, group_size, "group", eps) computes them: a column whose known
    entries in a group are all equal contributes exactly 0). Summing raw rewards lets one
    reward function's scale or spread swamp the others, and different reward combinations
    collapse onto the same advantage; normalising each first keeps them apart. GDPO then
    normalises the sum over the batch: follow with group_advantages(r, group_size, "batch")
    (its group mean of r is 0 already when every function applies to every sample). Groups
    never span ranks, so this needs no communication.
    """
    if mode not in REWARD_AGGREGATIONS:
        raise ValueError(
            f"reward aggregation mode must be one of {REWARD_AGGREGATIONS}, got {mode!r}"
        )
    if mode == "sum":
        return combine_rewards(per_function, weights)
    if per_function.dim() != 2 or not per_function.is_floating_point():
        raise ValueError(
            f"per_function must be a [N, K] float tensor, got {per_function.dtype} "
            f"{tuple(per_function.shape)}"
        )
    columns = [
        group_advantages(per_function[:, k], group_size, "group", eps)  # [N]
        for k in range(per_function.shape[1])
    ]
    normalised = torch.stack(columns, dim=1) if columns else per_function  # [N, K]
    return combine_rewards(normalised, weights)  # [N]


def kl_penalized_rewards(
    rewards: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """The KL penalty in the reward instead of the loss: r_i - beta * sum_t M_{i,t} kl_{i,t}. [N].

    rewards: [N] (NaN stays NaN); kl: [N, T] per-token KL estimates of the sampling policy
    against the reference, e.g. grpo.loss.kl_estimate(old_logp, ref_logp, mask, "k1") (no
    gradient: it is a reward); mask: [N, T]. This is what verl does with use_kl_in_reward
    (apply_kl_penalty: token_level_rewards = scores - beta * kl_t, with k1 = old_log_prob -
    ref_log_prob by default, then its GRPO estimator sums the token rewards into one score per
    sequence), and OpenRLHF for outcome rewards: the sequence's reward minus beta times its
    summed KL. Call it before group_advantages, and set LossSettings(kl_in_reward=True) so the
    loss does not add the KL a second time.
    """
    if rewards.dim() != 1 or kl.shape != (rewards.shape[0], *kl.shape[1:]) or kl.dim() != 2:
        raise ValueError(
            f"rewards must be [N] and kl [N, T], got {tuple(rewards.shape)} and {tuple(kl.shape)}"
        )
    if mask.shape != kl.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, kl {tuple(kl.shape)}")
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    dtype = torch.promote_types(_compute_dtype(rewards), kl.dtype)
    summed = torch.where(mask.bool(), kl.detach().to(dtype), 0.0).sum(dim=1)  # [N]
    return rewards.to(dtype) - beta * summed  # [N]


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """DAPO's dynamic-sampling filter (Yu et al. 2025, arXiv:2503.14476): the groups
    whose known rewards are not all equal, Bool [P] (P = N / group_size, group-major).

    A group whose rewards are all equal (every sample right, or every sample wrong) has zero
    advantage everywhere and so no gradient; DAPO over-samples and keeps only groups with
    0 < #correct < G. NaN rewards are ignored; a group with fewer than two known rewards is
    not informative. Pure and local (groups never span ranks).
    """
    if rewards.dim() != 1 or not rewards.is_floating_point():
        raise ValueError(f"rewards must be a 1-D float tensor, got {rewards.dtype} {rewards.shape}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.reshape(-1, group_size)  # [P, G]
    known = ~torch.isnan(r)  # [P, G]
    hi = torch.where(known, r, -torch.inf).amax(dim=1)  # [P]
    lo = torch.where(known, r, torch.inf).amin(dim=1)  # [P]
    return (known.sum(dim=1) >= 2) & (hi > lo)  # [P]
