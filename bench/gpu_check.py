"""Run this first on a CUDA machine: does the GPU path work? (under ten minutes)

    python bench/gpu_check.py              # prints one line per check, then a JSON summary
    python bench/gpu_check.py --json F     # also writes the summary to F

Checks, on the tiny model first and then on a Qwen2.5-VL-3B-shaped model (published widths,
2 text layers, random weights; tests/fixtures/qwen2.5-vl-3b-instruct.config.json):

  kernels       flash_attention_2 and bfloat16 chosen automatically (models/loading.py)
  lean_naive    the lean log-prob path equals the naive one (tests/naive.py) within LOGP_TOL
  sleep         the colocated vLLM engine's sleep mode frees memory and wake_up restores it
                (torch.cuda.mem_get_info), with the same greedy output after waking
  sync_merged   weight sync (merged weights, then vLLM LoRA) after a strong LoRA change:
  sync_adapter    vLLM's greedy output equals transformers' greedy output
  mismatch      sampler vs trainer log-prob statistics on sampled tokens (mean/max |diff|)
  two_ranks     two torchrun ranks, one vLLM engine each (external_launcher), if 2 GPUs exist

A line is `ok`, `FAIL` or `skipped: why`; the exit status is 1 if any check FAILed. On a
machine without CUDA it says so in one line and exits 0: nothing was proven.

Every check is a function of (device, dtype[, model]) so tests/test_gpu_check.py runs the
ones that can run on a CPU with float32.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import models  # noqa: E402, F401  (the torchvision shim before transformers' image code)

# Log-prob tolerances (nats per token, absolute). float32: the repository's tests measure
# ~1e-5 between the lean and naive paths. bfloat16 keeps 8 mantissa bits: a logit near 10 is
# rounded by up to ~0.04, and the two paths round at different places (chunked lm_head on
# completion positions vs full logits), so 0.05 per token; a wrong position or mask is >0.5.
LOGP_TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
# sampler vs trainer: mean |diff| over sampled tokens. float32 kernels agree to ~1e-5
# (tests/vllm_helpers.py); bf16 vLLM vs a bf16 trainer typically 1e-2 (different kernels).
MISMATCH_MEAN_TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
FIXTURE_3B = ROOT / "tests" / "fixtures" / "qwen2.5-vl-3b-instruct.config.json"


@dataclass
class Check:
    """One line of the report."""

    name: str
    status: str  # "ok" | "FAIL" | "skipped"
    detail: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        if self.status == "skipped":
            return f"skipped  {self.name}: {self.detail}"
        return f"{self.status:<8} {self.name}: {self.detail}"


def verdict(name: str, ok: bool, detail: str, **data: Any) -> Check:
    return Check(name, "ok" if ok else "FAIL", detail, data)


# --- kernels and dtype -----------------------------------------------------------------------
def check_kernels(device: torch.device, dtype: torch.dtype) -> Check:
    """The automatic choices for `device`: flash_attention_2 + bf16 on CUDA, sdpa + float32
    on CPU; `dtype` must be what default_dtype picks (the dtype every other check runs in)."""
    from models.loading import choose_attention, default_dtype

    cuda = device.type == "cuda"
    kernel, chosen = choose_attention(device, None), default_dtype(device)
    want_kernel, want_dtype = (
        ("flash_attention_2", torch.bfloat16) if cuda else ("sdpa", torch.float32)
    )
    detail = f"attention {kernel}, dtype {str(chosen).removeprefix('torch.')}"
    if kernel != want_kernel and cuda and importlib.util.find_spec("flash_attn") is None:
        detail += " (flash_attn is not installed: pip install '.[gpu]')"
    ok = kernel == want_kernel and chosen == want_dtype == dtype
    return verdict("kernels", ok, detail, attention=kernel, dtype=str(chosen))


# --- shared helpers --------------------------------------------------------------------------
def load_policy(model: Path, device: torch.device, dtype: torch.dtype, lora_r: int = 8) -> Any:
    from grpo.types import PolicySettings
    from models.policy import Policy

    name = str(dtype).removeprefix("torch.")
    settings = PolicySettings(model=str(model), lora_r=lora_r, dtype=name)
    policy = Policy(settings, device)
    policy.model.eval()
    return policy


def prompts_for(policy: Any) -> list[Any]:
    from tests.vllm_helpers import image_prompts

    return image_prompts(policy)


def strong_lora_change(policy: Any, seed: int = 1) -> None:
    """Unit-scale random LoRA factors (peft starts B at zero): the adapted model's greedy
    output differs from the base model's, so a sync that did nothing is caught."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in policy.model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                noise = torch.randn(param.shape, generator=generator) / math.sqrt(param.shape[1])
                param.copy_(noise.to(param.device, param.dtype))


def greedy(sampler: Any, prompts: list[Any], tokens: int = 8) -> list[list[int]]:
    from grpo.types import SamplingSettings

    settings = SamplingSettings(max_new_tokens=tokens, greedy=True)
    return sampler.generate(prompts, 1, settings).completion_ids


def engine(policy: Any, **settings: Any) -> Any:
    from models.vllm_sampler import VLLMSampler, VLLMSettings

    if policy.device.type == "cpu":
        settings.setdefault("kv_cache_gib", 0.25)
    return VLLMSampler(policy, VLLMSettings(max_model_len=2048, **settings))


def vllm_missing() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed (pip install '.[gpu]')"
    return None


# --- lean vs naive ---------------------------------------------------------------------------
def check_lean_naive(device: torch.device, dtype: torch.dtype, model: Path) -> Check:
    """Policy.logprobs (chunked, completion positions only, shared image features) against
    tests/naive.py (full logits, float32 log_softmax), on greedy completions after a strong
    LoRA change."""
    from models.samplers import TransformersSampler
    from tests.naive import naive_view

    policy = load_policy(model, device, dtype)
    strong_lora_change(policy)
    prompts = prompts_for(policy)
    completions = greedy(TransformersSampler(policy), prompts)
    batch = policy.rollout_batch(policy.encode(prompts), completions, 1)
    with torch.no_grad():
        features = policy.image_features(batch.prompts)
        lean = policy.logprobs(batch, 1.0, image_features=features).logp
        plain = naive_view(policy).logprobs(batch, 1.0).logp
    mask = batch.completion_mask.bool()
    diff = (lean - plain)[mask].abs().max().item()
    tol = LOGP_TOL[dtype]
    return verdict(
        "lean_naive", diff <= tol, f"max |diff| {diff:.2e} (tolerance {tol:g})", max_abs=diff
    )


# --- sleep mode ------------------------------------------------------------------------------
def check_sleep(device: torch.device, dtype: torch.dtype, model: Path) -> Check:
    """Sleep frees the engine's memory, wake_up takes it back, the model answers the same."""
    if device.type != "cuda":
        return Check("sleep", "skipped", "vLLM sleep mode exists on CUDA only")
    if why := vllm_missing():
        return Check("sleep", "skipped", why)
    policy = load_policy(model, device, dtype)
    prompts = prompts_for(policy)
    sampler = engine(policy, sleep=True)
    try:
        first = greedy(sampler, prompts)  # generate() puts the engine to sleep when done
        torch.cuda.synchronize()
        free_asleep = torch.cuda.mem_get_info()[0]
        sampler._wake(("weights", "kv_cache"))
        torch.cuda.synchronize()
        free_awake = torch.cuda.mem_get_info()[0]
        again = greedy(sampler, prompts)
    finally:
        sampler.close()
    freed = (free_asleep - free_awake) / 2**30
    ok = freed > 0.05 and again == first
    detail = (
        f"sleep freed {freed:.2f} GiB, wake_up restored it; same greedy output: {again == first}"
    )
    return verdict("sleep", ok, detail, freed_gib=freed)


# --- weight sync -----------------------------------------------------------------------------
def check_sync(device: torch.device, dtype: torch.dtype, model: Path, mode: str) -> Check:
    """After a strong LoRA change and sync_weights, vLLM's greedy == transformers' greedy."""
    from models.samplers import TransformersSampler

    name = f"sync_{mode}"
    if why := vllm_missing():
        return Check(name, "skipped", why)
    policy = load_policy(model, device, dtype)
    prompts = prompts_for(policy)
    sampler = engine(policy, sync=mode)
    try:
        before = greedy(sampler, prompts)
        strong_lora_change(policy)
        start = time.perf_counter()
        sampler.sync_weights(policy)
        seconds = time.perf_counter() - start
        after, want = greedy(sampler, prompts), greedy(TransformersSampler(policy), prompts)
    finally:
        sampler.close()
    ok = after == want and after != before
    detail = f"greedy equal: {after == want}, changed: {after != before}, sync {seconds:.2f} s"
    return verdict(name, ok, detail, sync_seconds=seconds)


# --- sampler / trainer mismatch --------------------------------------------------------------
def mismatch_stats(sampled: list[list[float]], trainer: torch.Tensor) -> dict[str, float]:
    """Per-token statistics of trainer - sampler log-probs over the tokens both report."""
    diffs = [
        trainer[i, j].item() - lp
        for i, row in enumerate(sampled)
        for j, lp in enumerate(row)
        if math.isfinite(lp)
    ]
    d = torch.tensor(diffs, dtype=torch.float64)
    return {
        "tokens": len(diffs),
        "mean_abs": d.abs().mean().item(),
        "max_abs": d.abs().max().item(),
        "mean_ratio_minus_1": (d.exp() - 1).mean().item(),  # the importance weight's bias
        "frac_over_0.1": (d.abs() > 0.1).double().mean().item(),
    }


def check_mismatch(device: torch.device, dtype: torch.dtype, model: Path) -> Check:
    """vLLM samples at temperature 1; the trainer rescores the same tokens."""
    from grpo.types import SamplingSettings

    if why := vllm_missing():
        return Check("mismatch", "skipped", why)
    policy = load_policy(model, device, dtype)
    prompts = prompts_for(policy)
    sampler = engine(policy)
    try:
        rollout = sampler.generate(prompts, 4, SamplingSettings(max_new_tokens=16))
    finally:
        sampler.close()
    batch = policy.rollout_batch(policy.encode(prompts), rollout.completion_ids, 4)
    with torch.no_grad():
        trainer = policy.logprobs(batch, 1.0).logp.float().cpu()
    stats = mismatch_stats(rollout.logprobs, trainer)
    tol = MISMATCH_MEAN_TOL[dtype]
    detail = (
        f"{stats['tokens']} tokens, mean |diff| {stats['mean_abs']:.2e} (tolerance {tol:g}), "
        f"max {stats['max_abs']:.2e}, mean ratio-1 {stats['mean_ratio_minus_1']:+.2e}"
    )
    return verdict("mismatch", stats["mean_abs"] <= tol, detail, **stats)


# --- two ranks -------------------------------------------------------------------------------
def check_two_ranks(device: torch.device, dtype: torch.dtype, model: Path) -> Check:
    """torchrun with 2 processes, one vLLM engine per rank sharing the process group."""
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if count < 2:
        return Check("two_ranks", "skipped", f"needs 2 CUDA devices, found {count}")
    if why := vllm_missing():
        return Check("two_ranks", "skipped", why)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += [str(Path(__file__).resolve()), "--rank-worker", str(model)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    lines = [line for line in result.stdout.splitlines() if line.startswith("rank-ok")]
    ok = result.returncode == 0 and len(lines) == 2
    detail = "2 ranks synced and agree" if ok else (result.stderr or result.stdout)[-300:].strip()
    return verdict("two_ranks", ok, detail.replace("\n", " | "))


def rank_worker(model: Path) -> None:
    """One torchrun rank: policy + engine on its GPU, sync after a change, greedy equality."""
    from grpo import distributed
    from models.samplers import TransformersSampler

    info = distributed.init_distributed()
    policy = load_policy(model, info.device, torch.bfloat16)
    prompts = prompts_for(policy)
    sampler = engine(policy)
    strong_lora_change(policy)  # same seed: the same change on both ranks
    sampler.sync_weights(policy)
    equal = greedy(sampler, prompts) == greedy(TransformersSampler(policy), prompts)
    flag = torch.tensor([1.0 if equal else 0.0], device=info.device)
    torch.distributed.all_reduce(flag)
    sampler.close()  # also destroys the process group (see VLLMSampler.close)
    if flag.item() == 2.0:
        print(f"rank-ok {info.rank}", flush=True)


# --- the run ---------------------------------------------------------------------------------
def model_checks(model: Path) -> list[tuple[str, Callable[[torch.device, torch.dtype], Check]]]:
    return [
        ("lean_naive", lambda d, t: check_lean_naive(d, t, model)),
        ("sleep", lambda d, t: check_sleep(d, t, model)),
        ("sync_merged", lambda d, t: check_sync(d, t, model, "merged")),
        ("sync_adapter", lambda d, t: check_sync(d, t, model, "adapter")),
        ("mismatch", lambda d, t: check_mismatch(d, t, model)),
    ]


def run_checks(
    checks: list[tuple[str, Callable[[torch.device, torch.dtype], Check]]],
    device: torch.device,
    dtype: torch.dtype,
    prefix: str = "",
) -> list[Check]:
    """Run each check, printing its line as it finishes; an exception is that check's FAIL."""
    results = []
    for name, check in checks:
        start = time.perf_counter()
        try:
            result = check(device, dtype)
        except Exception as error:  # a crash is that check's FAIL; the run goes on
            result = Check(name, "FAIL", f"{type(error).__name__}: {error}".splitlines()[0][:300])
        result.name = prefix + result.name
        result.data["seconds"] = round(time.perf_counter() - start, 2)
        release_memory()
        print(result.line(), flush=True)
        results.append(result)
    return results


def release_memory() -> None:
    """Hand the last check's model back before the next one: vLLM sizes its share of the GPU
    from the memory free when its engine starts."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def exit_code(results: list[Check]) -> int:
    return 1 if any(r.status == "FAIL" for r in results) else 0


def gpu_models() -> list[tuple[str, Path]]:
    from models.tiny import shaped_model_path, tiny_model_path

    published = json.loads(FIXTURE_3B.read_text())
    shaped = shaped_model_path(published, text_layers=2, vision_layers=2, dtype="bfloat16")
    return [("tiny", tiny_model_path()), ("3b-shape", shaped)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the JSON summary here")
    parser.add_argument("--rank-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rank_worker:
        rank_worker(args.rank_worker)
        return 0
    if not torch.cuda.is_available():
        print(
            f"gpu_check: no CUDA device here (torch {torch.__version__}): nothing checked, exit 0"
        )
        return 0
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    device, dtype = torch.device("cuda"), torch.bfloat16
    results = run_checks([("kernels", check_kernels)], device, dtype)
    for label, model in gpu_models():
        results += run_checks(model_checks(model), device, dtype, prefix=f"{label}/")
    tiny = gpu_models()[0][1]
    results += run_checks([("two_ranks", lambda d, t: check_two_ranks(d, t, tiny))], device, dtype)
    summary = {"device": torch.cuda.get_device_name(0), "checks": [asdict(r) for r in results]}
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return exit_code(results)


if __name__ == "__main__":
    sys.exit(main())
