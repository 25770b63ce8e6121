"""What --cpu-lean-heap (grpo/host_heap.py: glibc's mmap threshold fixed) does to a CPU step:
peak RSS and step time, against glibc's default growing threshold.

Each arm runs in a fresh interpreter through build_trainer and train_step on one of
bench/plan_check.py's workloads; the first step is reported apart (it pays the warm-up).

    python bench/host_heap.py --workload smollm2-lora --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.plan_check import WORKLOADS, train_config  # noqa: E402
from bench.record import append_result  # noqa: E402

ARMS = ("lean", "glibc-default")


def run_arm(name: str, arm: str, steps: int) -> dict[str, Any]:
    """In this process: `steps` train_steps of workload `name`; step seconds and peak RSS."""
    import models  # noqa: F401  (torchvision shim first)
    from grpo import distributed, host_heap
    from grpo.trainer import build_trainer, train_step
    from models import BACKEND

    seconds = []
    with tempfile.TemporaryDirectory() as out:
        config = replace(train_config(WORKLOADS[name], out), cpu_lean_heap=arm == "lean")
        trainer = build_trainer(config, distributed.init_distributed(), BACKEND)
        for _ in range(steps):
            start = time.perf_counter()
            train_step(trainer)
            seconds.append(round(time.perf_counter() - start, 2))
    peak = host_heap.peak_rss_bytes()
    return {"arm": arm, "step_seconds": seconds, "peak_rss_bytes": peak}


def measure(name: str, arm: str, steps: int) -> dict[str, Any]:
    command = [sys.executable, os.path.abspath(__file__), "--workload", name]
    command += ["--steps", str(steps), "--arm", arm]
    env = {**os.environ, "PYTHONPATH": ROOT, "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{name} ({arm}) failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", default="smollm2-lora", choices=sorted(WORKLOADS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--arm", choices=ARMS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.arm:
        print(json.dumps(run_arm(args.workload, args.arm, args.steps)), flush=True)
        return
    for arm in ARMS:
        record = {"workload": args.workload, **measure(args.workload, arm, args.steps)}
        later = record["step_seconds"][1:] or record["step_seconds"]
        record["mean_later_step_seconds"] = round(sum(later) / len(later), 2)
        print(json.dumps(record), flush=True)
        append_result("host_heap", record)


if __name__ == "__main__":
    main()
