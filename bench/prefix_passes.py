"""The log-prob passes and the sampler, prefix-shared / merged against padded / adapter, in one
process on one fixed batch, interleaved: ratios that hold on a loaded machine, where whole-step
timings (bench/step.py) swing with the other jobs.

One trajectory of the step workload (bench/step.py's: --model, --task, 4 prompts x G=8 x 64
new tokens, LoRA r=16, float32) is sampled once; then, --rounds times, each variant runs once:

    reference   padded (all rows) | prefix-shared, micro-batches of --group-batch groups, its
                continuations as rows trimmed to the longest | packed (the default where exact)
    policy      log-probs + GRPO loss + backward, the same three ways (grpo.trainer's own
                loss_and_backward, beta 0.04)
    sample      the transformers sampler with the adapter | with LoRA merged for the pass

One JSON line: the median seconds of each, their ratios, the batch's completion lengths.

    python bench/prefix_passes.py --model smollm2 --task arith --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.record import append_result  # noqa: E402
from bench.step import workload  # noqa: E402


def seconds(run: Callable[[], Any]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--task", default="arith")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--group-batch", type=int, default=1)
    parser.add_argument("--sample-tokens", type=int, default=16, help="new tokens when timing")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import models.prefix  # the package first: its torchvision shim
    from grpo import distributed
    from grpo.metrics import Stopwatch
    from grpo.trainer import build_trainer, collect, grouped_logprobs, loss_and_backward
    from models import BACKEND

    packs_where_exact = models.prefix.packs_continuations

    flags = argparse.Namespace(
        task=args.task, model=args.model, beta=0.04, sampler="hf", packing=False, padded=False,
        naive=False,
        group_batch=args.group_batch, prompts=None, group=None, tokens=None, lora_r=None,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as out:
        config = workload(flags, out)
        trainer = build_trainer(config, distributed.init_distributed(), BACKEND)
        policy = trainer.policy
        sampler, specs = trainer.sampler, trainer.reward_specs
        t = collect(policy, sampler, trainer.task, trainer.stream, specs, config, Stopwatch())
        if t.batch.num_rows == 0:
            raise SystemExit("no row with signal in the sampled batch; run again")
        settings, correction = config.loss_settings(), config.correction_settings()
        items = float(t.loss_mask.sum())
        prompts = t.batch.prompts
        tokens = args.sample_tokens
        sampling = dataclasses.replace(config.sampling_settings(), max_new_tokens=tokens)

        def use(prefix: bool, merge: bool = True, packed: bool = True) -> None:
            chosen = {"prefix_sharing": prefix, "merge_for_sampling": merge}
            policy.settings = dataclasses.replace(policy.settings, **chosen)
            # the prefix pass asks this whether to pack: "no" keeps its trimmed rows
            models.prefix.packs_continuations = packs_where_exact if packed else lambda m: False

        def reference(prefix: bool, packed: bool = True) -> Callable[[], Any]:
            groups = args.group_batch if prefix else 0

            def run() -> None:
                use(prefix, packed=packed)
                with torch.no_grad():
                    grouped_logprobs(lambda b: policy.reference_logprobs(b, 1.0), t, groups)

            return run

        def backward(prefix: bool, packed: bool = True) -> Callable[[], Any]:
            groups = args.group_batch if prefix else 0

            def run() -> None:
                use(prefix, packed=packed)
                loss_and_backward(policy, t, settings, correction, 1.0, items, 1.0, groups)
                policy.model.zero_grad(set_to_none=True)

            return run

        def sample(merge: bool) -> Callable[[], Any]:
            def run() -> None:
                use(True, merge)
                policy.sample(prompts, config.num_generations, sampling)

            return run

        variants = {
            "reference_padded": reference(False),
            "reference_prefix_rows": reference(True, packed=False),
            "reference_prefix": reference(True),
            "policy_padded": backward(False),
            "policy_prefix_rows": backward(True, packed=False),
            "policy_prefix": backward(True),
            "sample_adapter": sample(False),
            "sample_merged": sample(True),
        }
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, run in variants.items():
                times[name].append(seconds(run))
    median = {name: round(statistics.median(v), 3) for name, v in times.items()}
    lengths = t.batch.completion_mask.sum(1)
    record = {
        "model": args.model,
        "task": args.task,
        "threads": torch.get_num_threads(),
        "rows": t.batch.num_rows,
        "group_batch": args.group_batch,
        "completion_length_mean": round(float(lengths.mean()), 2),
        "completion_length_max": int(lengths.max()),
        "prompt_length": t.batch.prompt_length,
        "sample_tokens": args.sample_tokens,
        "rounds": args.rounds,
        **{f"seconds/{k}": v for k, v in median.items()},
        "ratio/reference": round(median["reference_padded"] / median["reference_prefix"], 2),
        "ratio/policy": round(median["policy_padded"] / median["policy_prefix"], 2),
        "ratio/reference_packing": round(
            median["reference_prefix_rows"] / median["reference_prefix"], 2
        ),
        "ratio/policy_packing": round(median["policy_prefix_rows"] / median["policy_prefix"], 2),
        "packed_where_exact": packs_where_exact(policy.model),
        "ratio/sample": round(median["sample_adapter"] / median["sample_merged"], 2),
    }
    print(json.dumps(record), flush=True)
    append_result("prefix_passes", record)


if __name__ == "__main__":
    main()
