"""Time of one weight sync into a colocated vLLM engine, three ways.

- merged delta: W + s * B @ A for the LoRA-touched linears (and their fused siblings) pushed
  with reload_weights — the default `sync="merged"`;
- adapter: save the peft adapter and load it into vLLM's LoRA under a new id — `sync="adapter"`;
- full push: the whole merged state dict through reload_weights (what a sync would cost
  without knowing which tensors LoRA touched).

Every variant includes the cache resets it needs and is what VLLMSampler.sync_weights pays
(the full push reuses its functions). The LoRA factors are randomised so the merges are real.
Figures are medians over --repeats after one warm-up sync; they are printed, never asserted.

    python bench/sync.py                 # tiny Qwen2.5-VL (real 151,936 vocabulary) on CPU
    python bench/sync.py --model DIR     # any local Qwen2.5-VL checkpoint
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch

from bench.record import append_result
from grpo.types import PolicySettings
from models.merge import merged_lora_weights, merged_state_dict
from models.policy import Policy
from models.tiny import TinySpec, tiny_model_path

MIB = 1024**2
# vLLM's CPU attention needs head_dim >= 32; this spec is the tiny model at head_dim 32
VLLM_TINY = TinySpec()  # head_dim 32, which vLLM's CPU attention needs


def bench_policy(model: str | None) -> Policy:
    """The policy with randomised LoRA factors (peft starts B at zero)."""
    path = model or str(tiny_model_path(spec=VLLM_TINY))
    torch.manual_seed(0)
    policy = Policy(PolicySettings(model=path), torch.device("cpu"))
    with torch.no_grad():
        for name, param in policy.model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.02)
    policy.model.eval()
    return policy


def median_seconds(run: Callable[[], None], repeats: int) -> float:
    run()  # warm-up: first-call allocations, lazy imports
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def megabytes(pairs: list[tuple[str, torch.Tensor]]) -> float:
    return sum(t.numel() * t.element_size() for _, t in pairs) / MIB


Timing = tuple[str, int, float, float]  # (variant, tensors, MiB, median seconds)


def merged_engine_timings(policy: Policy, repeats: int) -> list[Timing]:
    """Merged delta and full state dict, both into one engine in the default sync mode."""
    from models.vllm_sampler import VLLMSampler, VLLMSettings
    from models.weight_sync import push_weights, reset_caches

    sampler = VLLMSampler(policy, VLLMSettings(kv_cache_gib=0.25))
    delta = list(merged_lora_weights(policy))
    full = list(merged_state_dict(policy).items())

    def push_full() -> None:
        push_weights(sampler.llm, merged_state_dict(policy).items())
        reset_caches(sampler.llm)

    return [
        (
            "merged delta",
            len(delta),
            megabytes(delta),
            median_seconds(lambda: sampler.sync_weights(policy), repeats),
        ),
        ("full state dict", len(full), megabytes(full), median_seconds(push_full, repeats)),
    ]


def adapter_engine_timing(policy: Policy, repeats: int) -> Timing:
    """Adapter sync: save the peft adapter, load it into vLLM's LoRA under a new id."""
    from models.vllm_sampler import VLLMSampler, VLLMSettings

    sampler = VLLMSampler(policy, VLLMSettings(kv_cache_gib=0.25, sync="adapter"))
    lora = [(n, p) for n, p in policy.model.named_parameters() if "lora_" in n]
    seconds = median_seconds(lambda: sampler.sync_weights(policy), repeats)
    return "adapter (vLLM LoRA)", len(lora), megabytes(lora), seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint dir (default: tiny)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    policy = bench_policy(args.model)
    timings = merged_engine_timings(policy, args.repeats)
    timings.append(adapter_engine_timing(policy, args.repeats))
    print(f"model: {policy.path}")
    print(f"torch threads: {torch.get_num_threads()}, cpu count: {os.cpu_count()}")
    print(f"{'sync':<22}{'tensors':>9}{'MiB':>10}{'median ms':>12}")
    for name, count, mb, seconds in timings:
        print(f"{name:<22}{count:>9}{mb:>10.1f}{seconds * 1000:>12.1f}")
        line = {"model": str(policy.path), "sync": name, "tensors": count, "mib": round(mb, 1)}
        append_result("sync", {**line, "median_ms": round(seconds * 1000, 1)})


if __name__ == "__main__":
    main()
