"""Sampling throughput: colocated vLLM vs transformers `generate`, same prompts, same settings.

Both samplers draw G completions of up to --tokens new tokens for the same prompts with images,
at temperature 1 (plain sampling), through the project's own samplers (VLLMSampler and the
policy's transformers path). The tiny random model almost never samples a stop token, so both
produce (nearly) every token; the token counts are printed next to the rates so a reader can
check. Figures are medians over --repeats after one warm-up round; printed, never asserted.

    python bench/sampling.py                         # 2 prompts x G=8 x 32 tokens, tiny model
    python bench/sampling.py --prompts 4 --group 16
    python bench/sampling.py --model smollm2 --prompts 4 --group 8 --tokens 64 --sampler vllm \
        --threads 2 --vllm-dtype bfloat16 --kv-cache-gib 0.25 --chunked-prefill off \
        --max-num-batched-tokens 2048 --enforce-eager off

The policy carries a LoRA adapter of rank --lora-r (default 16) with random B, as in training:
the transformers sampler runs it, vLLM gets the merged weights.

Threads: the colocated engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so it
computes on torch's threads (--threads); VLLM_CPU_OMP_THREADS_BIND only binds the workers of
vLLM's multiprocess executor and has no effect here (it is recorded all the same).

A text-only --model gets arithmetic questions instead of images. One JSON line per sampler is
printed and appended to bench/results.jsonl (bench/record.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from PIL import Image

from bench.record import append_result
from grpo.types import PolicySettings, PromptInput, SamplingSettings
from models.policy import Policy, make_policy
from models.samplers import TransformersSampler
from models.tiny import TinySpec, tiny_model_path

# vLLM's CPU attention needs head_dim >= 32; this spec is the tiny model at head_dim 32
VLLM_TINY = TinySpec()  # head_dim 32, which vLLM's CPU attention needs


def bench_prompts(policy: Policy, count: int) -> list[PromptInput]:
    """`count` OCR-like prompts, each with one image of its own size (arithmetic questions
    for a text-only model)."""
    if not policy.has_vision:
        texts = [f"What is {17 * j + 3} + {29 * j + 8}? Think first." for j in range(count)]
        asks = [[{"role": "user", "content": [{"type": "text", "text": t}]}] for t in texts]
        return [policy.prompt_input(messages, []) for messages in asks]
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


def on_off(text: str) -> bool:
    return {"on": True, "off": False}[text]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint dir or name (default: tiny)")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    parser.add_argument("--tokens", type=int, default=32, help="max new tokens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sampler", choices=["hf", "vllm", "both"], default="both")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument(
        "--dtype", default=None, help="policy dtype (vLLM: its own with --vllm-dtype)"
    )
    parser.add_argument("--vllm-dtype", default=None, help="vLLM engine dtype (default: policy's)")
    parser.add_argument("--kv-cache-gib", type=float, default=0.5)
    parser.add_argument("--chunked-prefill", type=on_off, default=None, help="on | off")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None, help="vLLM")
    parser.add_argument("--enforce-eager", type=on_off, default=None, help="vLLM: on | off")
    parser.add_argument("--lora-r", type=int, default=16, help="policy LoRA rank (0: none)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from models.vllm_sampler import VLLMSampler, VLLMSettings

    torch.manual_seed(0)
    path = args.model or str(tiny_model_path(spec=VLLM_TINY))
    policy_settings = PolicySettings(model=path, dtype=args.dtype, lora_r=args.lora_r)
    policy = make_policy(policy_settings, torch.device("cpu"))
    with torch.no_grad():  # a trained-looking adapter: LoRA B is 0 at initialisation
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.01)
    prompts = bench_prompts(policy, args.prompts)
    settings = SamplingSettings(max_new_tokens=args.tokens, temperature=1.0)
    results = {}
    if args.sampler in ("hf", "both"):
        hf = TransformersSampler(policy)
        results["transformers generate"] = timed(
            lambda: hf.generate(prompts, args.group, settings).completion_ids, args.repeats
        )
    if args.sampler in ("vllm", "both"):
        engine = VLLMSettings(
            kv_cache_gib=args.kv_cache_gib,
            dtype=args.vllm_dtype,
            chunked_prefill=args.chunked_prefill,
            max_num_batched_tokens=args.max_num_batched_tokens,
            enforce_eager=args.enforce_eager,
        )
        vllm = VLLMSampler(policy, engine)
        vllm.sync_weights(policy)  # the adapted policy's weights, as after an optimizer step
        results["vLLM (colocated)"] = timed(
            lambda: vllm.generate(prompts, args.group, settings).completion_ids, args.repeats
        )
    print(f"model: {policy.path}")
    print(f"batch: {args.prompts} prompts x G={args.group} x up to {args.tokens} new tokens")
    print(f"torch threads: {torch.get_num_threads()}, cpu count: {os.cpu_count()}")
    print(f"{'sampler':<24}{'tokens':>8}{'median s':>10}{'tokens/s':>10}")
    for name, (seconds, tokens) in results.items():
        print(f"{name:<24}{tokens:>8}{seconds:>10.2f}{tokens / seconds:>10.0f}")
        line = {
            "sampler": name,
            "model": args.model or "tiny",
            **{k: getattr(args, k) for k in ("prompts", "group", "tokens", "threads", "dtype")},
            "lora_r": args.lora_r,
            **{k: getattr(args, k) for k in ("vllm_dtype", "kv_cache_gib", "chunked_prefill")},
            **{k: getattr(args, k) for k in ("max_num_batched_tokens", "enforce_eager")},
            "omp_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND"),
            "tokens": tokens,
            "median_s": round(seconds, 3),
            "tokens_per_second": round(tokens / seconds, 1),
        }
        print(json.dumps(line), flush=True)
        append_result("sampling", line)


if __name__ == "__main__":
    main()
