"""From samples to scored groups: the prompts of a batch and what the trainer keeps of it.

Shared by training (grpo/trainer.py) and evaluation (grpo/evaluation.py), so both render the
same prompts from the same samples. Rows are group-major: the G completions of prompt j are
rows j*G .. j*G + G - 1.
"""

from __future__ import annotations

from typing import Any

import torch

from data.sample import DataError, Sample
from data.tasks import Task
from grpo.types import Policy, PromptInput, RolloutBatch


def task_prompts(
    policy: Policy, task: Task, samples: list[Sample], evaluation: bool = False
) -> list[PromptInput]:
    """The task's chat prompt for each sample, rendered with its images opened and sized."""
    return [
        policy.prompt_input(
            task.messages(s, evaluation=evaluation), [image.open() for image in s.images]
        )
        for s in samples
    ]


def check_prompt_lengths(samples: list[Sample], lengths: list[int], limit: int | None) -> None:
    """Prompts are never cut (a cut would drop image tokens): a long one is an error."""
    for sample, length in zip(samples, lengths, strict=True):
        if limit is not None and length > limit:
            images = f" with {len(sample.images)} image(s)" if sample.images else ""
            raise DataError(
                f"{sample.where}: prompt{images} is {length} tokens, over max_prompt_length="
                f"{limit}; prompts are never truncated (image tokens would be lost): raise "
                "--max-prompt-length or lower --max-pixels"
            )


def rows_with_signal(config: Any, rewards: torch.Tensor, truncated: torch.Tensor) -> list[int]:
    """Rows that enter the loss: a reward exists, and (if asked) not truncated, and (if asked)
    the group's rewards are not all equal (such a group has zero advantage everywhere).

    config: anything with mask_truncated_completions, skip_zero_std_groups, num_generations.
    rewards [N] (NaN = no reward), truncated [N] bool.
    """
    keep = ~torch.isnan(rewards)  # [N]
    if config.mask_truncated_completions:
        keep &= ~truncated.cpu()
    if config.skip_zero_std_groups:
        groups = torch.nan_to_num(rewards.view(-1, config.num_generations), nan=0.0)  # [P, G]
        spread = groups.amax(1) != groups.amin(1)  # [P]
        keep &= spread.repeat_interleave(config.num_generations)
    return keep.nonzero().flatten().tolist()


def rollout_metrics(
    per_function: torch.Tensor,
    rewards: torch.Tensor,
    advantages: torch.Tensor,
    batch: RolloutBatch,
    specs: list[tuple[str, float]],
    group_size: int,
) -> dict[str, float]:
    """Rewards, advantages and lengths of one generation batch, before rows are dropped.

    per_function [N, K], rewards [N], advantages [N] (NaN = no reward).
    """
    lengths = batch.completion_mask.sum(1)  # [N]
    groups = rewards.view(-1, group_size)  # [P, G]
    known = rewards[~rewards.isnan()]  # [n_known]
    metrics = {
        "reward_mean": float(rewards.nanmean()),
        "reward_std": float(known.std()) if known.numel() > 1 else 0.0,
        "reward_missing_frac": float(rewards.isnan().float().mean()),
        "zero_std_group_frac": float((groups.amax(1) == groups.amin(1)).float().mean()),
        "advantage_abs_mean": float(advantages.nan_to_num().abs().mean()),
        "advantage_max": float(advantages.nan_to_num().max()),
        "advantage_min": float(advantages.nan_to_num().min()),
        "completion_length_mean": float(lengths.float().mean()),
        "completion_length_max": float(lengths.max()),
        "truncated_frac": float(batch.truncated.float().mean()),
    }
    for k, (name, _) in enumerate(specs):
        column = per_function[:, k]  # [N]
        scored = column[~column.isnan()]  # [n_k]
        metrics[f"reward/{name}_mean"] = float(scored.mean()) if scored.numel() else float("nan")
        metrics[f"reward/{name}_std"] = float(scored.std()) if scored.numel() > 1 else 0.0
    return metrics


def completion_records(
    samples: list[Sample],
    texts: list[str],
    rewards: torch.Tensor,
    advantages: torch.Tensor,
    per_function: torch.Tensor | None = None,
    specs: list[tuple[str, float]] | None = None,
) -> list[dict[str, Any]]:
    """One log record per completion [N]: where its prompt came from, the prompt and its first
    image (a file path, else the record's location), the gold, the text, each reward function's
    score ([N, K] per_function, NaN = not applicable), the reward and the advantage."""
    group_size = len(texts) // len(samples)
    names = [name for name, _ in specs or []]
    records = []
    for i, text in enumerate(texts):
        sample = samples[i // group_size]
        image = sample.images[0] if sample.images else None
        scores = per_function[i].tolist() if specs else []
        records.append(
            {
                "where": sample.where,
                "prompt": sample.query,
                "image": None if image is None else str(image.path or image.where),
                "solution": sample.solution,
                "completion": text,
                "rewards": {n: (v if v == v else None) for n, v in zip(names, scores, strict=True)},
                "reward": float(rewards[i]),
                "advantage": float(advantages[i]),
                "_image": image,  # the ImageRef, for the report's thumbnail (never serialised)
            }
        )
    return records


def visual_token_counts(policy: Policy, samples: list[Sample], most: int = 1000) -> list[int]:
    """Visual prompt tokens per sample (all its images, sized as the model will see them), for
    up to `most` samples spread evenly over the data; only image headers are read."""
    step = max(1, len(samples) // most)
    chosen = [s for s in samples[::step] if s.images][:most]
    return [
        sum(policy.visual_tokens(*image.size()) for image in sample.images) for sample in chosen
    ]
