"""Evaluation during training (--eval-steps) and keeping the best checkpoint (--save-best).

The held-out set is --eval-data, or --eval-fraction of the training data (a split fixed by the
seed, removed from what is trained on), or else the task's built-in evaluation split. Every
eval_steps steps, and at step 0 so the curve starts at the base model, the trainer's own sampler
(vLLM when it is the sampler) answers it greedily and grpo/evaluation.py's `evaluate_policy`
scores it: the very function evaluate.py uses, so `eval/<metric>` equals what evaluate.py
reports for that step's checkpoint. Under torchrun each rank answers its shard and the
completions are gathered (see `evaluate_policy`), so every rank holds the same metrics.

--save-best METRIC keeps the checkpoint of the best value so far in `<run>/best/checkpoint-N`
(a run directory of its own: `evaluate.py --ckpt runs/x/best` loads it, and the rotation of
`<run>/checkpoint-*` never sees it). Higher is better unless the name says cer, edit_distance
or loss.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from data import load_samples
from data.cache import cache_root
from data.sample import Sample
from data.tasks import Task
from grpo import distributed
from grpo.checkpoint import latest_checkpoint
from grpo.config import TrainConfig
from grpo.evaluation import EvalSettings, evaluate_policy, reward_specs
from grpo.types import Policy, Sampler

LOWER_IS_BETTER = ("cer", "edit_distance", "loss")
BEST_DIR = "best"


def split_samples(
    config: TrainConfig, task: Task, samples: list[Sample]
) -> tuple[list[Sample], list[Sample]]:
    """(training samples, held-out samples); no held-out set when evaluation is off."""
    if not config.eval_steps:
        return samples, []
    if config.eval_fraction:
        order = list(range(len(samples)))
        random.Random(config.seed).shuffle(order)  # its own RNG: the split never moves
        count = max(1, round(config.eval_fraction * len(samples)))
        if count >= len(samples):
            raise ValueError(
                f"eval_fraction={config.eval_fraction}: leaves no training sample of {len(samples)}"
            )
        held = set(order[:count])
        kept = [s for i, s in enumerate(samples) if i not in held]
        return kept, [samples[i] for i in sorted(held)]
    path = config.eval_data or task.default_data(cache_root() / "data", "eval")
    held_out = load_samples(
        path, skip_bad=config.skip_bad_samples, allow_empty_solution=True, **data_options(config)
    )
    return samples, held_out


def data_options(config: TrainConfig) -> dict[str, Any]:
    """The reader options of --data-split / --column-map, passed on only when set."""
    options: dict[str, Any] = {}
    if config.data_split:
        options["split"] = config.data_split
    if config.column_map:
        options["column_map"] = config.column_map
    return options


def eval_settings(config: TrainConfig) -> EvalSettings:
    """What evaluate.py would be given for the same evaluation."""
    return EvalSettings(
        max_new_tokens=config.max_completion_length,
        batch_size=config.eval_batch_size,
        sampler=config.sampler_backend,
        rewards=config.rewards,
    )


def evaluate_now(
    config: TrainConfig,
    task: Task,
    policy: Policy,
    sampler: Sampler,
    samples: list[Sample],
    step: int,
) -> dict[str, float]:
    """eval/<metric> of the sampler's current weights; rank 0 writes the predictions to
    <run>/eval/step-<N>.jsonl (the report shows them)."""
    settings = eval_settings(config)
    specs = reward_specs(task, settings.rewards)
    records, metrics = evaluate_policy(policy, sampler, task, samples, settings, specs)
    if distributed.is_main_process():
        folder = config.run_dir / "eval"
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / f"step-{step}.jsonl").open("w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return {f"eval/{name}": value for name, value in metrics.items()}


def is_due(config: TrainConfig, step: int) -> bool:
    return bool(config.eval_steps) and (step % config.eval_steps == 0 or step == config.max_steps)


def higher_is_better(metric: str) -> bool:
    return not any(word in metric for word in LOWER_IS_BETTER)


def improves(metric: str, value: float, best: float | None) -> bool:
    if value != value:  # NaN never wins
        return False
    if best is None:
        return True
    return value > best if higher_is_better(metric) else value < best


def best_so_far(run_dir: Path, metric: str, step: int) -> float | None:
    """The best value recorded in <run>/best (after a resume); a best from after `step` (saved
    before a kill, then replayed) is forgotten so that replay decides again."""
    checkpoint = latest_checkpoint(run_dir / BEST_DIR)
    if checkpoint is None:
        return None
    best = json.loads((checkpoint / "run.json").read_text()).get("best", {})
    if best.get("metric") != metric or best.get("step", step + 1) > step:
        return None
    return best["value"]


def keep_best(
    config: TrainConfig,
    metrics: dict[str, float],
    step: int,
    best: float | None,
    save_to: Callable[[Path, dict[str, Any]], Path],
) -> float | None:
    """Save <run>/best/checkpoint-<step> when --save-best's metric improved; returns the best
    value. `save_to(directory, extra run info)` writes a checkpoint (all ranks call it)."""
    metric = config.save_best
    if metric is None or metric not in metrics:
        return best
    value = metrics[metric]
    if not improves(metric, value, best):
        return best
    save_to(config.run_dir / BEST_DIR, {"best": {"metric": metric, "value": value, "step": step}})
    return value
