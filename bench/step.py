"""Time of one GRPO step, lean paths against the straightforward ones, in one run.

Two fixed workloads, float32, one optimizer pass (mu = 1):
- the default: the tiny Qwen2.5-VL with the real 151,936-token vocabulary, the built-in OCR
  data, 2 prompts x G=4 completions of 32 new tokens, LoRA r=8 on the language model;
- any real `--model` (e.g. `--model smollm2 --task arith`): 4 prompts x G=8 x 64 new tokens,
  LoRA r=16 on every linear layer of the language model.
--prompts, --group, --tokens, --lora-r override either (--lora-r 0: full fine-tuning);
--packing turns on padding-free log-prob passes; --padded turns off the default prefix-shared
ones (models/prefix.py); --group-batch sets the groups per log-prob micro-batch (0: all rows).
Each configuration (sampler x beta x lean/naive) runs in a fresh interpreter through
grpo.trainer's own `build_trainer` and `train_step`: --warmup steps, then --steps timed steps.
One JSON line per configuration:

    sampler, beta, naive, threads, model       what ran
    step_time_median, step_time_min            seconds per step after warm-up
    time/sample, time/reward, time/logprobs,   the trainer's own split (medians): sample; rewards
    time/backward, time/sync                   and advantages; reference (and old) log-probs;
                                               policy log-probs + loss + backward + AdamW step;
                                               weight sync into the sampler
    completion_tokens_per_second               completion tokens / step time (median)
    completion_length_mean                     so equal work can be checked (the random tiny
                                               model almost never samples a stop token)
    peak_rss_mib                               the worker's peak resident set size

Every line is also appended to bench/results.jsonl with the commit and machine (bench/record.py).

--naive trains through tests/naive.py's NAIVE_BACKEND: transformers' generate (prompts repeated G
times before the prefill, multinomial over the whole vocabulary), a full-sequence,
full-vocabulary float32 log_softmax for the policy and the reference, and the images encoded
once per completion; and one log-prob pass and one backward over all rows, padded to the batch's
longest completion (--group-batch is the lean step's: micro-batches trimmed to their own
longest are a lean path, not the straightforward one).
By default a run is the whole comparison: both samplers, beta 0.04 and 0, lean and naive,
ending with one ratio line per (sampler, beta); --sampler, --beta, --lean and --naive narrow it.

    python bench/step.py                                 # the tiny model, all eight configurations
    python bench/step.py --model smollm2 --task arith    # the same on SmolLM2-135M-Instruct
    python bench/step.py --sampler hf --threads 1
    python bench/step.py --naive --sampler hf --beta 0 --steps 3

Figures are printed, never asserted. On a shared machine, pass --threads 1 for steadier numbers:
with more OpenMP threads than free cores, every small kernel waits for a descheduled thread.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the project's packages before bench/'s own modules (bench/rewards.py)
from bench.record import append_result  # noqa: E402
from grpo import host_heap  # noqa: E402

TIMERS = ("time/sample", "time/reward", "time/logprobs", "time/backward", "time/sync")


TINY_SHAPE = {"prompts": 2, "group": 4, "tokens": 32, "lora_r": 8}
REAL_SHAPE = {"prompts": 4, "group": 8, "tokens": 64, "lora_r": 16}


def shape(args: argparse.Namespace) -> dict[str, int]:
    """prompts, group, tokens, lora_r: the model's workload with the flags that override it."""
    base = TINY_SHAPE if (args.model or "tiny") == "tiny" else REAL_SHAPE
    chosen = {key: getattr(args, key) for key in base}
    return {key: value if chosen[key] is None else chosen[key] for key, value in base.items()}


def workload(args: argparse.Namespace, output_dir: str) -> Any:
    """The TrainConfig of the benchmark workload."""
    from grpo.config import TrainConfig

    size = shape(args)
    return TrainConfig(
        task=args.task,
        model=args.model or "tiny",
        output_dir=output_dir,
        seed=0,
        max_steps=10_000,
        prompts_per_step=size["prompts"],
        num_generations=size["group"],
        max_completion_length=size["tokens"],
        num_iterations=1,
        beta=args.beta,
        sampler=args.sampler,
        lora_r=size["lora_r"],
        packing=args.packing,
        prefix_sharing=not args.padded,
        logprob_group_batch=0 if args.naive else args.group_batch,
        dtype="float32",
        save_steps=0,
        log_completions_steps=0,
        tensorboard=False,
    )


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Build a trainer, run warm-up + timed steps, and summarise (call in a fresh process)."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()  # before vLLM replaces set_num_threads with a no-op
    import models  # noqa: F401  (torchvision shim first)
    from grpo import distributed
    from grpo.trainer import build_trainer, train_step

    model = args.model or "tiny"
    with tempfile.TemporaryDirectory() as out:
        config = workload(args, out)
        from models import BACKEND
        from tests.naive import NAIVE_BACKEND

        backend = NAIVE_BACKEND if args.naive else BACKEND
        trainer = build_trainer(config, distributed.init_distributed(), backend)
        for _ in range(args.warmup):
            train_step(trainer)
        steps = [train_step(trainer)[0] for _ in range(args.steps)]
    times = [m["time/step"] for m in steps]
    record: dict[str, Any] = {
        "sampler": args.sampler,
        "beta": args.beta,
        "naive": args.naive,
        "threads": threads,
        "model": model,
        "task": args.task,
        "packing": args.packing,
        "prefix_sharing": not args.padded and not args.naive,
        "logprob_group_batch": config.logprob_group_batch,
        **shape(args),
        "steps": args.steps,
        "step_time_median": round(statistics.median(times), 3),
        "step_time_min": round(min(times), 3),
    }
    for key in TIMERS:
        record[key] = round(statistics.median(m.get(key, 0.0) for m in steps), 3)
    record["completion_tokens_per_second"] = round(
        statistics.median(m["completion_tokens_per_second"] for m in steps), 2
    )
    record["completion_length_mean"] = round(
        statistics.mean(m["completion_length_mean"] for m in steps), 2
    )
    record["peak_rss_mib"] = round(host_heap.peak_rss_bytes() / 2**20, 1)
    return record


def measure(args: argparse.Namespace, sampler: str, beta: float, naive: bool) -> dict[str, Any]:
    """One configuration in a fresh interpreter (its own peak RSS, no warm state shared)."""
    command = [sys.executable, os.path.abspath(__file__), "--worker", "--sampler", sampler]
    command += ["--beta", str(beta), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    command += ["--naive"] if naive else []
    command += ["--threads", str(args.threads)] if args.threads else []
    command += ["--model", args.model] if args.model else []
    command += ["--task", args.task] + (["--packing"] if args.packing else [])
    command += (["--padded"] if args.padded else []) + ["--group-batch", str(args.group_batch)]
    for key in ("prompts", "group", "tokens", "lora_r"):
        if getattr(args, key) is not None:  # --lora-r 0 (full fine-tuning) too
            command += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    env = {**os.environ, "PYTHONPATH": ROOT, "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {command[2:]} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def per_token(record: dict[str, Any]) -> float:
    """Seconds per completion token of a step (median step time / mean completion tokens):
    the two samplers draw different completions, so equal work is compared per token."""
    tokens = record["completion_length_mean"] * record["prompts"] * record["group"]
    return record["step_time_median"] / max(tokens, 1.0)


def ratio(lean: dict[str, Any], naive: dict[str, Any]) -> dict[str, Any]:
    """How many times faster the lean step is, per step and per completion token."""
    return {
        "ratio": "naive / lean",
        "sampler": lean["sampler"],
        "beta": lean["beta"],
        "step_time_median": round(naive["step_time_median"] / lean["step_time_median"], 2),
        "step_time_min": round(naive["step_time_min"] / lean["step_time_min"], 2),
        **{
            key: round(naive[key] / lean[key], 2)
            for key in ("time/sample", "time/logprobs", "time/backward")
            if lean[key] > 0
        },
        "peak_rss_mib": round(naive["peak_rss_mib"] / lean["peak_rss_mib"], 2),
        "time_per_completion_token": round(per_token(naive) / per_token(lean), 2),
        "completion_length_lean": lean["completion_length_mean"],
        "completion_length_naive": naive["completion_length_mean"],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sampler", choices=["hf", "vllm", "both"], default="both")
    parser.add_argument(
        "--beta", type=float, action="append", help="KL weight; repeatable (default: 0.04 and 0)"
    )
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--naive", action="store_true", help="only the straightforward paths")
    only.add_argument("--lean", action="store_true", help="only the lean paths")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--model", default=None, help="checkpoint dir (default: the tiny model)")
    parser.add_argument("--task", default="ocr", help="the task (default: ocr)")
    parser.add_argument("--packing", action="store_true", help="padding-free log-prob passes")
    parser.add_argument(
        "--padded", action="store_true", help="lean, but padded (not prefix-shared) log-prob passes"
    )
    parser.add_argument(
        "--group-batch", type=int, default=1, help="groups per log-prob micro-batch (0: all)"
    )
    for key in ("prompts", "group", "tokens", "lora-r"):
        parser.add_argument(f"--{key}", type=int, default=None, help="override the workload")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker and args.sampler == "both":
        parser.error("a worker runs one sampler")
    return args


def configurations(args: argparse.Namespace) -> list[tuple[str, float, list[bool]]]:
    """(sampler, beta, [naive?, ...]) for each comparison the flags ask for: by default both
    samplers x beta 0.04 and 0, each lean (False) then naive (True)."""
    samplers = ["hf", "vllm"] if args.sampler == "both" else [args.sampler]
    variants = [True] if args.naive else [False] if args.lean else [False, True]
    return [(sampler, beta, variants) for sampler in samplers for beta in args.beta or [0.04, 0.0]]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        args.beta = args.beta[0] if args.beta else 0.04
        print(json.dumps(run_worker(args)), flush=True)
        return
    for sampler, beta, variants in configurations(args):
        records = {}
        for naive in variants:
            records[naive] = measure(args, sampler, beta, naive)
            print(json.dumps(records[naive]), flush=True)
            append_result("step", records[naive])
        if len(variants) == 2:
            line = ratio(records[False], records[True])
            print(json.dumps(line), flush=True)
            append_result("step", line)


if __name__ == "__main__":
    main()
