"""One real-shaped Qwen2.5-VL through the whole pipeline, in a process of its own.

Run by tests/test_real_shapes.py as `python tests/shape_worker.py FIXTURE DTYPE TEXT_LAYERS OUT`.
A process per shape keeps each case's peak RSS its own (ru_maxrss only grows) and returns all
memory to the machine between cases. The worker only measures and records; the test asserts.
It writes OUT/result.json:

  hf_step, vllm_step     metrics of one train_step with each sampler (+ LoRA moved, seconds)
  sync                   vLLM greedy vs the policy's greedy after a strong LoRA change
  export_hf, export_vllm the merged export reloaded in transformers / vLLM vs the same greedy
  peak_rss_gib, seconds
"""

from __future__ import annotations

import gc
import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import models  # noqa: E402, F401  (the torchvision shim first)
from evaluate import export_checkpoint  # noqa: E402
from grpo import distributed  # noqa: E402
from grpo.checkpoint import save_checkpoint  # noqa: E402
from grpo.trainer import build_trainer, run_info, train_step, trainer_state  # noqa: E402
from grpo.types import PolicySettings, PromptInput, SamplingSettings  # noqa: E402
from models import BACKEND  # noqa: E402
from models.policy import Policy  # noqa: E402
from models.samplers import TransformersSampler  # noqa: E402
from models.tiny import shaped_model_path  # noqa: E402
from tests.training_helpers import small_config, write_ocr_jsonl  # noqa: E402
from tests.vllm_helpers import image_prompts  # noqa: E402

GREEDY = SamplingSettings(max_new_tokens=6, greedy=True)


def peak_rss_gib() -> float:
    """This process's peak resident set so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def lora_snapshot(policy: Policy) -> list[torch.Tensor]:
    return [p.detach().clone() for p in policy.trainable_parameters()]


def moved(before: list[torch.Tensor], policy: Policy) -> bool:
    after = policy.trainable_parameters()
    return any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def strong_lora_change(policy: Policy) -> None:
    """Random LoRA factors at unit scale (peft starts B at zero, and one step at a small rate
    barely moves them): the adapted model's outputs differ clearly from the base's."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in policy.model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                noise = torch.randn(param.shape, generator=generator) / math.sqrt(param.shape[1])
                param.copy_(noise.to(param.dtype))


def greedy_ids(sampler: Any, prompt: PromptInput) -> list[int]:
    return sampler.generate([prompt], 1, GREEDY).completion_ids[0]


def tie_gap(policy: Policy, prompt: PromptInput, a: list[int], b: list[int]) -> float | None:
    """None if a == b; else |logit_a - logit_b| under `policy` at the first position where the
    two greedy outputs part (after the common prefix): a near-tie that rounding may flip."""
    if a == b:
        return None
    k = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
    if k is None:  # one stopped earlier: the stop token against the other's next token
        return float("inf")
    batch = policy.rollout_batch(policy.encode([prompt, prompt]), [a[: k + 1], b[: k + 1]], 1)
    with torch.no_grad():
        logp = policy.logprobs(batch, 1.0).logp  # [2, T]
    return abs(float(logp[0, k] - logp[1, k]))


def comparison(policy: Policy, prompt: PromptInput, got: list[int], want: list[int]) -> dict:
    return {"got": got, "want": want, "tie_gap": tie_gap(policy, prompt, got, want)}


def one_step(model: Path, dtype: str, sampler: str, work: Path) -> tuple[Any, dict]:
    """build_trainer + train_step with `sampler`; returns the trainer and what the step did."""
    data = write_ocr_jsonl(work / "data", 4)
    config = small_config(
        data,
        work / f"run-{sampler}",
        model=str(model),
        sampler=sampler,
        dtype=dtype,
        prompts_per_step=1,
        num_generations=2,
        max_completion_length=4,
        vllm_max_model_len=1024,
    )
    start = time.perf_counter()
    trainer = build_trainer(config, distributed.init_distributed(), BACKEND)
    before = lora_snapshot(trainer.policy)
    metrics, _ = train_step(trainer)
    finite = {k: v for k, v in metrics.items() if isinstance(v, float) and math.isfinite(v)}
    return trainer, {
        "loss": metrics.get("loss"),
        "finite_metrics": len(finite),
        "metrics": len(metrics),
        "lora_moved": moved(before, trainer.policy),
        "seconds": time.perf_counter() - start,
    }


def main(fixture: str, dtype: str, text_layers: int, out: Path) -> None:
    start = time.perf_counter()
    published = json.loads(Path(fixture).read_text())
    model = shaped_model_path(published, text_layers=text_layers, vision_layers=2, dtype=dtype)
    result: dict[str, Any] = {"model": str(model), "build_seconds": time.perf_counter() - start}

    trainer, result["hf_step"] = one_step(model, dtype, "hf", out)
    trainer = None  # the last reference: the model's memory goes back before the next load
    gc.collect()

    trainer, result["vllm_step"] = one_step(model, dtype, "vllm", out)
    policy, engine = trainer.policy, trainer.sampler
    prompt = image_prompts(policy)[0]
    before = greedy_ids(engine, prompt)
    strong_lora_change(policy)
    engine.sync_weights(policy)
    want = greedy_ids(TransformersSampler(policy), prompt)
    result["sync"] = {
        **comparison(policy, prompt, greedy_ids(engine, prompt), want),
        "before": before,
    }
    trainer.step = 1
    ckpt = save_checkpoint(
        out / "run-vllm", 1, policy, trainer_state(trainer), run_info(trainer), None
    )
    engine.close()
    trainer = policy = engine = None
    gc.collect()

    t0 = time.perf_counter()
    exported = export_checkpoint(str(ckpt), str(out / "merged"))
    result["export_seconds"] = time.perf_counter() - t0
    merged = Policy(PolicySettings(model=str(exported), lora_r=0, dtype=dtype), torch.device("cpu"))
    result["export_hf"] = comparison(
        merged, prompt, greedy_ids(TransformersSampler(merged), prompt), want
    )

    from models.vllm_sampler import VLLMSampler, VLLMSettings

    engine = VLLMSampler(merged, VLLMSettings(kv_cache_gib=0.25, max_model_len=1024))
    result["export_vllm"] = comparison(merged, prompt, greedy_ids(engine, prompt), want)
    engine.close()
    result["peak_rss_gib"] = peak_rss_gib()
    result["seconds"] = time.perf_counter() - start
    (out / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))
