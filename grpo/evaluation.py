"""Evaluating a trained checkpoint: greedy answers on a validation set, scored per task.

    evaluate(EvalSettings(ckpt="runs/ocr/checkpoint-100", compare_base=True))

What is loaded (`resolve_source`), from --ckpt and --model:
- a checkpoint-N directory (adapter/ + run.json): the base model named in run.json (or
  --model, checked to be the same architecture) with the adapter on it;
- a run directory: its latest checkpoint-N;
- a merged model directory (config.json, e.g. from `evaluate.py export`): that model;
- no --ckpt: the plain model --model.

Every prompt is the task's evaluation prompt (or its training prompt with --train-prompt),
sampled greedily, in batches, by vLLM or transformers. Metrics are computed on two views of
each completion: "raw", the completion stripped, and "answer", the content of its last
<answer>...</answer> block (the whole completion when there is none):
- text tasks (main reward `ocr`): text accuracy, CER, exact match (rewards/ocr_metrics.py);
- other tasks: accuracy = fraction of samples whose main reward (the first of the task's
  eval_rewards) is 1. The raw view scores the completion as the trainer's reward does; the
  answer view scores the extracted answer wrapped in <answer> tags, so a reward that reads only
  the answer block also accepts a bare answer;
- every task: format rate (the <think>..</think><answer>..</answer> layout), the mean of each
  of the task's rewards on the raw completion, truncation rate and mean completion length.
With --compare-base the base model answers the same prompts; each metric's delta is
checkpoint - base.

Outputs in the output directory: predictions.jsonl (one record per sample), and with
--compare-base base_predictions.jsonl; summary.json; and a table on stdout.
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from data import get_task, load_samples
from data.sample import Sample
from data.tasks import Task
from grpo.checkpoint import latest_checkpoint, read_run_info
from grpo.rollout import PromptInput, Sampler, SamplingSettings, TransformersSampler
from grpo.trainer import reward_columns
from models.cache import cache_root
from models.export import (
    ADAPTER_CONFIG,
    EXPORT_INFO,
    adapter_disabled,
    check_output_dir,
    check_same_base,
    export_merged,
    load_policy,
    stored_dtype,
)
from models.merge import lora_linears
from models.policy import Policy, PolicySettings
from rewards import load_plugin, parse_reward_spec, score_completions
from rewards.answer import answer_or_text
from rewards.format import follows_format
from rewards.ocr_metrics import edit_distance, exact_match, ocr_metrics, text_accuracy

TEXT_REWARDS = ("ocr",)  # a task whose main reward is one of these is scored as text
VIEWS = ("raw", "answer")


class EvaluationError(ValueError):
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


@dataclass(frozen=True)
class ModelSource:
    """What --ckpt / --model resolve to.

    model:   what to load (a base model under an adapter, or the model itself);
    adapter: the peft adapter directory, for a training checkpoint;
    base:    the model to compare against (None: unknown);
    run:     run.json of the checkpoint or export_info.json of a merged model ({} if none).
    """

    kind: str  # "checkpoint" | "merged" | "model"
    model: str
    adapter: Path | None
    base: str | None
    path: Path | None
    run: dict[str, Any]

    @property
    def task(self) -> str | None:
        return self.run.get("task")

    @property
    def run_config(self) -> dict[str, Any]:
        return self.run.get("config") or {}


# --------------------------------------------------------------------------------------------
# What to load
# --------------------------------------------------------------------------------------------


def _is_missing_dir(name: str) -> bool:
    return name.startswith(("/", ".", "~")) and not Path(name).expanduser().is_dir()


def trained_base(run: dict[str, Any]) -> str | None:
    """The base model a run trained: its resolved path if present here, else its name."""
    candidates = [run.get("base_model_path"), run.get("base_model")]
    usable = [str(c) for c in candidates if c and not _is_missing_dir(str(c))]
    return usable[0] if usable else None


def _checkpoint_base(run: dict[str, Any], where: Path, model: str | None) -> str:
    """The base model under a checkpoint's adapter: --model (checked) or the one in run.json."""
    named = run.get("base_model_path") or run.get("base_model")
    if not named:
        raise EvaluationError(f"{where}: run.json names no base model; pass --model")
    base = trained_base(run)
    if model is not None:
        if base is not None:
            check_same_base(base, model)
        return model
    if base is None:
        raise EvaluationError(
            f"{where}: the base model {named} it was trained on is not on this machine; "
            "pass --model with its location"
        )
    return base


def resolve_source(ckpt: str | None, model: str | None) -> ModelSource:
    """Interpret --ckpt and --model (module docstring)."""
    if ckpt is None:
        if model is None:
            raise EvaluationError("give --ckpt (a checkpoint or merged model) or --model")
        return ModelSource("model", model, None, None, None, {})
    path = Path(ckpt).expanduser()
    if not path.exists():
        raise EvaluationError(f"--ckpt {ckpt}: no such file or directory")
    if (path / "run.json").is_file() and (path / "adapter").is_dir():
        run = read_run_info(path)
        base = _checkpoint_base(run, path, model)
        return ModelSource("checkpoint", base, path / "adapter", base, path, run)
    if (path / ADAPTER_CONFIG).is_file():  # an adapter folder: inside a checkpoint, or bare
        if (path.parent / "run.json").is_file():
            return replace(resolve_source(str(path.parent), model), adapter=path)
        named = json.loads((path / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        run = {"base_model": named} if named else {}
        base = _checkpoint_base(run, path, model)
        return ModelSource("checkpoint", base, path, base, path, run)
    if (latest := latest_checkpoint(path)) is not None:  # a run directory
        return resolve_source(str(latest), model)
    if (path / "config.json").is_file():
        info_file = path / EXPORT_INFO
        run = json.loads(info_file.read_text()) if info_file.is_file() else {}
        base = model or trained_base(run)
        return ModelSource("merged", str(path), None, base, path, run)
    raise EvaluationError(
        f"--ckpt {ckpt}: not a checkpoint (adapter/ + run.json), a run directory "
        "(checkpoint-N), or a model directory (config.json)"
    )


def default_output_dir(source: ModelSource) -> Path:
    """<ckpt>/eval, or ./eval-<model name> for a plain model."""
    if source.path is not None:
        return source.path / "eval"
    return Path(f"eval-{Path(source.model).name or 'model'}")


def policy_settings(settings: EvalSettings, source: ModelSource) -> PolicySettings:
    """Images sized as in training (so the base model of --compare-base sees the same pixels)
    unless overridden; the rest from the command line."""
    recorded = {**source.run_config, **source.run}  # export_info.json records them on top
    return PolicySettings(
        lora=None,
        dtype=settings.dtype,
        attn_implementation=settings.attn_implementation,
        min_pixels=settings.min_pixels or recorded.get("min_pixels"),
        max_pixels=settings.max_pixels or recorded.get("max_pixels"),
    )


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


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
    """Greedy completions from one policy at a time. The vLLM engine is created once; a later
    policy (or the same one with its adapter disabled) gets its weights pushed into it."""

    def __init__(self, backend: str, settings: EvalSettings) -> None:
        self.backend = backend
        self.settings = settings
        self.engine: Any = None

    def sampler_for(self, policy: Policy) -> Sampler:
        if self.backend == "hf":
            return TransformersSampler(policy)
        from grpo.vllm_sampler import VLLMSampler, VLLMSettings

        if self.engine is None:
            self.engine = VLLMSampler(
                policy,
                VLLMSettings(
                    gpu_memory_utilization=self.settings.vllm_gpu_memory_utilization,
                    max_model_len=self.settings.vllm_max_model_len,
                ),
            )
            if not lora_linears(policy.model):
                return self.engine  # the engine loaded these very weights from policy.path
        self.engine.sync_weights(policy)  # the adapter merged in, or another model's weights
        return self.engine


def prompt_inputs(
    policy: Policy, task: Task, samples: list[Sample], train_prompt: bool
) -> list[PromptInput]:
    return [
        policy.prompt_input(
            task.messages(s, evaluation=not train_prompt), [image.open() for image in s.images]
        )
        for s in samples
    ]


def generate_all(
    policy: Policy, sampler: Sampler, task: Task, samples: list[Sample], settings: EvalSettings
) -> list[list[int]]:
    """One greedy completion per sample, `batch_size` prompts at a time (images opened per
    batch, so a large set is never held decoded in memory)."""
    from tqdm import tqdm

    greedy = SamplingSettings(max_new_tokens=settings.max_new_tokens, greedy=True)
    size = settings.batch_size or (8 if isinstance(sampler, TransformersSampler) else 64)
    completions: list[list[int]] = []
    for start in tqdm(range(0, len(samples), size), desc="evaluate", leave=False):
        batch = samples[start : start + size]
        prompts = prompt_inputs(policy, task, batch, settings.train_prompt)
        completions.extend(sampler.generate(prompts, 1, greedy).completion_ids)
    return completions


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def reward_specs(task: Task, override: str | None) -> list[tuple[str, float]]:
    """The rewards whose means are reported: --rewards, else the task's (train and eval)."""
    if override:
        return parse_reward_spec(override)
    names: dict[str, float] = {}
    for spec in (task.eval_rewards, task.default_rewards):
        for name, _ in parse_reward_spec(spec):
            names.setdefault(name, 1.0)
    return list(names.items())


def views(text: str) -> dict[str, str]:
    """The two views of a completion that metrics are computed on (module docstring)."""
    return {"raw": text.strip(), "answer": answer_or_text(text)}


def nan_mean(values: list[float | None]) -> float:
    """Mean over the values that are not None/NaN; NaN when there are none."""
    known = [v for v in values if v is not None and not math.isnan(v)]
    return sum(known) / len(known) if known else float("nan")


def text_metrics(texts: list[str], samples: list[Sample]) -> tuple[list[dict], dict[str, float]]:
    """Per-sample and corpus text accuracy / CER / exact match, on both views."""
    labels = [answer_or_text(s.solution) for s in samples]
    rows: list[dict[str, float]] = [{} for _ in texts]
    summary: dict[str, float] = {}
    for view in VIEWS:
        predictions = [views(t)[view] for t in texts]
        for row, p, g in zip(rows, predictions, labels, strict=True):
            row[f"text_accuracy/{view}"] = text_accuracy(p, g)
            row[f"exact_match/{view}"] = exact_match(p, g)
            row[f"edit_distance/{view}"] = edit_distance(p, g)
        for name, value in ocr_metrics(predictions, labels).items():
            summary[f"{name}/{view}"] = value
    return rows, summary


def accuracy_metrics(
    texts: list[str], samples: list[Sample], main_reward: str
) -> tuple[list[dict], dict[str, float | None]]:
    """accuracy/<view>: the main reward equals 1 (None where it does not apply)."""
    columns, where = reward_columns(samples, 1)
    rows: list[dict[str, float | None]] = [{} for _ in texts]
    summary: dict[str, float] = {}
    for view in VIEWS:
        inputs = texts if view == "raw" else [f"<answer>{views(t)[view]}</answer>" for t in texts]
        scores, _ = score_completions([(main_reward, 1.0)], inputs, columns, where)  # [N, 1]
        for row, value in zip(rows, scores[:, 0].tolist(), strict=True):
            row[f"accuracy/{view}"] = None if math.isnan(value) else float(value == 1.0)
        summary[f"accuracy/{view}"] = nan_mean([r[f"accuracy/{view}"] for r in rows])
    return rows, summary


def score_predictions(
    task: Task,
    samples: list[Sample],
    texts: list[str],
    specs: list[tuple[str, float]],
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """(per-sample metric dicts, corpus metrics) for the decoded completions."""
    main_reward = parse_reward_spec(task.eval_rewards)[0][0]
    if main_reward in TEXT_REWARDS:
        rows, summary = text_metrics(texts, samples)
    else:
        rows, summary = accuracy_metrics(texts, samples, main_reward)
    formats = [float(follows_format(t)) for t in texts]
    summary["format_rate"] = nan_mean(formats)
    columns, where = reward_columns(samples, 1)
    per_function, _ = score_completions(specs, texts, columns, where)  # [N, K]
    for k, (name, _) in enumerate(specs):
        values = [None if math.isnan(v) else v for v in per_function[:, k].tolist()]
        summary[f"reward/{name}"] = nan_mean(values)
        for row, value in zip(rows, values, strict=True):
            row[f"reward/{name}"] = value
    for row, value in zip(rows, formats, strict=True):
        row["format"] = value
    return rows, summary


# --------------------------------------------------------------------------------------------
# One model, the comparison, the report
# --------------------------------------------------------------------------------------------


def run_model(
    policy: Policy,
    generator: Generator,
    task: Task,
    samples: list[Sample],
    settings: EvalSettings,
    specs: list[tuple[str, float]],
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Generate, decode and score; returns (prediction records, metrics)."""
    sampler = generator.sampler_for(policy)
    tic = time.perf_counter()
    completions = generate_all(policy, sampler, task, samples, settings)
    seconds = time.perf_counter() - tic
    texts = policy.decode(completions)
    rows, metrics = score_predictions(task, samples, texts, specs)
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


def load_eval_samples(settings: EvalSettings, task: Task) -> tuple[str, list[Sample]]:
    """(data path, samples): --data or the task's built-in evaluation split."""
    path = settings.data or str(task.default_data(cache_root() / "data", "eval"))
    return path, load_samples(path, skip_bad=settings.skip_bad_samples, limit=settings.limit)


def evaluate(settings: EvalSettings) -> EvalReport:
    """Evaluate (and compare); write predictions, summary.json; return the report."""
    source = resolve_source(settings.ckpt, settings.model)
    if settings.compare_base and (source.kind == "model" or source.base is None):
        raise EvaluationError(
            "--compare-base: no base model to compare with; for a plain model or a merged "
            "model without export_info.json, name the base with --model"
        )
    task = get_task(settings.task or source.task or "ocr")
    for plugin in settings.reward_plugin:
        load_plugin(plugin)
    specs = reward_specs(task, settings.rewards)
    data_path, samples = load_eval_samples(settings, task)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = Generator(choose_sampler(settings.sampler), settings)

    policy = load_policy(source.model, source.adapter, policy_settings(settings, source), device)
    records, metrics = run_model(policy, generator, task, samples, settings, specs)
    base_records = base_metrics = None
    if settings.compare_base:
        if source.adapter is not None:  # the same model with its adapter switched off
            with adapter_disabled(policy):
                base_records, base_metrics = run_model(
                    policy, generator, task, samples, settings, specs
                )
        else:  # a merged model: load its base in place of it
            del policy
            base = load_policy(source.base, None, policy_settings(settings, source), device)
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
        "sampler": generator.backend,
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


def format_table(summary: dict[str, Any]) -> str:
    """The metrics as aligned text columns: metric, model[, base, delta]."""
    metrics, base = summary["metrics"], summary.get("base_metrics")
    delta = summary.get("delta", {})
    lines = [["metric", "model"] + (["base", "delta"] if base else [])]
    for name, value in metrics.items():
        row = [name, f"{value:.4f}"]
        if base:
            row += [f"{base[name]:.4f}", f"{delta[name]:+.4f}" if name in delta else ""]
        lines.append(row)
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    aligned = [
        [
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ]
        for line in lines
    ]
    return "\n".join("  ".join(cells).rstrip() for cells in aligned)


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def export_checkpoint(
    ckpt: str,
    out: str,
    model: str | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Merge a checkpoint's adapter into its base and save the full model to `out`.

    dtype: of the saved weights; None: the dtype the base model is stored in.
    """
    source = resolve_source(ckpt, model)
    if source.adapter is None:
        raise EvaluationError(f"--ckpt {ckpt}: has no adapter to merge (already a full model)")
    check_output_dir(Path(out), overwrite)  # before minutes of loading, not after
    dtype = dtype or stored_dtype(source.model)
    settings = replace(policy_settings(EvalSettings(), source), dtype=dtype)
    policy = load_policy(source.model, source.adapter, settings, torch.device("cpu"))
    info = {
        "base_model": source.run.get("base_model", source.model),
        "base_model_path": source.model,
        "checkpoint": str(source.path),
        "task": source.task,
        "step": source.run.get("step"),
        "config": source.run_config,
    }
    return export_merged(policy, Path(out), info, dtype, overwrite)
