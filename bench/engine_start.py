"""Start-up time of the colocated vLLM engine, with and without tokenizers_passed_by_reference
(models/vllm_sampler.py), and the first greedy request after it.

Each variant runs in a fresh process (vLLM caches processors per process and the first engine
of a process pays its imports): it starts an engine twice and answers one request after each
start. Printed, never asserted; appended to bench/results.jsonl.

    python bench/engine_start.py                 # tiny Qwen2.5-VL (real 151,936 vocabulary)
    python bench/engine_start.py --model DIR     # any local checkpoint
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch

from bench.record import append_result

VARIANTS = ("deep-copied", "by reference")


def measure(model: str, variant: str) -> dict[str, float]:
    """Two engine starts and a first request after each, in this process (seconds)."""
    from grpo.types import PolicySettings, SamplingSettings
    from models import vllm_sampler
    from models.policy import make_policy
    from models.vllm_sampler import VLLMSampler, VLLMSettings

    if variant == "deep-copied":
        vllm_sampler.tokenizers_passed_by_reference = contextlib.nullcontext
    policy = make_policy(
        PolicySettings(model=model, min_pixels=28 * 28, max_pixels=56 * 56), torch.device("cpu")
    )
    prompt_message = [{"role": "user", "content": [{"type": "text", "text": "What is 7 + 5?"}]}]
    prompt = policy.prompt_input(prompt_message, [])
    times: dict[str, float] = {}
    for n in (1, 2):
        start = time.perf_counter()
        engine = VLLMSampler(policy, VLLMSettings(kv_cache_gib=0.25, max_model_len=512))
        times[f"start_{n}_s"] = round(time.perf_counter() - start, 2)
        start = time.perf_counter()
        engine.generate([prompt], 1, SamplingSettings(max_new_tokens=4, greedy=True))
        times[f"first_request_{n}_s"] = round(time.perf_counter() - start, 2)
        engine.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # the child
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.model, args.variant)))
        return
    for variant in VARIANTS:
        command = [sys.executable, __file__, "--model", args.model, "--variant", variant]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        times = json.loads(done.stdout.strip().splitlines()[-1])
        figures = ", ".join(f"{k} {v}" for k, v in times.items())
        print(f"{args.model}, tokenizer {variant}: {figures}")
        append_result("engine_start", {"model": args.model, "variant": variant, **times})


if __name__ == "__main__":
    main()
