"""Sampling throughput: colocated vLLM vs transformers `generate`, same prompts, same settings.

Both samplers draw G completions of up to --tokens new tokens for the same prompts with images,
at temperature 1 (plain sampling), through the project's own samplers (VLLMSampler and the
policy's transformers path). The tiny random model almost never samples a stop token, so both
produce (nearly) every token; the token counts are printed next to the rates so a reader can
check. Figures are medians over --repeats after one warm-up round; printed, never asserted.

    python bench/sampling.py                         # 2 prompts x G=8 x 32 tokens, tiny model
    python bench/sampling.py --prompts 4 --group 16
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
from PIL import Image

from grpo.types import PolicySettings, PromptInput, SamplingSettings
from models.policy import Policy
from models.samplers import TransformersSampler
from models.tiny import TinySpec, tiny_model_path

# vLLM's CPU attention needs head_dim >= 32; this spec is the tiny model at head_dim 32
VLLM_TINY = TinySpec()  # head_dim 32, which vLLM's CPU attention needs


def bench_prompts(policy: Policy, count: int) -> list[PromptInput]:
    """`count` OCR-like prompts, each with one image of its own size."""
    prompts = []
    for j in range(count):
        image = Image.new("RGB", (112 + 28 * j, 56 + 14 * (j % 3)), (40 * j % 256, 90, 160))
        content = [{"type": "image"}, {"type": "text", "text": "请识别图片中的文字"}]
        prompts.append(policy.prompt_input([{"role": "user", "content": content}], [image]))
    return prompts


def timed(run: Callable[[], list[list[int]]], repeats: int) -> tuple[float, int]:
    """(median seconds, tokens produced per round) after one warm-up round."""
    run()
    times, tokens = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        completions = run()
        times.append(time.perf_counter() - start)
        tokens = sum(len(c) for c in completions)
    return statistics.median(times), tokens


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint dir (default: tiny)")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    parser.add_argument("--tokens", type=int, default=32, help="max new tokens")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    from models.vllm_sampler import VLLMSampler, VLLMSettings

    torch.manual_seed(0)
    path = args.model or str(tiny_model_path(spec=VLLM_TINY))
    policy = Policy(PolicySettings(model=path), torch.device("cpu"))
    prompts = bench_prompts(policy, args.prompts)
    settings = SamplingSettings(max_new_tokens=args.tokens, temperature=1.0)
    vllm = VLLMSampler(policy, VLLMSettings(kv_cache_gib=0.5))

    results = {
        "transformers generate": timed(
            lambda: (
                TransformersSampler(policy).generate(prompts, args.group, settings).completion_ids
            ),
            args.repeats,
        ),
        "vLLM (colocated)": timed(
            lambda: vllm.generate(prompts, args.group, settings).completion_ids, args.repeats
        ),
    }
    print(f"model: {policy.path}")
    print(f"batch: {args.prompts} prompts x G={args.group} x up to {args.tokens} new tokens")
    print(f"torch threads: {torch.get_num_threads()}, cpu count: {os.cpu_count()}")
    print(f"{'sampler':<24}{'tokens':>8}{'median s':>10}{'tokens/s':>10}")
    for name, (seconds, tokens) in results.items():
        print(f"{name:<24}{tokens:>8}{seconds:>10.2f}{tokens / seconds:>10.0f}")


if __name__ == "__main__":
    main()
