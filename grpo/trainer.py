"""The GRPO training loop, written out by hand. `train_step` is the algorithm of
docs/algorithm.md ("The algorithm, step by step") with the same numbers; docs/architecture.md
draws the path of one step through the code.

Two records carry a step: `collect(...) -> Trajectory` (one generation batch: completions,
rewards, advantages, the log-probs that stay fixed during the update) and
`update(...) -> StepStats` (one optimizer step over the step's trajectories). The loop knows the
model only through grpo.types' Protocols; train.py hands it models.BACKEND.
"""

from __future__ import annotations

import dataclasses
import math
import random
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from data import get_task, load_samples
from data.cache import cache_root
from data.sample import Sample
from data.tasks import Task
from grpo import distributed, host_heap
from grpo.advantages import (
    aggregate_rewards,
    group_advantages,
    informative_groups,
    kl_penalized_rewards,
)
from grpo.checkpoint import (
    latest_checkpoint,
    latest_valid_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from grpo.config import TrainConfig, check_inputs, to_yaml, validate
from grpo.data_stream import PromptStream, StreamPosition
from grpo.loss import LossSettings, grpo_loss, kl_estimate
from grpo.metrics import (
    MetricsLogger,
    Stopwatch,
    cut_logs_back,
    mean_of,
    plot_rewards,
    reduce_metrics,
)
from grpo.rollout import (
    check_prompt_lengths,
    completion_records,
    rollout_metrics,
    rows_with_signal,
    task_prompts,
    visual_token_counts,
)
from grpo.sampler_correction import CorrectionSettings, correction_weights, pad_sampler_logprobs
from grpo.training_eval import (
    best_so_far,
    data_options,
    evaluate_now,
    is_due,
    keep_best,
    split_samples,
)
from grpo.types import (
    ModelBackend,
    Policy,
    PromptInput,
    Rollout,
    RolloutBatch,
    Sampler,
    TokenLogProbs,
)
from rewards.compute import sample_columns, score_completions


@dataclass
class Trajectory:
    """One generation batch of this rank: P prompts x G completions, N = P * G rows, of which
    the n rows that carry signal are kept (group-major; T completion positions)."""

    batch: RolloutBatch  # the n kept rows
    advantages: torch.Tensor  # [n] float32
    image_features: Any  # per prompt image, reused by every forward of the step (or None)
    sampler_logp: torch.Tensor  # [n, T] the sampler's log-probs (NaN where not reported)
    ref_logp: torch.Tensor | None = None  # [n, T] frozen reference (beta > 0)
    old_logp: torch.Tensor | None = None  # [n, T] policy before this step's updates (mu > 1)
    metrics: dict[str, float] = field(default_factory=dict)  # rewards, lengths, ... of all N
    records: list[dict[str, Any]] = field(default_factory=list)  # N completions, for the logs
    # a sharded policy's forwards are collectives: a rank without a row with signal keeps one
    # row anyway, runs its forward and backward with the loss times 0, and counts no token
    placeholder: bool = False

    @property
    def loss_mask(self) -> torch.Tensor:
        """[n, T] the tokens that enter the loss: each kept row's completion up to its stop."""
        return self.batch.completion_mask


@dataclass(frozen=True)
class StepStats:
    """One optimizer update, averaged over its trajectories (and, when logged, over ranks)."""

    loss: float
    grad_norm: float
    entropy: float  # mean token entropy of the policy over the loss tokens
    loss_stats: dict[str, float]  # kl, clip fractions, ratio range, sampler mismatch


@dataclass
class Trainer:
    """Everything a run holds between steps; `train_step(trainer)` advances it by one."""

    config: TrainConfig
    task: Task
    policy: Policy
    sampler: Sampler
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    stream: PromptStream[Sample]
    reward_specs: list[tuple[str, float]]
    logger: MetricsLogger
    step: int = 0
    eval_samples: list[Sample] = field(default_factory=list)  # held out (grpo/training_eval.py)
    best: float | None = None  # the best --save-best value so far


# --------------------------------------------------------------------------------------------
# One generation batch: sample -> rewards -> advantages -> fixed log-probs
# --------------------------------------------------------------------------------------------


@dataclass
class Groups:
    """P prompts with their G completions each (N = P * G rows, group-major), scored."""

    samples: list[Sample]
    prompts: list[PromptInput]
    rollout: Rollout
    texts: list[str]  # [N] decoded completions
    per_function: torch.Tensor  # [N, K] each reward function's score (NaN = not applicable)
    weights: torch.Tensor  # [K] the reward weights
    draws: int = 1  # generation rounds it took (dynamic sampling)
    encoded: Any = None  # Policy.encode(prompts), kept while the groups are those of one draw
    features: Any = None  # Policy.image_features(encoded), with `encoded` (None: not computed)

    def select(self, prompts: list[int]) -> Groups:
        """The groups of the prompts `prompts`, in that order."""
        g = len(self.texts) // len(self.samples)
        rows = [j * g + k for j in prompts for k in range(g)]
        rollout = Rollout(
            [self.rollout.completion_ids[r] for r in rows], [self.rollout.logprobs[r] for r in rows]
        )
        pick = [self.samples[j] for j in prompts], [self.prompts[j] for j in prompts]
        texts = [self.texts[r] for r in rows]
        return Groups(*pick, rollout, texts, self.per_function[rows], self.weights, self.draws)


def merge_groups(parts: list[Groups], draws: int) -> Groups:
    """One Groups of several draws' groups, in order."""
    rollout = Rollout(
        [ids for p in parts for ids in p.rollout.completion_ids],
        [lps for p in parts for lps in p.rollout.logprobs],
    )
    samples = [s for p in parts for s in p.samples]
    prompts = [q for p in parts for q in p.prompts]
    texts = [t for p in parts for t in p.texts]
    per_function = torch.cat([p.per_function for p in parts])  # [N, K]
    return Groups(samples, prompts, rollout, texts, per_function, parts[0].weights, draws)


def reward_inputs(
    samples: list[Sample], rollout: Rollout, config: TrainConfig
) -> tuple[dict[str, list], list[str]]:
    """The reward functions' columns for N rows: each sample's fields repeated G times, and
    the completion's length in tokens with the length limits (the `overlong` reward's)."""
    columns, where = sample_columns(samples, config.num_generations)
    n = len(rollout.completion_ids)
    columns["completion_length"] = [len(ids) for ids in rollout.completion_ids]
    columns["max_completion_length"] = [config.max_completion_length] * n
    if config.overlong_buffer is not None:
        columns["overlong_buffer"] = [config.overlong_buffer] * n
    return columns, where


def sample_groups(
    policy: Policy,
    sampler: Sampler,
    task: Task,
    samples: list[Sample],
    specs: list[tuple[str, float]],
    config: TrainConfig,
) -> Groups:
    """G completions for each of the samples' prompts, and every reward function's score."""
    prompts = task_prompts(policy, task, samples)
    encoded = policy.encode(prompts)
    check_prompt_lengths(samples, policy.prompt_lengths(encoded), config.max_prompt_length)
    # without dynamic sampling these groups are the step's: their image features serve the
    # sampler and every log-prob pass, so each image goes through the vision tower once
    features = None if config.dynamic_sampling else policy.image_features(encoded)
    settings = config.sampling_settings()
    rollout = sampler.generate(prompts, config.num_generations, settings, encoded, features)
    texts = policy.decode(rollout.completion_ids)
    columns, where = reward_inputs(samples, rollout, config)
    per_function, weights = score_completions(specs, texts, columns, where)  # [N, K], [K]
    return Groups(
        samples, prompts, rollout, texts, per_function, weights, encoded=encoded, features=features
    )


def combined_rewards(groups: Groups, config: TrainConfig) -> torch.Tensor:
    """r_i [N] from the per-function scores (sum, or GDPO's normalise-then-sum)."""
    return aggregate_rewards(
        groups.per_function,
        groups.weights,
        config.num_generations,
        config.reward_aggregation,
        config.advantage_eps,
    )


def draw_groups(
    policy: Policy,
    sampler: Sampler,
    task: Task,
    stream: PromptStream[Sample],
    specs: list[tuple[str, float]],
    config: TrainConfig,
) -> Groups:
    """Steps 1-2 for P = prompts_per_step prompts. With dynamic sampling (DAPO, arXiv:2503.14476)
    prompts are drawn until P groups have a spread of rewards (the others have advantage 0 and
    teach nothing), at most dynamic_sampling_max_draws rounds; every rank draws as many rounds
    as the slowest, so the prompt stream stays in step."""
    p = config.prompts_per_step
    if not config.dynamic_sampling:
        return sample_groups(policy, sampler, task, stream.next_batch(p), specs, config)
    kept: list[Groups] = []
    draws, count = 0, 0
    while True:
        draws += 1
        groups = sample_groups(policy, sampler, task, stream.next_batch(p), specs, config)
        spread = informative_groups(combined_rewards(groups, config), config.num_generations)
        chosen = spread.nonzero().flatten().tolist()[: p - count]
        kept.append(groups.select(chosen))
        count += len(chosen)
        missing = distributed.all_reduce_sum(torch.tensor(float(p - count)))
        if float(missing) == 0 or draws >= config.dynamic_sampling_max_draws:
            break
    if count < p:  # the bound was hit: fill with groups that teach nothing, and say so
        warnings.warn(
            f"dynamic sampling: {count} of {p} groups with reward spread after {draws} draws "
            "(dynamic_sampling_max_draws); the rest of the batch has zero advantage",
            stacklevel=2,
        )
        flat = [j for j in range(p) if not bool(spread[j])][: p - count]
        kept.append(groups.select(flat))
    return merge_groups(kept, draws)


def collect(
    policy: Policy,
    sampler: Sampler,
    task: Task,
    stream: PromptStream[Sample],
    specs: list[tuple[str, float]],
    config: TrainConfig,
    timer: Stopwatch,
) -> Trajectory:
    """Steps 1-3 for P prompts: G completions each, their rewards and group advantages, and
    the log-probs that stay fixed while the policy is updated."""
    g = config.num_generations
    with timer("sample"):
        groups = draw_groups(policy, sampler, task, stream, specs, config)
    # a single draw's prompts were encoded (and their images featurised) before sampling;
    # dynamic sampling's merged draws are encoded anew
    encoded = groups.encoded
    prompt_batch = encoded if encoded is not None else policy.encode(groups.prompts)
    batch = policy.rollout_batch(prompt_batch, groups.rollout.completion_ids, g)
    reuse = encoded is not None and not config.dynamic_sampling
    features = groups.features if reuse else policy.image_features(prompt_batch)
    sampler_logp = pad_sampler_logprobs(groups.rollout.logprobs, batch.completion_mask.shape[1])
    trajectory = Trajectory(batch, torch.empty(0), features, sampler_logp)  # [N, T]
    with timer("reward"):
        rewards = combined_rewards(groups, config)  # [N]
    if config.kl_in_reward:  # the reference pass must come first: it changes the rewards
        with timer("logprobs"):
            add_fixed_logprobs(policy, trajectory, config)
            rewards = kl_in_rewards(policy, rewards, trajectory, config)
    with timer("reward"):
        advantages = group_advantages(rewards, g, config.scale_rewards, config.advantage_eps)
    trajectory.metrics = rollout_metrics(groups.per_function, rewards, advantages, batch, specs, g)
    trajectory.metrics["dynamic_sampling_draws"] = float(groups.draws)
    trajectory.records = completion_records(
        groups.samples, groups.texts, rewards, advantages, groups.per_function, specs
    )

    keep = rows_with_signal(config, rewards, batch.truncated)  # the n rows with signal
    if not keep and policy.sharded:
        keep, trajectory.placeholder = [0], True
    trajectory.advantages = advantages.to(policy.device, torch.float32)  # [N]
    if len(keep) < batch.num_rows:
        keep_rows(trajectory, keep)
    trajectory.sampler_logp = trajectory.sampler_logp.to(batch.completion_mask.device)
    if not keep:
        trajectory.image_features = None  # no forward will run on this rank
    elif not config.kl_in_reward:
        with timer("logprobs"):
            add_fixed_logprobs(policy, trajectory, config)
    return trajectory


def kl_in_rewards(
    policy: Policy, rewards: torch.Tensor, trajectory: Trajectory, config: TrainConfig
) -> torch.Tensor:
    """r_i - beta * sum_t kl_t [N] (kl of the sampling policy against the reference)."""
    mask = trajectory.batch.completion_mask  # [N, T]
    sampled = trajectory.old_logp  # [N, T] (mu > 1)
    if sampled is None:  # mu = 1: the sampling policy is the current one
        with torch.no_grad():
            features = trajectory.image_features
            sampled = grouped_logprobs(
                lambda b: policy.logprobs(b, config.temperature, image_features=features).logp,
                trajectory,
                logprob_groups(policy, config),
            )
    kl = kl_estimate(sampled, trajectory.ref_logp, mask, config.kl_estimator)  # [N, T]
    return kl_penalized_rewards(rewards, kl.cpu(), mask.cpu(), config.beta)


def keep_rows(trajectory: Trajectory, rows: list[int]) -> None:
    """Drop every row of the trajectory but `rows` (those that carry signal)."""
    trajectory.batch = trajectory.batch.select(rows)
    trajectory.advantages = trajectory.advantages[rows]  # [n]
    trajectory.sampler_logp = trajectory.sampler_logp[rows]  # [n, T]
    if trajectory.ref_logp is not None:
        trajectory.ref_logp = trajectory.ref_logp[rows]
    if trajectory.old_logp is not None:
        trajectory.old_logp = trajectory.old_logp[rows]


def logprob_groups(policy: Policy, config: TrainConfig) -> int:
    """Whole groups per log-prob micro-batch (0: all rows at once). A sharded policy takes one
    pass per trajectory: every forward is a collective, and ranks holding different numbers
    of groups would otherwise run different numbers of them."""
    return 0 if policy.sharded else config.logprob_group_batch


def grouped_logprobs(
    compute: Callable[[RolloutBatch], torch.Tensor], trajectory: Trajectory, groups: int
) -> torch.Tensor:
    """compute(batch) [n, T] of the trajectory's rows, in micro-batches of `groups` whole
    groups (`micro_batches`; each trimmed to its own longest completion), reassembled."""
    parts = micro_batches(trajectory, groups)
    if len(parts) == 1:
        return compute(trajectory.batch)
    pieces = [(rows, compute(trajectory.batch.select(rows))) for rows in parts]
    # the passes' own dtype (float64 models give float64), not the mask's float32
    out = trajectory.loss_mask.new_zeros(trajectory.loss_mask.shape, dtype=pieces[0][1].dtype)
    for rows, piece in pieces:
        out[rows] = piece  # [n_b, T]
    return out


@torch.no_grad()
def add_fixed_logprobs(policy: Policy, trajectory: Trajectory, config: TrainConfig) -> None:
    """Log-probs that do not change during this step's updates: reference and old policy."""
    features, groups = trajectory.image_features, logprob_groups(policy, config)
    if config.beta > 0:
        trajectory.ref_logp = grouped_logprobs(
            lambda b: policy.reference_logprobs(b, config.temperature, features), trajectory, groups
        )
    if config.num_iterations > 1:
        trajectory.old_logp = grouped_logprobs(
            lambda b: policy.logprobs(b, config.temperature, image_features=features).logp,
            trajectory,
            groups,
        )


# --------------------------------------------------------------------------------------------
# The update: loss, backward, all-reduce, clip, step
# --------------------------------------------------------------------------------------------


def micro_batches(trajectory: Trajectory, groups: int) -> list[list[int]]:
    """The rows of the trajectory in runs of `groups` whole groups (0: one run of all rows).

    A group is the rows continuing one prompt (RolloutBatch.prompt_of_row), whatever rows of it
    were dropped; a log-prob pass over whole groups computes each prompt once (models/prefix.py).
    """
    rows = list(range(trajectory.batch.num_rows))
    if groups <= 0 or not rows:
        return [rows]
    prompt_of_row = trajectory.batch.prompt_of_row.tolist()
    order = list(dict.fromkeys(prompt_of_row))  # the prompts, in row order
    runs = [order[k : k + groups] for k in range(0, len(order), groups)]
    return [[i for i in rows if prompt_of_row[i] in set(run)] for run in runs]


def sub_trajectory(trajectory: Trajectory, rows: list[int]) -> Trajectory:
    """The rows `rows` of a trajectory, for one micro-batch (same width T, same images)."""
    part = dataclasses.replace(trajectory, metrics={}, records=[])
    keep_rows(part, rows)
    return part


def micro_batch_weight(
    settings: LossSettings, rows: int, tokens: float, all_rows: int, all_tokens: float
) -> float:
    """w_b such that sum_b w_b * loss(micro-batch b) = loss(whole batch), per loss_type:

    grpo, dr_grpo   n_b / n            (means over rows; dr_grpo's L is the fixed width T
                                        or max_completion_length, the same in every b)
    bnpo            M_b / M            (a token mean: M tokens in all, M_b in b)
    dapo            1                  (already divided by the generation batch's tokens)
    """
    if settings.loss_type == "dapo":
        return 1.0
    if settings.loss_type == "bnpo":
        return tokens / max(all_tokens, 1.0)
    return rows / all_rows


def policy_loss(
    trajectory: Trajectory,
    out: TokenLogProbs,
    settings: LossSettings,
    correction: CorrectionSettings,
    num_items: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO loss of a trajectory from its policy log-probs, and its statistics."""
    old_logp = trajectory.old_logp if trajectory.old_logp is not None else out.logp.detach()
    mask = trajectory.loss_mask  # [n, T]
    is_weights, mismatch = correction_weights(
        old_logp, out.logp, trajectory.sampler_logp, trajectory.advantages, mask, correction
    )
    loss, stats = grpo_loss(
        out.logp,
        old_logp,
        trajectory.ref_logp,
        trajectory.advantages,
        mask,
        settings,
        num_items=num_items,
        is_weights=is_weights,
        entropy=out.entropy,
    )
    entropy = float((out.entropy * mask).sum() / mask.sum().clamp(min=1))
    return loss, {
        "loss": float(loss.detach()),
        "entropy": entropy,
        **{k: float(v) for k, v in stats.items()},
        **{f"sampler/{k}": float(v) for k, v in mismatch.items()},
    }


def loss_and_backward(
    policy: Policy,
    trajectory: Trajectory,
    settings: LossSettings,
    correction: CorrectionSettings,
    temperature: float,
    num_items: float,
    scale: float,
    group_batch: int = 0,
) -> dict[str, float]:
    """Step 4 on one trajectory: policy log-probs, the GRPO loss, backward (loss x scale).

    With group_batch > 0 the rows go in micro-batches of that many whole groups, one forward
    and backward each, so only one micro-batch's activations are alive; each micro-batch loss
    is weighted (`micro_batch_weight`) so the summed gradient is the whole batch's. The
    statistics (and the loss reported) are then computed once more, without grad, on the
    whole batch's log-probs. top_entropy_quantile < 1 takes its threshold over the whole
    batch, so it keeps one pass over all rows.
    """
    groups = group_batch if settings.top_entropy_quantile == 1 else 0
    parts = micro_batches(trajectory, groups)
    if len(parts) == 1:
        out = policy.logprobs(
            trajectory.batch, temperature, True, image_features=trajectory.image_features
        )
        loss, stats = policy_loss(trajectory, out, settings, correction, num_items)
        (loss * scale).backward()
        return stats
    mask = trajectory.loss_mask  # [n, T]
    logp, entropy = torch.zeros_like(mask), torch.zeros_like(mask)  # [n, T] filled per part
    for rows in parts:
        part = sub_trajectory(trajectory, rows)
        out = policy.logprobs(part.batch, temperature, True, image_features=part.image_features)
        loss, _ = policy_loss(part, out, settings, correction, num_items)
        weight = micro_batch_weight(
            settings, len(rows), float(part.loss_mask.sum()), len(mask), float(mask.sum())
        )
        (loss * (scale * weight)).backward()
        logp[rows], entropy[rows] = out.logp.detach().to(mask), out.entropy.to(mask)
    with torch.no_grad():
        whole = TokenLogProbs(logp, entropy)
        return policy_loss(trajectory, whole, settings, correction, num_items)[1]


GRADIENT_BUCKET = 1 << 24  # elements per all-reduce: 64 MiB of float32 gradients


def gradient_buckets(
    parameters: list[torch.nn.Parameter], limit: int
) -> list[list[torch.nn.Parameter]]:
    """Consecutive runs of `parameters` holding at most `limit` elements each (a larger tensor
    is a bucket of its own)."""
    buckets: list[list[torch.nn.Parameter]] = []
    size = 0
    for p in parameters:
        if not buckets or size + p.numel() > limit:
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += p.numel()
    return buckets


def average_gradients(parameters: list[torch.nn.Parameter]) -> None:
    """Mean of the gradients over ranks, one flat all-reduce per bucket of parameters.

    We call the backbone and the LM head separately (to project only completion positions),
    which DDP's wrapper cannot see, so the reduction is explicit. With LoRA the trainable
    tensors are small and fit one bucket; with full fine-tuning the buckets bound the extra
    memory to a few times GRADIENT_BUCKET instead of copies of every gradient (sharding the
    gradients themselves is what FSDP is for). Each gradient becomes a view of its bucket's
    averaged buffer. The sum is elementwise, so bucketing changes no value. Every parameter
    has a gradient here (`update` gives a pass not run zeros).
    """
    world = distributed.get_world_size()
    if world == 1:
        return
    for bucket in gradient_buckets(parameters, GRADIENT_BUCKET):
        flat = distributed.all_reduce_sum(torch.cat([p.grad.flatten() for p in bucket]))  # [sum n]
        flat /= world
        offset = 0
        for p in bucket:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p)
            offset += n


def global_grad_norm(parameters: list[torch.nn.Parameter], max_norm: float) -> float:
    """Clip the gradients to `max_norm` in total 2-norm over all parameters, and return that
    norm. Sharded (DTensor) gradients: clip_grad_norm_ reduces the shards' norms over the
    ranks, so the norm is the global one and every rank clips by the same factor."""
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    if hasattr(norm, "full_tensor"):  # a DTensor
        norm = norm.full_tensor()
    return float(norm)


def has_gradient(trajectory: Trajectory, settings: LossSettings) -> bool:
    """Whether the loss on this trajectory can have a non-zero gradient (LossSettings
    .advantage_weighted_only: not when every advantage of its rows is zero)."""
    advantages = trajectory.advantages  # [n] the kept rows'
    return not settings.advantage_weighted_only or bool(advantages.abs().max() > 0)


def update(
    policy: Policy,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    trajectories: list[Trajectory],
    config: TrainConfig,
) -> StepStats:
    """Steps 4-5: one pass of loss + backward over the trajectories, then one optimizer step."""
    settings = config.loss_settings()
    counted = [t for t in trajectories if not t.placeholder]
    tokens = torch.tensor(sum(float(t.loss_mask.sum()) for t in counted))
    num_items = max(float(distributed.all_reduce_sum(tokens)), 1.0)  # dapo: all ranks' tokens
    # dapo's normaliser already spans every accumulated batch; the others are per-batch means
    scale = 1.0 if settings.loss_type == "dapo" else 1.0 / len(trajectories)
    # no row with signal, or only zero advantages under an advantage-weighted loss: the loss
    # and its gradient are exactly zero, so no pass runs (other ranks may still have some;
    # a sharded policy's forwards are collectives, so there every rank runs its batches)
    running = [
        t
        for t in trajectories
        if t.batch.num_rows > 0 and (policy.sharded or has_gradient(t, settings))
    ]
    group_batch = logprob_groups(policy, config)
    per_batch = [
        loss_and_backward(
            policy,
            t,
            settings,
            config.correction_settings(),
            config.temperature,
            num_items,
            0.0 if t.placeholder else scale,
            group_batch,
        )
        for t in running
    ]
    per_batch = [stats for stats, t in zip(per_batch, running, strict=True) if not t.placeholder]
    parameters = policy.trainable_parameters()
    for p in parameters:  # a pass not run is a zero gradient: AdamW still steps (moments decay)
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if not policy.sharded:  # FSDP2's reduce-scatter has averaged the sharded gradients
        average_gradients(parameters)
    grad_norm = global_grad_norm(parameters, config.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    stats = mean_of(per_batch) if per_batch else {}
    stats["policy_passes_skipped"] = float(len(trajectories) - len(running))
    return StepStats(
        loss=stats.pop("loss", float("nan")),
        grad_norm=grad_norm,
        entropy=stats.pop("entropy", float("nan")),
        loss_stats=stats,
    )


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------


def train_step(trainer: Trainer) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """One GRPO step (docs/algorithm.md). Returns its metrics (averaged over ranks) and this
    rank's completions."""
    config, policy, timer = trainer.config, trainer.policy, Stopwatch()
    lr = trainer.scheduler.get_last_lr()[0]  # the rate this step's first update uses
    with timer("step"):
        # 1-3. sample G completions per prompt; rewards; group advantages; fixed log-probs
        trajectories = [
            collect(
                policy,
                trainer.sampler,
                trainer.task,
                trainer.stream,
                trainer.reward_specs,
                config,
                timer,
            )
            for _ in range(config.gradient_accumulation_steps)
        ]
        # 4-5. mu times: policy log-probs, loss, backward, all-reduce, clip, AdamW step
        with timer("backward"):
            for _ in range(config.num_iterations):
                stats = update(policy, trainer.optimizer, trainer.scheduler, trajectories, config)
        # 6. the sampler gets the new weights
        with timer("sync"):
            trainer.sampler.sync_weights(policy)
    # 7. log
    metrics = step_metrics(trajectories, stats, timer.seconds, lr)
    return reduce_metrics(metrics), [r for t in trajectories for r in t.records]


def step_metrics(
    trajectories: list[Trajectory], stats: StepStats, seconds: dict[str, float], lr: float
) -> dict[str, float]:
    tokens = sum(float(t.batch.completion_mask.sum()) for t in trajectories)
    return {
        **mean_of([t.metrics for t in trajectories]),
        "loss": stats.loss,
        "entropy": stats.entropy,
        "grad_norm": stats.grad_norm,
        **stats.loss_stats,
        **{f"time/{name}": value for name, value in seconds.items()},
        "lr": lr,
        "completion_tokens_per_second": tokens / seconds["step"],
    }


# --------------------------------------------------------------------------------------------
# Setup, checkpoints and the loop
# --------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def lr_lambda(config: TrainConfig, total_updates: int) -> Callable[[int], float]:
    """Multiplier of the base LR after `u` optimizer updates: linear warmup, then decay."""

    def factor(u: int) -> float:
        if u < config.warmup_steps:
            return (u + 1) / (config.warmup_steps + 1)
        progress = (u - config.warmup_steps) / max(1, total_updates - config.warmup_steps)
        if config.lr_scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if config.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return factor


# A run being replaced by --overwrite waits beside the new one until the new one's first
# checkpoint; the new run dir names it in this file (present <=> not yet saved).
REPLACES = ".replaces"


def check_run_dir(config: TrainConfig) -> None:
    """Refuse, before anything loads, to mix a new run into an old one or to resume nothing."""
    run_dir = config.run_dir
    if config.resume:
        if latest_valid_checkpoint(run_dir) is None:
            raise FileNotFoundError(f"--resume: no usable checkpoint in {run_dir}")
    elif _holds_run(run_dir) and not config.overwrite:
        raise FileExistsError(
            f"{run_dir} already holds a run: pass --resume to continue it, --overwrite "
            "to replace it, or --output-dir for a new one"
        )


def _holds_run(run_dir: Path) -> bool:
    return latest_checkpoint(run_dir) is not None or (run_dir / "metrics.jsonl").exists()


def prepare_run_dir(config: TrainConfig) -> Path:
    """Create the run dir. --overwrite moves the old run aside, not away (`REPLACES`);
    --resume writes nothing here (its flags are recorded once the resume has succeeded)."""
    check_run_dir(config)
    run_dir = config.run_dir
    if distributed.is_main_process() and not config.resume:
        if (run_dir / REPLACES).is_file():  # an earlier replacement died before saving
            shutil.rmtree(run_dir)  # the run it replaces is still aside; keep that one
        elif _holds_run(run_dir):
            aside = run_dir.parent / f".{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}"
            run_dir.rename(aside)
            run_dir.mkdir(parents=True)
            (run_dir / REPLACES).write_text(str(aside))
            print(f"--overwrite: the old run waits in {aside} until the first checkpoint")
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(config), encoding="utf-8")
    distributed.barrier()
    return run_dir


def settle_overwrite(run_dir: Path, succeeded: bool) -> None:
    """After the new run's first checkpoint, delete the run it replaces; if it failed before
    that, put the old run back exactly as it was."""
    pointer = run_dir / REPLACES
    if not distributed.is_main_process() or not pointer.is_file():
        return
    aside = Path(pointer.read_text())
    if succeeded:
        shutil.rmtree(aside, ignore_errors=True)
        pointer.unlink()
    elif aside.is_dir():
        shutil.rmtree(run_dir)
        aside.rename(run_dir)
        print(f"--overwrite: the new run failed before its first checkpoint; {run_dir} restored")


def load_policy(backend: ModelBackend, config: TrainConfig, device: torch.device) -> Policy:
    """The policy, its trainable weights equal on every rank (LoRA's A matrices are random;
    a fully fine-tuned model is read from the same files everywhere, so it already is)."""
    policy = backend.load_policy(config.policy_settings(), device)
    if policy.full:
        return policy
    for parameter in policy.trainable_parameters():
        parameter.data.copy_(distributed.broadcast_tensor(parameter.data))
    return policy


def report_visual_tokens(policy: Policy, samples: list[Sample]) -> None:
    """Print how many visual tokens the prompts carry at these pixel bounds: the number that
    decides memory and speed, and that a wrong --min/--max-pixels silently changes."""
    counts = sorted(visual_token_counts(policy, samples))
    if counts and distributed.is_main_process():
        median = counts[len(counts) // 2]
        print(
            f"visual tokens per prompt (over {len(counts)} samples): min {counts[0]}, "
            f"median {median}, max {counts[-1]}"
        )


def build_trainer(
    config: TrainConfig, info: distributed.DistInfo, backend: ModelBackend
) -> Trainer:
    """Check every setting, file and name first; then load data and model; then the run dir."""
    validate(config)
    task = get_task(config.task)
    reward_specs = check_inputs(config, task.default_rewards)
    check_run_dir(config)  # before minutes of loading, not after
    seed_everything(config.seed)  # same LoRA init and data order on every rank
    if config.cpu_lean_heap:
        host_heap.fix_mmap_threshold()  # RSS follows what torch holds, steps slower
    path = config.data or task.default_data(cache_root() / "data", "train")
    samples = load_samples(path, skip_bad=config.skip_bad_samples, **data_options(config))
    samples, eval_samples = split_samples(config, task, samples)  # never trained on
    policy = load_policy(backend, config, info.device)
    if config.fsdp:  # after the broadcast: every rank shards the same weights
        policy.shard(distributed.device_mesh(info), config.shard_settings())
    report_visual_tokens(policy, samples)
    images = max(len(s.images) for s in samples)
    sampler = backend.make_sampler(config.sampler_settings(images), policy)
    optimizer = torch.optim.AdamW(
        policy.trainable_parameters(),
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.weight_decay,
    )
    total_updates = config.max_steps * config.num_iterations
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, total_updates))
    run_dir = prepare_run_dir(config)
    logger = MetricsLogger(run_dir, distributed.is_main_process(), config.tensorboard, config)
    stream = PromptStream(samples, config.seed, info.rank, info.world_size)
    seed_everything(config.seed + 1_000_003 * info.rank)  # different samples on each rank
    trainer = Trainer(
        config, task, policy, sampler, optimizer, scheduler, stream, reward_specs, logger
    )
    trainer.eval_samples = eval_samples
    return trainer


def trainer_state(trainer: Trainer) -> dict[str, Any]:
    """What resumes the loop; a sharded run's optimizer state goes to sharded/ instead."""
    state = {
        "step": trainer.step,
        "scheduler": trainer.scheduler.state_dict(),
        "data_position": dataclasses.asdict(trainer.stream.position),
        "world_size": distributed.get_world_size(),
    }
    if not trainer.policy.sharded:
        state["optimizer"] = trainer.optimizer.state_dict()
    return state


def run_info(trainer: Trainer) -> dict[str, Any]:
    return {
        **trainer.policy.describe(),
        "task": trainer.config.task,
        "step": trainer.step,
        "config": dataclasses.asdict(trainer.config),
    }


def resume(trainer: Trainer) -> None:
    """Continue from the newest valid checkpoint of the run dir, as if never stopped.

    A checkpoint failing its manifest is skipped with a warning. The logs are cut back to the
    resumed step, so no step appears twice; config.yaml stays that of the run, and this
    start's settings go beside it as config.resume-<step>.yaml.
    """
    run_dir = trainer.config.run_dir
    checkpoint = latest_valid_checkpoint(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"--resume: no usable checkpoint in {run_dir}")
    state = load_checkpoint(checkpoint, trainer.policy, trainer.optimizer)
    if not trainer.policy.sharded:
        trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.stream.position = StreamPosition(**state["data_position"])
    trainer.step = state["step"]
    trainer.sampler.sync_weights(trainer.policy)
    if trainer.config.save_best:
        trainer.best = best_so_far(run_dir, trainer.config.save_best, trainer.step)
    if distributed.is_main_process():
        cut_logs_back(run_dir, trainer.step)
        record = run_dir / f"config.resume-{trainer.step}.yaml"
        record.write_text(to_yaml(trainer.config), encoding="utf-8")
    distributed.barrier()


def save(trainer: Trainer, run_dir: Path | None = None, extra: dict | None = None) -> Path:
    """checkpoint-<step> in the run dir (rotated by save_total_limit), or alone in `run_dir`
    (--save-best's best/, which keeps one)."""
    return save_checkpoint(
        run_dir or trainer.config.run_dir,
        trainer.step,
        trainer.policy,
        trainer_state(trainer),
        {**run_info(trainer), **(extra or {})},
        trainer.config.save_total_limit if run_dir is None else 1,
        trainer.optimizer,
    )


def evaluate_if_due(trainer: Trainer) -> dict[str, float]:
    """eval/<metric> when this step is an evaluation step (and --save-best's checkpoint)."""
    config = trainer.config
    if not trainer.eval_samples or not is_due(config, trainer.step):
        return {}
    metrics = evaluate_now(
        config, trainer.task, trainer.policy, trainer.sampler, trainer.eval_samples, trainer.step
    )
    return metrics


def keep_best_checkpoint(trainer: Trainer, metrics: dict[str, float]) -> None:
    def save_to(directory: Path, extra: dict) -> Path:
        return save(trainer, directory, extra)

    trainer.best = keep_best(trainer.config, metrics, trainer.step, trainer.best, save_to)


def show_completions(records: list[dict[str, Any]], step: int, count: int) -> None:
    from tqdm import tqdm

    for record in records[:count]:
        tqdm.write(
            f"[step {step}] reward {record['reward']:.3f} | "
            f"gold {record['solution']!r} | {record['completion'][:200]!r}"
        )


def log_step(trainer: Trainer, metrics: dict[str, float], records: list[dict[str, Any]]) -> None:
    trainer.logger.log(trainer.step, metrics)
    every = trainer.config.log_completions_steps
    if every and (trainer.step % every == 0 or trainer.step == 1):
        trainer.logger.completions(trainer.step, records)
        if distributed.is_main_process():
            show_completions(records, trainer.step, trainer.config.num_generations)


def train(config: TrainConfig, backend: ModelBackend) -> Path:
    """Run the whole training; returns the run directory.

    With --overwrite the old run is deleted only after the new run's first checkpoint, and
    put back if anything fails before that (`settle_overwrite`).
    """
    saved = False
    try:
        trainer = build_trainer(config, distributed.init_distributed(), backend)
        if config.resume:
            resume(trainer)
        if distributed.is_main_process():
            print(to_yaml(config))
        for _ in run_steps(trainer):
            if not saved:
                settle_overwrite(config.run_dir, succeeded=True)
            saved = True
    except BaseException:  # Ctrl-C too: the old run must come back
        if not saved and config.overwrite:
            settle_overwrite(config.run_dir, succeeded=False)
        raise
    if distributed.is_main_process():
        plot_rewards(trainer.logger.run_dir)
    trainer.logger.close()  # last: it writes the final report.html
    trainer.sampler.close()  # before the process group goes: vLLM's teardown uses it
    return config.run_dir


def run_steps(trainer: Trainer) -> Iterator[Path]:
    """The loop: step, log, and every save_steps (and always at the end) a checkpoint, which
    it yields."""
    from tqdm import tqdm

    config, main = trainer.config, distributed.is_main_process()
    bar = tqdm(total=config.max_steps, initial=trainer.step, disable=not main, desc="GRPO")
    # the curve starts at the base model (unless --eval-on-start false)
    if trainer.step == 0 and config.eval_on_start and (base := evaluate_if_due(trainer)):
        trainer.logger.log(0, base)
        keep_best_checkpoint(trainer, base)
    while trainer.step < config.max_steps:
        metrics, records = train_step(trainer)
        trainer.step += 1
        metrics.update(evaluate_if_due(trainer))
        log_step(trainer, metrics, records)
        keep_best_checkpoint(trainer, metrics)
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", kl=f"{metrics.get('kl', 0):.4f}")
        every = config.save_steps  # 0: only the final checkpoint
        if trainer.step == config.max_steps or (every and trainer.step % every == 0):
            checkpoint = save(trainer)
            trainer.logger.saved()  # report.html rebuilt at each save
            yield checkpoint
    bar.close()
