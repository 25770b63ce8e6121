"""The GRPO training loop, written out by hand. Read `train_step` top to bottom: it is the
algorithm of docs/algorithm.md and the data flow of DESIGN.md ("One training step").

    for each step:
        for each of `gradient_accumulation_steps` generation batches:
            sample G completions per prompt               (sampler: vLLM or transformers)
            score them, combine rewards, group advantages
            log-probs that stay fixed during the update:  reference (beta > 0), old (mu > 1)
        repeat mu = num_iterations times:
            policy log-probs -> GRPO loss -> backward     (every generation batch)
            average gradients across ranks, clip, AdamW step, LR schedule
        sync the new weights into the sampler; log; checkpoint
"""

from __future__ import annotations

import dataclasses
import math
import random
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from data import get_task, load_samples
from data.sample import DataError, Sample
from data.tasks import Task
from grpo import distributed
from grpo.advantages import combine_rewards, group_advantages
from grpo.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from grpo.config import TrainConfig, to_yaml
from grpo.data_stream import PromptStream, StreamPosition
from grpo.loss import grpo_loss
from grpo.metrics import MetricsLogger, plot_rewards, reduce_metrics
from grpo.rollout import PromptInput, Rollout, Sampler, SamplingSettings, TransformersSampler
from models.batch import RolloutBatch, select_rows
from models.cache import cache_root
from models.loading import LoraSettings
from models.policy import Policy, PolicySettings
from rewards import load_plugin, parse_reward_spec
from rewards.compute import score_completions


@dataclass
class GenerationBatch:
    """One generation batch of this rank, with everything the loss needs.

    N rows = prompts x G; rows that carry no signal may already have been dropped.
    """

    batch: RolloutBatch  # rows without signal already removed
    advantages: torch.Tensor  # [N]
    image_features: list[torch.Tensor] | None  # per prompt image, reused by every forward
    sampler_logp: torch.Tensor | None  # [N, T] log-probs reported by the sampler
    ref_logp: torch.Tensor | None = None  # [N, T] frozen reference (beta > 0)
    old_logp: torch.Tensor | None = None  # [N, T] policy before this step's updates (mu > 1)
    metrics: dict[str, float] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def loss_mask(self) -> torch.Tensor:
        """[N, T] the tokens that enter the loss: each kept row's completion up to its EOS."""
        return self.batch.completion_mask


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
    timers: dict[str, float] = field(default_factory=lambda: defaultdict(float))


# --------------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def load_training_samples(config: TrainConfig, task: Task) -> list[Sample]:
    path = config.data or task.default_data(cache_root() / "data", "train")
    return load_samples(path, skip_bad=config.skip_bad_samples)


def build_policy(config: TrainConfig, device: torch.device) -> Policy:
    lora = LoraSettings(config.lora_r, config.lora_alpha, 0.0, config.lora_vision)
    settings = PolicySettings(
        model=config.model,
        lora=lora,
        dtype=config.dtype,
        attn_implementation=config.attn_implementation,
        gradient_checkpointing=config.gradient_checkpointing,
        min_pixels=config.min_pixels,
        max_pixels=config.max_pixels,
        chunk_tokens=config.logprob_chunk_tokens,
        lean=config.lean,
    )
    policy = Policy(settings, device)
    # Dropout off for good: the policy that is trained must be the one that was sampled (and
    # that vLLM holds), or the ratios and the sampler/trainer comparison measure noise.
    policy.model.eval()
    # LoRA's A matrices are random: make every rank start from rank 0's
    for parameter in policy.trainable_parameters():
        parameter.data.copy_(distributed.broadcast_tensor(parameter.data))
    return policy


def build_sampler(config: TrainConfig, policy: Policy, max_images: int) -> Sampler:
    if config.sampler == "hf":
        return TransformersSampler(policy)
    from grpo.vllm_sampler import VLLMSampler, VLLMSettings

    settings = VLLMSettings(
        gpu_memory_utilization=config.vllm_gpu_memory_utilization,
        max_model_len=config.vllm_max_model_len,
        sync=config.vllm_sync,
        sleep=config.vllm_sleep,
        seed=config.seed,  # the sampler adds the rank
        max_images_per_prompt=max(1, max_images),
    )
    return VLLMSampler(policy, settings)


def lr_lambda(config: TrainConfig, total_updates: int):
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


def prepare_run_dir(config: TrainConfig) -> Path:
    """Create the run dir; refuse to mix a new run into an old one unless asked."""
    run_dir = config.run_dir
    if distributed.is_main_process():
        has_old = latest_checkpoint(run_dir) is not None or (run_dir / "metrics.jsonl").exists()
        if has_old and not config.resume:
            if not config.overwrite:
                raise FileExistsError(
                    f"{run_dir} already holds a run: pass --resume to continue it, --overwrite "
                    "to replace it, or --output-dir for a new one"
                )
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(config), encoding="utf-8")
    distributed.barrier()
    return run_dir


def build_trainer(config: TrainConfig, info: distributed.DistInfo) -> Trainer:
    seed_everything(config.seed)  # same LoRA init and data order on every rank
    task = get_task(config.task)
    for plugin in config.reward_plugin:
        load_plugin(plugin)
    reward_specs = parse_reward_spec(config.rewards or task.default_rewards)
    samples = load_training_samples(config, task)
    policy = build_policy(config, info.device)
    sampler = build_sampler(config, policy, max(len(s.images) for s in samples))
    optimizer = torch.optim.AdamW(
        policy.trainable_parameters(),
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.weight_decay,
    )
    total_updates = config.max_steps * config.num_iterations
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, total_updates))
    run_dir = prepare_run_dir(config)
    logger = MetricsLogger(run_dir, distributed.is_main_process(), config.tensorboard)
    stream = PromptStream(samples, config.seed, info.rank, info.world_size)
    seed_everything(config.seed + 1_000_003 * info.rank)  # different samples on each rank
    return Trainer(
        config, task, policy, sampler, optimizer, scheduler, stream, reward_specs, logger
    )


# --------------------------------------------------------------------------------------------
# One generation batch: sample -> rewards -> advantages -> fixed log-probs
# --------------------------------------------------------------------------------------------


def sampling_settings(config: TrainConfig) -> SamplingSettings:
    return SamplingSettings(
        max_new_tokens=config.max_completion_length,
        temperature=config.temperature,
        top_p=config.top_p,
        top_k=config.top_k,
    )


def prompt_inputs(trainer: Trainer, samples: list[Sample]) -> list[PromptInput]:
    return [
        trainer.policy.prompt_input(trainer.task.messages(s), [image.open() for image in s.images])
        for s in samples
    ]


def check_prompt_lengths(trainer: Trainer, samples: list[Sample], lengths: list[int]) -> None:
    """Prompts are never cut (a cut would drop image tokens): a long one is an error."""
    limit = trainer.config.max_prompt_length
    for sample, length in zip(samples, lengths, strict=True):
        if limit is not None and length > limit:
            images = f" with {len(sample.images)} image(s)" if sample.images else ""
            raise DataError(
                f"{sample.where}: prompt{images} is {length} tokens, over max_prompt_length="
                f"{limit}; prompts are never truncated (image tokens would be lost): raise "
                "--max-prompt-length or lower --max-pixels"
            )


def reward_columns(samples: list[Sample], group_size: int) -> tuple[dict[str, list], list[str]]:
    """Each sample's solution and other fields, repeated for its G completions."""
    rows = [s for s in samples for _ in range(group_size)]
    names = sorted({key for s in samples for key in s.columns} - {"solution"})
    columns = {"solution": [s.solution for s in rows]}
    columns.update({key: [s.columns.get(key) for s in rows] for key in names})
    return columns, [s.where for s in rows]


def score(
    trainer: Trainer, texts: list[str], samples: list[Sample]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-function rewards [N, K], combined reward [N]; NaN = no function applies)."""
    columns, where = reward_columns(samples, trainer.config.num_generations)
    per_function, weights = score_completions(trainer.reward_specs, texts, columns, where)
    return per_function, combine_rewards(per_function, weights)


def rows_with_signal(
    config: TrainConfig, rewards: torch.Tensor, truncated: torch.Tensor
) -> list[int]:
    """Rows that enter the loss: a reward exists, and (if asked) not truncated, and (if asked)
    the group's rewards are not all equal (such a group has zero advantage everywhere)."""
    keep = ~torch.isnan(rewards)  # [N]
    if config.mask_truncated_completions:
        keep &= ~truncated.cpu()
    if config.skip_zero_std_groups:
        groups = rewards.view(-1, config.num_generations)  # [P, G]
        spread = torch.nan_to_num(groups, nan=0.0).amax(1) != torch.nan_to_num(
            groups, nan=0.0
        ).amin(1)
        keep &= spread.repeat_interleave(config.num_generations)
    return keep.nonzero().flatten().tolist()


def generation_metrics(
    trainer: Trainer,
    per_function: torch.Tensor,
    rewards: torch.Tensor,
    advantages: torch.Tensor,
    batch: RolloutBatch,
) -> dict[str, float]:
    g = trainer.config.num_generations
    lengths = batch.completion_mask.sum(1)  # [N]
    groups = rewards.view(-1, g)  # [P, G]
    metrics = {
        "reward_mean": float(rewards.nanmean()),
        "reward_std": float(rewards[~rewards.isnan()].std())
        if (~rewards.isnan()).sum() > 1
        else 0.0,
        "reward_missing_frac": float(rewards.isnan().float().mean()),
        "zero_std_group_frac": float((groups.amax(1) == groups.amin(1)).float().mean()),
        "advantage_abs_mean": float(advantages.nan_to_num().abs().mean()),
        "advantage_max": float(advantages.nan_to_num().max()),
        "advantage_min": float(advantages.nan_to_num().min()),
        "completion_length_mean": float(lengths.float().mean()),
        "completion_length_max": float(lengths.max()),
        "truncated_frac": float(batch.truncated.float().mean()),
    }
    for k, (name, _) in enumerate(trainer.reward_specs):
        column = per_function[:, k]  # [N]
        known = column[~column.isnan()]
        metrics[f"reward/{name}_mean"] = float(known.mean()) if known.numel() else float("nan")
        metrics[f"reward/{name}_std"] = float(known.std()) if known.numel() > 1 else 0.0
    return metrics


def completion_records(
    samples: list[Sample],
    texts: list[str],
    rewards: torch.Tensor,
    advantages: torch.Tensor,
    group_size: int,
) -> list[dict[str, Any]]:
    return [
        {
            "where": samples[i // group_size].where,
            "solution": samples[i // group_size].solution,
            "completion": text,
            "reward": float(rewards[i]),
            "advantage": float(advantages[i]),
        }
        for i, text in enumerate(texts)
    ]


def collect_generation_batch(trainer: Trainer) -> GenerationBatch:
    config, policy, g = trainer.config, trainer.policy, trainer.config.num_generations
    samples = trainer.stream.next_batch(config.prompts_per_step)

    tic = time.perf_counter()
    prompts = prompt_inputs(trainer, samples)
    prompt_batch = policy.encode(prompts)
    check_prompt_lengths(trainer, samples, prompt_batch.attention_mask.sum(1).tolist())
    rollout: Rollout = trainer.sampler.generate(prompts, g, sampling_settings(config))
    trainer.timers["time/sample"] += time.perf_counter() - tic

    tic = time.perf_counter()
    texts = policy.decode(rollout.completion_ids)
    per_function, rewards = score(trainer, texts, samples)  # [N, K], [N]
    advantages = group_advantages(rewards, g, config.scale_rewards, config.advantage_eps)  # [N]
    trainer.timers["time/reward"] += time.perf_counter() - tic

    batch = policy.rollout_batch(prompt_batch, rollout.completion_ids, g)
    metrics = generation_metrics(trainer, per_function, rewards, advantages, batch)
    records = completion_records(samples, texts, rewards, advantages, g)
    sampler_logp = sampler_logprobs_tensor(rollout, batch)

    keep = rows_with_signal(config, rewards, batch.truncated)
    if len(keep) < batch.num_rows:
        batch = select_rows(batch, keep)
        advantages = advantages[keep]
        sampler_logp = None if sampler_logp is None else sampler_logp[keep]
    advantages = advantages.to(policy.device, torch.float32)  # [n]
    features = policy.image_features(prompt_batch) if keep else None
    generation = GenerationBatch(
        batch, advantages, features, sampler_logp, metrics=metrics, records=records
    )
    if keep:
        add_fixed_logprobs(trainer, generation)
    return generation


def sampler_logprobs_tensor(rollout: Rollout, batch: RolloutBatch) -> torch.Tensor | None:
    """The sampler's per-token log-probs as [N, T] aligned with the batch (NaN = unscored)."""
    if rollout.sampler_logprobs is None:
        return None
    from grpo.sampler_correction import pad_sampler_logprobs

    width = batch.completion_mask.shape[1]
    return pad_sampler_logprobs(rollout.sampler_logprobs, width).to(batch.completion_mask.device)


@torch.no_grad()
def add_fixed_logprobs(trainer: Trainer, generation: GenerationBatch) -> None:
    """Log-probs that do not change during this step's updates: reference and old policy."""
    config, policy = trainer.config, trainer.policy
    tic = time.perf_counter()
    if config.beta > 0:
        generation.ref_logp = policy.reference_logprobs(
            generation.batch, config.temperature, generation.image_features
        )
    if config.num_iterations > 1:
        generation.old_logp = policy.logprobs(
            generation.batch, config.temperature, image_features=generation.image_features
        ).logp
    trainer.timers["time/logprobs"] += time.perf_counter() - tic


# --------------------------------------------------------------------------------------------
# The update: loss, backward, all-reduce, clip, step
# --------------------------------------------------------------------------------------------


def importance_weights(
    trainer: Trainer, generation: GenerationBatch, old_logp: torch.Tensor
) -> tuple[torch.Tensor | None, dict[str, float]]:
    """Truncated IS weights correcting for sampler/trainer mismatch, and mismatch metrics."""
    if generation.sampler_logp is None:
        return None, {}
    from grpo.sampler_correction import mismatch_stats, truncated_is_weights

    stats = mismatch_stats(old_logp, generation.sampler_logp, generation.loss_mask)
    cap = trainer.config.importance_sampling_cap
    if cap is None:
        return None, stats
    return truncated_is_weights(old_logp, generation.sampler_logp, generation.loss_mask, cap), stats


def loss_on(
    trainer: Trainer, generation: GenerationBatch, num_items: float, accumulation: int
) -> dict[str, float]:
    """Forward + backward of one generation batch; returns its loss statistics."""
    config = trainer.config
    out = trainer.policy.logprobs(
        generation.batch,
        config.temperature,
        with_entropy=True,
        image_features=generation.image_features,
    )
    old_logp = generation.old_logp if generation.old_logp is not None else out.logp.detach()
    is_weights, mismatch = importance_weights(trainer, generation, old_logp)
    loss, stats = grpo_loss(
        out.logp,
        old_logp,
        generation.ref_logp,
        generation.advantages,
        generation.loss_mask,
        beta=config.beta,
        eps_low=config.epsilon_low,
        eps_high=config.epsilon_high,
        loss_type=config.loss_type,
        max_completion_length=config.max_completion_length,
        num_items=num_items,
        is_weights=is_weights,
    )
    # dapo's normaliser already spans every accumulated batch; the others are per-batch means
    scale = 1.0 if config.loss_type == "dapo" else 1.0 / accumulation
    (loss * scale).backward()
    mask = generation.loss_mask
    entropy = float((out.entropy * mask).sum() / mask.sum().clamp(min=1))
    return {
        "loss": float(loss.detach()),
        "entropy": entropy,
        **{k: float(v) for k, v in stats.items()},
        **{f"sampler/{k}": float(v) for k, v in mismatch.items()},
    }


def average_gradients(parameters: list[torch.nn.Parameter]) -> None:
    """Mean of the gradients over ranks, in one flat all-reduce.

    We call the backbone and the LM head separately (to project only completion positions),
    which DDP's wrapper cannot see; with LoRA the trainable tensors are small, so one explicit
    all-reduce per update is simple and cheap.
    """
    world = distributed.get_world_size()
    if world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = distributed.all_reduce_sum(torch.cat([g.flatten() for g in grads])) / world
    offset = 0
    for p in parameters:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def optimizer_update(trainer: Trainer, generations: list[GenerationBatch]) -> dict[str, float]:
    """One pass over this step's generation batches followed by one optimizer step."""
    config = trainer.config
    num_items = float(
        distributed.all_reduce_sum(torch.tensor(sum(float(g.loss_mask.sum()) for g in generations)))
    )
    stats: dict[str, list[float]] = defaultdict(list)
    tic = time.perf_counter()
    for generation in generations:
        if generation.batch.num_rows == 0:
            continue  # no row with signal on this rank; other ranks may still have some
        for key, value in loss_on(
            trainer, generation, max(num_items, 1.0), len(generations)
        ).items():
            stats[key].append(value)
    parameters = trainer.policy.trainable_parameters()
    average_gradients(parameters)
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
    trainer.optimizer.step()
    trainer.scheduler.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.timers["time/backward"] += time.perf_counter() - tic
    out = {key: sum(values) / len(values) for key, values in stats.items()}
    return {**out, "grad_norm": float(grad_norm)}


# --------------------------------------------------------------------------------------------
# The step and the loop
# --------------------------------------------------------------------------------------------


def train_step(trainer: Trainer) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """One GRPO step. Returns its metrics (averaged over ranks) and this rank's completions."""
    config = trainer.config
    trainer.timers.clear()
    tic = time.perf_counter()

    generations = [
        collect_generation_batch(trainer) for _ in range(config.gradient_accumulation_steps)
    ]

    update_stats: dict[str, float] = {}
    for _ in range(config.num_iterations):
        update_stats = optimizer_update(trainer, generations)

    sync_tic = time.perf_counter()
    trainer.sampler.sync_weights(trainer.policy)
    trainer.timers["time/sync"] += time.perf_counter() - sync_tic

    step_time = time.perf_counter() - tic
    tokens = sum(float(g.batch.completion_mask.sum()) for g in generations)
    metrics = mean_of([g.metrics for g in generations])
    metrics.update(update_stats)
    metrics.update(trainer.timers)
    metrics.update(
        {
            "lr": trainer.scheduler.get_last_lr()[0],
            "time/step": step_time,
            "completion_tokens_per_second": tokens / step_time,
        }
    )
    return reduce_metrics(metrics), [r for g in generations for r in g.records]


def mean_of(dicts: list[dict[str, float]]) -> dict[str, float]:
    keys = dicts[0].keys()
    return {k: sum(d[k] for d in dicts) / len(dicts) for k in keys}


def trainer_state(trainer: Trainer) -> dict[str, Any]:
    return {
        "step": trainer.step,
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "data_position": dataclasses.asdict(trainer.stream.position),
    }


def run_info(trainer: Trainer) -> dict[str, Any]:
    return {
        "base_model": trainer.config.model,
        "base_model_path": trainer.policy.path,
        "task": trainer.config.task,
        "step": trainer.step,
        "config": dataclasses.asdict(trainer.config),
    }


def resume(trainer: Trainer) -> None:
    """Continue from the latest checkpoint of the run dir, as if never stopped."""
    checkpoint = latest_checkpoint(trainer.config.run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {trainer.config.run_dir}")
    state = load_checkpoint(checkpoint, trainer.policy.model)
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.stream.position = StreamPosition(**state["data_position"])
    trainer.step = state["step"]
    trainer.sampler.sync_weights(trainer.policy)


def save(trainer: Trainer) -> Path:
    return save_checkpoint(
        trainer.config.run_dir,
        trainer.step,
        trainer.policy.model,
        trainer_state(trainer),
        run_info(trainer),
        trainer.config.save_total_limit,
    )


def show_completions(trainer: Trainer, records: list[dict[str, Any]]) -> None:
    from tqdm import tqdm

    for record in records[: trainer.config.num_generations]:
        tqdm.write(
            f"[step {trainer.step}] reward {record['reward']:.3f} | "
            f"gold {record['solution']!r} | {record['completion'][:200]!r}"
        )


def train(config: TrainConfig) -> Path:
    """Run the whole training; returns the run directory."""
    from tqdm import tqdm

    info = distributed.init_distributed()
    trainer = build_trainer(config, info)
    if config.resume:
        resume(trainer)
    main = distributed.is_main_process()
    if main:
        print(to_yaml(config))
    bar = tqdm(total=config.max_steps, initial=trainer.step, disable=not main, desc="GRPO")
    while trainer.step < config.max_steps:
        metrics, records = train_step(trainer)
        trainer.step += 1
        trainer.logger.log(trainer.step, metrics)
        every = config.log_completions_steps
        if every and (trainer.step % every == 0 or trainer.step == 1):
            trainer.logger.completions(trainer.step, records)
            if main:
                show_completions(trainer, records)
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", kl=f"{metrics.get('kl', 0):.4f}")
        if config.save_steps and (
            trainer.step % config.save_steps == 0 or trainer.step == config.max_steps
        ):
            save(trainer)
    bar.close()
    if main:
        plot_rewards(trainer.logger.run_dir)
    trainer.logger.close()
    close = getattr(trainer.sampler, "close", None)
    if close is not None:
        close()  # before the process group goes: vLLM's teardown uses it
    return config.run_dir
