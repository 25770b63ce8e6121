"""Does GRPO teach SmolLM2-135M-Instruct arithmetic on this CPU? A budgeted run, measured.

Trains with the arith preset (configs/arith.yaml; any train.py flag after `--` overrides it)
through grpo.trainer's own `build_trainer` / `train_step`, until --max-steps or --minutes of
training (whichever comes first), saves the adapter, then evaluates greedily on the held-out
eval split with grpo.evaluation.evaluate and models.BACKEND: the trained adapter, and
(compare_base) the same model with the adapter off, which is the accuracy before training.

Printed: one line per step (reward mean, step time, completion tokens/s), then the summary:

    eval accuracy before / after     the `number` reward (final number right) on --eval-limit
                                     held-out problems, greedy, --eval-tokens new tokens
    step time (median), completion tokens/s (median), steps, training minutes

The reward curve PNG is written into the run directory (grpo.metrics.plot_rewards).

    python bench/learn.py --sampler hf --minutes 20
    python bench/learn.py --sampler vllm --max-steps 3 -- --num-generations 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import models
from bench.record import append_result
from grpo import distributed
from grpo.config import load_config
from grpo.evaluation import EvalSettings, evaluate
from grpo.metrics import plot_rewards
from grpo.trainer import build_trainer, log_step, save, train_step

ACCURACY = "reward/number"  # the arith task's first eval reward: the final number is right


def parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sampler", choices=("hf", "vllm"), default="hf")
    p.add_argument("--minutes", type=float, default=20.0, help="training wall-clock budget")
    p.add_argument("--max-steps", type=int, default=1000, help="step budget")
    p.add_argument("--eval-limit", type=int, default=64, help="held-out problems evaluated")
    p.add_argument("--eval-tokens", type=int, default=None, help="default: max completion length")
    p.add_argument(
        "--eval-sampler", choices=("hf", "vllm"), default=None, help="default: --sampler"
    )
    p.add_argument("--output-dir", default="runs/learn")
    args, rest = p.parse_known_args(argv)
    return args, [a for a in rest if a != "--"]


def train_budgeted(args: argparse.Namespace, overrides: list[str]) -> tuple[Path, list[dict]]:
    """Train until the step or time budget is spent; returns (checkpoint dir, per-step rows)."""
    flags = ["--task", "arith", "--model", "smollm2", "--sampler", args.sampler]
    flags += ["--output-dir", args.output_dir, "--max-steps", str(args.max_steps)]
    config = load_config([*flags, "--save-steps", "0", "--overwrite", "true", *overrides])
    trainer = build_trainer(config, distributed.init_distributed(), models.BACKEND)
    rows, start = [], time.perf_counter()
    while trainer.step < config.max_steps and time.perf_counter() - start < args.minutes * 60:
        metrics, records = train_step(trainer)
        trainer.step += 1
        log_step(trainer, metrics, records)
        row = {
            "step": trainer.step,
            "reward": metrics["reward_mean"],
            "step_time": metrics["time/step"],
            "tokens_per_second": metrics["completion_tokens_per_second"],
            "completion_length": metrics["completion_length_mean"],
            "elapsed_min": (time.perf_counter() - start) / 60,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    checkpoint = save(trainer)
    plot_rewards(trainer.logger.run_dir)
    trainer.logger.close()
    trainer.sampler.close()
    return checkpoint, rows


def main(argv: list[str] | None = None) -> None:
    args, overrides = parse(argv)
    checkpoint, rows = train_budgeted(args, overrides)
    config = json.loads((checkpoint / "run.json").read_text()).get("config", {})
    settings = EvalSettings(
        ckpt=str(checkpoint),
        task="arith",
        limit=args.eval_limit,
        max_new_tokens=args.eval_tokens or config.get("max_completion_length", 96),
        sampler=args.eval_sampler or args.sampler,
        compare_base=True,
        out=str(Path(args.output_dir) / "eval"),
    )
    report = evaluate(settings, models.BACKEND)
    before = report.summary["base_metrics"][ACCURACY]
    after = report.summary["metrics"][ACCURACY]
    summary = {
        "sampler": args.sampler,
        "steps": len(rows),
        "train_minutes": rows[-1]["elapsed_min"] if rows else 0.0,
        "step_time_median": statistics.median(r["step_time"] for r in rows),
        "tokens_per_second_median": statistics.median(r["tokens_per_second"] for r in rows),
        "reward_curve": [round(r["reward"], 3) for r in rows],
        "eval_accuracy_before": before,
        "eval_accuracy_after": after,
        "eval_samples": report.summary["num_samples"],
        "plot": str(Path(args.output_dir) / "reward_curve.png"),
    }
    print(json.dumps(summary, indent=1))
    append_result("learn", summary)


if __name__ == "__main__":
    main()
