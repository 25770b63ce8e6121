"""Evaluating a trained checkpoint: greedy answers on a validation set, scored per task.

    evaluate(EvalSettings(ckpt="runs/ocr/checkpoint-100", compare_base=True), models.BACKEND)

What --ckpt / --model load: grpo/checkpoint.py `resolve_source`. Every prompt is the task's
evaluation prompt (or its training prompt with --train-prompt), built as in training
(grpo/rollout.py), sampled greedily, in batches, by vLLM or transformers. The metrics are
rewards/scoring.py's, plus truncation rate and mean completion length. With --compare-base the
base model answers the same prompts; each metric's delta is checkpoint - base.

Outputs in the output directory: predictions.jsonl (one record per sample), and with
--compare-base base_predictions.jsonl; summary.json; and a table on stdout.
"""

from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from data import get_task, load_samples
from data.cache import cache_root
from data.sample import Sample
from data.tasks import Task
from grpo import distributed
from grpo.checkpoint import CheckpointError, ModelSource, resolve_source
from grpo.config import task_preset
from grpo.rollout import task_prompts
from grpo.types import (
    ModelBackend,
    Policy,
    PolicySettings,
    Sampler,
    SamplerSettings,
    SamplingSettings,
)
from rewards import load_plugin, parse_reward_spec
from rewards.answer import answer_or_text
from rewards.scoring import score_predictions


class EvaluationError(CheckpointError):
    """Bad evaluation input: a missing or unrecognised checkpoint, conflicting options."""


@dataclass(frozen=True)
class EvalSettings:
    """Everything `evaluate.py` accepts (see its --help)."""

    ckpt: str | None = None
    model: str | None = None
    task: str | None = None  # None: the checkpoint's task, else "ocr"
    data: str | None = None  # None: the task's built-in evaluation split
    limit: int | None = None
    skip_bad_samples: bool = False
    batch_size: int | None = None  # None: 8 with transformers, 64 with vLLM
    max_new_tokens: int = 256
    sampler: str | None = None  # "hf" | "vllm" | None (vllm if importable and CUDA is present)
    compare_base: bool = False
    out: str | None = None
    train_prompt: bool = False  # the task's training prompt instead of its evaluation prompt
    rewards: str | None = None  # None: the task's training and evaluation rewards
    reward_plugin: list[str] = field(default_factory=list)
    dtype: str | None = None
    attn_implementation: str | None = None
    min_pixels: int | None = None  # None: the training run's setting, else the processor's
    max_pixels: int | None = None
    vllm_gpu_memory_utilization: float = 0.5
    vllm_max_model_len: int = 4096


def default_output_dir(source: ModelSource) -> Path:
    """<run>/eval/checkpoint-N for a training checkpoint (beside it, not in it: checkpoint
    rotation deletes whole checkpoint folders), <model>/eval for a merged model, and
    ./eval-<model name> for a plain model."""
    if source.kind == "checkpoint" and source.path is not None:
        return source.path.parent / "eval" / source.path.name
    if source.path is not None:
        return source.path / "eval"
    return Path(f"eval-{Path(source.model).name or 'model'}")


def policy_settings(
    settings: EvalSettings, source: ModelSource, preset: dict[str, Any] | None = None
) -> PolicySettings:
    """Images sized as in training (so the base model of --compare-base sees the same pixels)
    unless overridden: the bounds recorded with the checkpoint, else (a plain model) those of
    the task's preset `preset`; the rest from the command line."""
    recorded = {**(preset or {}), **source.run_config, **source.run}  # export_info.json on top
    return PolicySettings(
        model=source.model,
        lora_r=0,
        dtype=settings.dtype,
        attn_implementation=settings.attn_implementation,
        min_pixels=settings.min_pixels or recorded.get("min_pixels"),
        max_pixels=settings.max_pixels or recorded.get("max_pixels"),
    )


def choose_sampler(requested: str | None) -> str:
    """Which backend: "hf" or "vllm"; by default vLLM when it is installed and CUDA is available."""
    if requested not in (None, "hf", "vllm"):
        raise EvaluationError(f"--sampler must be 'hf' or 'vllm', got {requested!r}")
    if requested is not None:
        if requested == "vllm" and importlib.util.find_spec("vllm") is None:
            raise EvaluationError("--sampler vllm: vllm is not installed ('.[gpu]' or '.[cpu]')")
        return requested
    has_vllm = importlib.util.find_spec("vllm") is not None
    return "vllm" if has_vllm and torch.cuda.is_available() else "hf"


class Generator:
    """Greedy completions from one policy at a time. A vLLM engine is created once; a later
    policy (or the same one with its adapter disabled) gets its weights pushed into it."""

    def __init__(self, backend: ModelBackend, settings: EvalSettings) -> None:
        self.backend = backend
        self.settings = SamplerSettings(
            backend=settings.sampler or "hf",
            gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
            max_model_len=settings.vllm_max_model_len,
        )
        self.engine: Sampler | None = None

    def sampler_for(self, policy: Policy, fresh: bool) -> Sampler:
        if self.settings.backend == "hf":
            return self.backend.make_sampler(self.settings, policy)
        if self.engine is None:
            self.engine = self.backend.make_sampler(self.settings, policy)
            if fresh:
                return self.engine  # the engine loaded these very weights from the policy's path
        self.engine.sync_weights(policy)  # the adapter merged in, or another model's weights
        return self.engine


def generate_all(
    policy: Policy, sampler: Sampler, task: Task, samples: list[Sample], settings: EvalSettings
) -> list[list[int]]:
    """One greedy completion per sample, `batch_size` prompts at a time (images opened per
    batch, so a large set is never held decoded in memory)."""
    from tqdm import tqdm

    greedy = SamplingSettings(max_new_tokens=settings.max_new_tokens, greedy=True)
    size = settings.batch_size or (64 if settings.sampler == "vllm" else 8)
    completions: list[list[int]] = []
    for start in tqdm(range(0, len(samples), size), desc="evaluate", leave=False):
        batch = samples[start : start + size]
        prompts = task_prompts(policy, task, batch, evaluation=not settings.train_prompt)
        completions.extend(sampler.generate(prompts, 1, greedy).completion_ids)
    return completions


def reward_specs(task: Task, override: str | None) -> list[tuple[str, float]]:
    """The rewards whose means are reported: --rewards, else the task's (train and eval)."""
    if override:
        return parse_reward_spec(override)
    names: dict[str, float] = {}
    for spec in (task.eval_rewards, task.default_rewards):
        for name, _ in parse_reward_spec(spec):
            names.setdefault(name, 1.0)
    return list(names.items())


def run_model(
    policy: Policy,
    generator: Generator,
    task: Task,
    samples: list[Sample],
    settings: EvalSettings,
    specs: list[tuple[str, float]],
    fresh: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Generate, decode and score; returns (prediction records, metrics). `fresh`: the policy
    holds exactly the weights stored at its path (nothing to push into a new engine)."""
    sampler = generator.sampler_for(policy, fresh)
    return evaluate_policy(policy, sampler, task, samples, settings, specs)


def evaluate_policy(
    policy: Policy,
    sampler: Sampler,
    task: Task,
    samples: list[Sample],
    settings: EvalSettings,
    specs: list[tuple[str, float]],
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Greedy completions of `sampler` (holding `policy`'s weights), scored: the one function
    evaluate.py and evaluation during training (grpo/trainer.py) share, so both report the
    same numbers. Under torchrun every rank generates its shard (samples[rank::world]); the
    completions are gathered, so every rank scores the whole set and returns the same."""
    tic = time.perf_counter()
    rank, world = distributed.get_rank(), distributed.get_world_size()
    shard = generate_all(policy, sampler, task, samples[rank::world], settings)
    completions = gather_shards(shard, len(samples)) if world > 1 else shard
    seconds = time.perf_counter() - tic
    return score_completions_of(policy, task, samples, completions, specs, seconds)


def gather_shards(shard: list[list[int]], total: int) -> list[list[int]]:
    """Every rank's samples[rank::world] completions, back in the samples' order."""
    parts = distributed.all_gather_object(shard)
    world = len(parts)
    return [parts[i % world][i // world] for i in range(total)]


def score_completions_of(
    policy: Policy,
    task: Task,
    samples: list[Sample],
    completions: list[list[int]],
    specs: list[tuple[str, float]],
    seconds: float,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Decode and score one completion per sample: prediction records and the metrics."""
    texts = policy.decode(completions)
    main_reward = parse_reward_spec(task.eval_rewards)[0][0]
    rows, metrics = score_predictions(main_reward, samples, texts, specs)
    stops = policy.stop_ids
    truncated = [not ids or ids[-1] not in stops for ids in completions]
    metrics["truncated_rate"] = sum(truncated) / len(truncated)
    metrics["completion_tokens_mean"] = sum(map(len, completions)) / len(completions)
    metrics["seconds"] = seconds
    records = [
        {
            "index": i,
            "where": s.where,
            "query": s.query,
            "solution": s.solution,
            "prediction": text,
            "answer": answer_or_text(text),
            "num_tokens": len(ids),
            "truncated": cut,
            **row,
        }
        for i, (s, text, ids, cut, row) in enumerate(
            zip(samples, texts, completions, truncated, rows, strict=True)
        )
    ]
    return records, metrics


def deltas(model: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    """model - base for every metric both have (timings excluded)."""
    return {k: model[k] - base[k] for k in model if k in base and k != "seconds"}


@dataclass
class EvalReport:
    summary: dict[str, Any]
    predictions: list[dict[str, Any]]
    base_predictions: list[dict[str, Any]] | None
    out_dir: Path


def evaluate(settings: EvalSettings, backend: ModelBackend) -> EvalReport:
    """Evaluate (and compare); write predictions, summary.json; return the report."""
    source = resolve_source(settings.ckpt, settings.model, backend.check_same_base)
    if settings.compare_base and (source.kind == "model" or source.base is None):
        raise EvaluationError(
            "--compare-base: no base model to compare with; for a plain model or a merged "
            "model without export_info.json, name the base with --model"
        )
    task = get_task(settings.task or source.task or "ocr")
    for plugin in settings.reward_plugin:
        load_plugin(plugin)
    specs = reward_specs(task, settings.rewards)
    data_path = settings.data or str(task.default_data(cache_root() / "data", "eval"))
    samples = load_samples(
        data_path,
        skip_bad=settings.skip_bad_samples,
        limit=settings.limit,
        allow_empty_solution=True,
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    settings = replace(settings, sampler=choose_sampler(settings.sampler))
    generator = Generator(backend, settings)

    load = backend.load_trained
    # a plain model takes the task preset's pixel bounds; a checkpoint those it trained with
    preset = task_preset(task.name) if source.kind == "model" else None
    policy = load(source.model, source.adapter, policy_settings(settings, source, preset), device)
    fresh = source.adapter is None
    records, metrics = run_model(policy, generator, task, samples, settings, specs, fresh)
    base_records = base_metrics = None
    if settings.compare_base:
        if source.adapter is not None:  # the same model with its adapter switched off
            with policy.adapter_disabled():
                base_records, base_metrics = run_model(
                    policy, generator, task, samples, settings, specs
                )
        else:  # a merged model: load its base in place of it
            del policy
            base = load(source.base, None, policy_settings(settings, source, preset), device)
            base_records, base_metrics = run_model(base, generator, task, samples, settings, specs)

    summary: dict[str, Any] = {
        "source": source.kind,
        "checkpoint": str(source.path) if source.path else None,
        "model": source.model,
        "adapter": str(source.adapter) if source.adapter else None,
        "base_model": source.base,
        "task": task.name,
        "data": data_path,
        "num_samples": len(samples),
        "sampler": settings.sampler,
        "settings": asdict(settings),
        "metrics": metrics,
    }
    if base_metrics is not None:
        summary["base_metrics"] = base_metrics
        summary["delta"] = deltas(metrics, base_metrics)
    out_dir = Path(settings.out) if settings.out else default_output_dir(source)
    write_outputs(out_dir, summary, records, base_records)
    return EvalReport(summary, records, base_records, out_dir)


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_outputs(
    out_dir: Path,
    summary: dict[str, Any],
    records: list[dict[str, Any]],
    base_records: list[dict[str, Any]] | None,
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "predictions.jsonl", records)
    if base_records is not None:
        write_jsonl(out_dir / "base_predictions.jsonl", base_records)
    text = json.dumps(summary, indent=1, ensure_ascii=False, default=str)
    (out_dir / "summary.json").write_text(text + "\n", encoding="utf-8")
