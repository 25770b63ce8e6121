"""The memory plan (grpo/plan.py) against the measured peak RSS of real CPU training steps.

Each workload runs in a fresh interpreter through grpo.trainer's own `build_trainer` and
`train_step` (float32, transformers sampler, --cpu-lean-heap so that RSS is what torch holds:
bench/host_heap.py measures glibc's default beside it); the worker reports its peak RSS (VmHWM)
and the padded prompt / completion widths its batches had. The plan is then made for the same
workload with those widths (what a user bounds with --max-prompt-length and
--max-completion-length), and one JSON line per workload prints both and their ratio; each
line is appended to bench/results.jsonl.

    python bench/plan_check.py                    # tiny LoRA
    flock /tmp/bigmem.lock python bench/plan_check.py --workload smollm2-lora \
        --workload shaped3b-lora
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.record import append_result  # noqa: E402
from grpo import host_heap  # noqa: E402

# name: model, task, prompts, G (group), max new tokens, and TrainConfig overrides
WORKLOADS: dict[str, dict[str, Any]] = {
    "tiny-lora": {"model": "tiny", "task": "ocr", "prompts": 2, "group": 4, "tokens": 32},
    "tiny-lora-gc": {
        "model": "tiny",
        "task": "ocr",
        "prompts": 2,
        "group": 4,
        "tokens": 32,
        "gradient_checkpointing": True,
    },
    "smollm2-lora": {"model": "smollm2", "task": "arith", "prompts": 2, "group": 4, "tokens": 64},
    "smollm2-lora-nomerge": {
        "model": "smollm2",
        "task": "arith",
        "prompts": 2,
        "group": 4,
        "tokens": 64,
        "merge_for_sampling": False,
    },
    "smollm2-lora-big": {
        "model": "smollm2",
        "task": "arith",
        "prompts": 4,
        "group": 8,
        "tokens": 64,
    },
    "tiny-full": {
        "model": "tiny",
        "task": "ocr",
        "prompts": 2,
        "group": 4,
        "tokens": 32,
        "lora_r": 0,
        "learning_rate": 1e-6,
    },
    "smollm2-full": {
        "model": "smollm2",
        "task": "arith",
        "prompts": 2,
        "group": 4,
        "tokens": 64,
        "lora_r": 0,
        "learning_rate": 1e-6,
    },
    "shaped3b-lora": {"model": "shaped3b", "task": "ocr", "prompts": 1, "group": 2, "tokens": 16},
}


def shaped_3b_path() -> str:
    """The Qwen2.5-VL-3B shapes (real width, 151,936 vocabulary) cut to 1 text layer."""
    from models.tiny import shaped_model_path

    fixture = Path(ROOT) / "tests" / "fixtures" / "qwen2.5-vl-3b-instruct.config.json"
    return str(shaped_model_path(json.loads(fixture.read_text()), 1, 2))


def model_path(name: str) -> str:
    return shaped_3b_path() if name == "shaped3b" else name


def train_config(spec: dict[str, Any], output_dir: str) -> Any:
    from grpo.config import TrainConfig

    extra = {k: v for k, v in spec.items() if k not in ("model", "task", "prompts", "group")}
    extra.pop("tokens", None)
    return TrainConfig(
        task=spec["task"],
        model=model_path(spec["model"]),
        output_dir=output_dir,
        max_steps=100,
        prompts_per_step=spec["prompts"],
        num_generations=spec["group"],
        max_completion_length=spec["tokens"],
        sampler="hf",
        dtype="float32",
        save_steps=0,
        log_completions_steps=0,
        tensorboard=False,
        report=False,
        min_pixels=28 * 28,
        max_pixels=56 * 56,
        cpu_lean_heap=True,  # RSS is then what torch holds, which the plan counts
        **extra,
    )


class PhaseRss:
    """The largest RSS seen in each phase of a step: a thread reads /proc/self/statm every
    2 ms and files it under the innermost open Stopwatch phase (`build` while loading)."""

    def __init__(self) -> None:
        self.stack = ["build"]
        self.peaks: dict[str, int] = {}
        self.running = True
        self.thread = threading.Thread(target=self.watch, daemon=True)

    def watch(self) -> None:
        while self.running:
            rss = host_heap.rss_bytes()
            name = self.stack[-1]
            self.peaks[name] = max(self.peaks.get(name, 0), rss)
            time.sleep(0.002)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.stack.append(name)
        try:
            yield
        finally:
            self.stack.pop()


def run_worker(spec: dict[str, Any], steps: int) -> dict[str, Any]:
    """Build a trainer, run `steps` steps, report the peak RSS (overall and per phase) and the
    batches' widths."""
    import models  # noqa: F401  (torchvision shim first)
    from grpo import distributed, metrics
    from grpo.trainer import build_trainer, train_step
    from models import BACKEND

    watcher = PhaseRss()
    original_timer = metrics.Stopwatch.__call__

    @contextmanager
    def timed(self: Any, name: str) -> Iterator[None]:
        with watcher.phase(name), original_timer(self, name):
            yield

    metrics.Stopwatch.__call__ = timed  # type: ignore[method-assign]
    watcher.thread.start()
    widths: list[tuple[int, int]] = []
    with tempfile.TemporaryDirectory() as out:
        trainer = build_trainer(train_config(spec, out), distributed.init_distributed(), BACKEND)
        watcher.stack[0] = "step"
        built = host_heap.peak_rss_bytes()
        policy, original = trainer.policy, trainer.policy.rollout_batch

        def recording(*args: Any, **kwargs: Any) -> Any:
            batch = original(*args, **kwargs)
            widths.append((batch.prompt_length, batch.completion_ids.shape[1]))
            return batch

        policy.rollout_batch = recording
        for _ in range(steps):
            train_step(trainer)
    watcher.running = False
    return {
        "phase_peak_rss_bytes": watcher.peaks,
        "peak_rss_bytes": host_heap.peak_rss_bytes(),
        "build_peak_rss_bytes": built,
        "prompt_width": max(p for p, _ in widths),
        "completion_width": max(t for _, t in widths),
    }


def planned(spec: dict[str, Any], measured: dict[str, Any]) -> Any:
    """The plan for the workload at the widths that ran."""
    from grpo.config import TrainConfig
    from grpo.plan import Workload, load_architecture, make_plan

    defaults = TrainConfig()
    workload = Workload(
        gpus=0,
        full=spec.get("lora_r", defaults.lora_r) == 0,
        lora_r=spec.get("lora_r", defaults.lora_r),
        num_generations=spec["group"],
        prompts_per_step=spec["prompts"],
        max_prompt_length=measured["prompt_width"],
        max_completion_length=measured["completion_width"],
        gradient_checkpointing=bool(spec.get("gradient_checkpointing", False)),
        dtype="float32",
        logprob_chunk_tokens=defaults.logprob_chunk_tokens,
        logprob_group_batch=spec.get("logprob_group_batch", defaults.logprob_group_batch),
        packing=spec.get("packing", defaults.packing),
        prefix_sharing=spec.get("prefix_sharing", defaults.prefix_sharing),
        merge_for_sampling=spec.get("merge_for_sampling", defaults.merge_for_sampling),
        beta=spec.get("beta", defaults.beta),
        sampler="hf",
    )
    return make_plan(load_architecture(model_path(spec["model"])), replace(workload))


def measure(name: str, steps: int) -> dict[str, Any]:
    """Run the workload in a fresh interpreter and set the plan beside its figures. A shaped
    model is built (or found) here first: building it in the worker would add the random
    model's construction to the measured peak."""
    model_path(WORKLOADS[name]["model"])
    command = [sys.executable, os.path.abspath(__file__), "--worker", name, "--steps", str(steps)]
    env = {**os.environ, "PYTHONPATH": ROOT, "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {name} failed:\n{done.stderr[-4000:]}")
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    plan = planned(WORKLOADS[name], measured)
    return {
        "workload": name,
        **WORKLOADS[name],
        "steps": steps,
        **measured,
        "plan_peak_bytes": plan.peak,
        "plan_over_measured": round(plan.peak / measured["peak_rss_bytes"], 3),
        "plan_phases": {
            "loading": sum(plan.persistent.values()) + sum(plan.loading.values()),
            "sampling": sum(plan.persistent.values()) + sum(plan.sampling.values()),
            "training": sum(plan.persistent.values()) + sum(plan.training.values()),
        },
        "plan_parts": {**plan.persistent, **plan.sampling, **plan.training, **plan.loading},
    }


def replan(results: Path) -> None:
    """The plan at this commit beside the newest recorded measurement of each workload (the
    measurement is the trainer's, which a change to grpo/plan.py does not touch)."""
    newest: dict[str, dict[str, Any]] = {}
    for line in results.read_text().splitlines():
        record = json.loads(line)
        if record.get("bench") == "plan_check" and "prompt_width" in record:
            newest[record["workload"]] = record
    for name, record in newest.items():
        plan = planned(WORKLOADS[name], record)
        ratio = plan.peak / record["peak_rss_bytes"]
        row = {"workload": name, "measured_commit": record["commit"][:7], "steps": record["steps"]}
        row |= {"measured": record["peak_rss_bytes"], "plan": plan.peak, "ratio": round(ratio, 3)}
        print(json.dumps(row))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", action="append", choices=sorted(WORKLOADS))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--replan", action="store_true", help="re-plan the recorded measurements, run nothing"
    )
    args = parser.parse_args(argv)
    if args.replan:
        replan(Path(ROOT) / "bench" / "results.jsonl")
        return
    if args.worker:
        print(json.dumps(run_worker(WORKLOADS[args.worker], args.steps)), flush=True)
        return
    for name in args.workload or ["tiny-lora"]:
        record = measure(name, args.steps)
        print(json.dumps(record), flush=True)
        append_result("plan_check", record)


if __name__ == "__main__":
    main()
