"""One real-shaped model (tests/shape_cases.py) through the whole pipeline, in two halves.

Run by tests/test_real_shapes_pipeline.py as `python tests/shape_worker.py NAME OUT --train`
(build the model, one train_step with each sampler, a weight sync, save a checkpoint) and then
`... --reload` (export the checkpoint, reload the export in transformers and in vLLM), each a
process of its own; for a small shape (Shape.one_process) `... --both`, the two in one process.
A process per half keeps each half's peak RSS its own (VmHWM only grows) and gives all of its
memory back before the next: a started vLLM engine keeps much of its own after close() (the
7B shape's RSS stayed at 14 GiB with the trainer released), which the export's two fresh
copies of the model would otherwise stack on. The worker measures and records; the test
asserts. Each half writes OUT/train.json or OUT/reload.json:

  vllm_step, hf_step      one train_step with each sampler: loss, grad norm, LoRA moved, time
  sync                    after a strong LoRA change and sync_weights: vLLM's greedy tokens
                          and their log-probs vs the policy's (the trainer's logits)
  export_hf, export_vllm  the merged export reloaded in transformers / in vLLM, the same
                          comparison against the trained policy
  stages                  RSS now and peak RSS (GiB) and seconds after each stage
  peak                    the half's peak RSS (GiB)

The built model, the checkpoint and the export are deleted as soon as they are used: at real
widths they are GBs each. One case by hand: VLGRPO_SHAPES=NAME pytest
tests/test_real_shapes_pipeline.py.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import models  # noqa: E402, F401  (the torchvision shim first)
from evaluate import export_checkpoint  # noqa: E402
from grpo import distributed, host_heap  # noqa: E402
from grpo.checkpoint import save_checkpoint  # noqa: E402
from grpo.config import TrainConfig  # noqa: E402
from grpo.trainer import Trainer, build_trainer, run_info, train_step, trainer_state  # noqa: E402
from grpo.types import PolicySettings, PromptInput, SamplingSettings  # noqa: E402
from models import BACKEND  # noqa: E402
from models.policy import Policy, make_policy  # noqa: E402
from models.samplers import TransformersSampler  # noqa: E402
from models.tiny import shaped_model_path  # noqa: E402
from models.vllm_sampler import VLLMSampler, VLLMSettings  # noqa: E402
from tests.shape_cases import SHAPES, Shape  # noqa: E402
from tests.training_helpers import small_config, write_ocr_jsonl  # noqa: E402
from tests.vllm_helpers import image_prompts, trainer_logprobs  # noqa: E402

GREEDY = SamplingSettings(max_new_tokens=4, greedy=True)
MAX_MODEL_LEN = 512  # prompts here are < 100 tokens; it bounds vLLM's profiling batch too
KV_CACHE_GIB = 0.25


class Stages:
    """RSS after each named stage: where the memory goes, case by case."""

    def __init__(self) -> None:
        self.started = time.time()  # wall clock: the test lines up the halves' rows by it
        self.start = time.perf_counter()
        self.rows: dict[str, dict[str, float]] = {}

    def __call__(self, name: str) -> None:
        self.rows[name] = {
            "rss_gib": round(host_heap.rss_bytes() / 2**30, 2),
            "peak_gib": round(peak_rss_gib(), 2),
            "seconds": round(time.perf_counter() - self.start, 1),
        }


def peak_rss_gib() -> float:
    """This process's own peak resident set so far (grpo/host_heap.py)."""
    return host_heap.peak_rss_bytes() / 2**30


def step_config(shape: Shape, model: Path, work: Path) -> TrainConfig:
    """One prompt, G=2, 4 new tokens, a small engine: the shortest honest train_step. A
    vision model reads OCR samples with small images, a text model the built-in arith task."""
    config = small_config(
        write_ocr_jsonl(work / "data", 2),
        work / "run",
        model=str(model),
        dtype=shape.dtype,
        sampler="vllm",
        vllm_max_model_len=MAX_MODEL_LEN,
        prompts_per_step=1,
        num_generations=2,
        max_completion_length=4,
    )
    return config if shape.vision else replace(config, task="arith", data=None)


def probe_prompt(policy: Policy) -> PromptInput:
    """A short prompt for the greedy comparisons: one small image for a vision model."""
    if policy.has_vision:
        return image_prompts(policy)[0]
    message = [{"role": "user", "content": [{"type": "text", "text": "What is 7 + 5?"}]}]
    return policy.prompt_input(message, [])


def strong_lora_change(policy: Policy) -> None:
    """Random LoRA factors at unit scale (peft starts B at zero, and one step at a small rate
    barely moves them): the adapted model's outputs differ clearly from the base's."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in policy.model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                noise = torch.randn(param.shape, generator=generator) / math.sqrt(param.shape[1])
                param.copy_(noise.to(param.dtype))


def scored(sampler: Any, judge: Policy, prompt: PromptInput, want: list[int] | None) -> dict:
    """`sampler`'s greedy tokens and the log-probs it reports; `judge`'s log-probs (the
    trainer's recomputation at temperature 1) of those tokens and of `want`'s."""
    rollout = sampler.generate([prompt], 1, GREEDY)
    ids = rollout.completion_ids[0]
    logp, _ = trainer_logprobs(judge, [prompt], [ids], 1, 1.0)  # [1, T]
    row = {"ids": ids, "logprobs": rollout.logprobs[0], "trainer_logprobs": logp[0].tolist()}
    if want is not None:
        logp, _ = trainer_logprobs(judge, [prompt], [want], 1, 1.0)  # [1, T']
        row["want_logprobs"] = logp[0].tolist()
    return row


def one_step(trainer: Trainer) -> dict[str, Any]:
    """train_step with the trainer's current sampler: what it did to the adapter."""
    start = time.perf_counter()
    before = [p.detach().clone() for p in trainer.policy.trainable_parameters()]
    metrics, _ = train_step(trainer)
    after = trainer.policy.trainable_parameters()
    return {
        "loss": metrics.get("loss"),
        "grad_norm": metrics.get("grad_norm"),
        "lora_moved": any(not torch.equal(a, b) for a, b in zip(before, after, strict=True)),
        "seconds": time.perf_counter() - start,
    }


def train_and_sync(shape: Shape, model: Path, out: Path, stage: Stages) -> tuple[dict, Path]:
    """A step with each sampler, then a strong LoRA change synced into the engine; returns
    the results and the saved checkpoint."""
    policy_loaded = BACKEND.load_policy

    def load_policy(settings: PolicySettings, device: torch.device) -> Any:
        policy = policy_loaded(settings, device)
        stage("policy loaded")
        return policy

    backend = replace(BACKEND, load_policy=load_policy)
    trainer = build_trainer(step_config(shape, model, out), distributed.init_distributed(), backend)
    stage("vLLM engine started")
    policy, engine = trainer.policy, trainer.sampler
    result: dict[str, Any] = {"vllm_step": one_step(trainer)}
    stage("vLLM step")
    trainer.sampler = TransformersSampler(policy)  # the same trainer, the other sampler
    result["hf_step"] = one_step(trainer)
    trainer.sampler = engine
    stage("transformers step")

    prompt = probe_prompt(policy)
    before = engine.generate([prompt], 1, GREEDY).completion_ids[0]
    strong_lora_change(policy)
    engine.sync_weights(policy)
    want = scored(TransformersSampler(policy), policy, prompt, None)
    synced = scored(engine, policy, prompt, want["ids"])
    result["sync"] = {**synced, "before": before, "want": want}
    stage("sync checked")
    trainer.step = 2
    ckpt = save_checkpoint(out / "run", 2, policy, trainer_state(trainer), run_info(trainer), None)
    result["prompt"] = {"text": prompt.text, "images": [list(im.size) for im in prompt.images]}
    engine.close()
    return result, ckpt


def reload_export(shape: Shape, ckpt: Path, out: Path, want: list[int], stage: Stages) -> dict:
    """The merged export loaded as a plain model, in transformers and in vLLM."""
    exported = export_checkpoint(str(ckpt), str(out / "merged"))
    stage("exported")
    # the pixel bounds the policy trained with (tests/training_helpers.py small_config)
    pixels = dict(min_pixels=28 * 28, max_pixels=56 * 56) if shape.vision else {}
    settings = PolicySettings(model=str(exported), lora_r=0, dtype=shape.dtype, **pixels)
    merged = make_policy(settings, torch.device("cpu"))
    # the engine first: loading packs copies it frees again, and the policy's weights are
    # still unread pages of the export's file then, not resident memory stacked beneath
    engine = VLLMSampler(
        merged, VLLMSettings(kv_cache_gib=KV_CACHE_GIB, max_model_len=MAX_MODEL_LEN)
    )
    prompt = probe_prompt(merged)
    result = {"export_vllm": scored(engine, merged, prompt, want)}
    engine.close()
    stage("export reloaded in vLLM")
    result["export_hf"] = scored(TransformersSampler(merged), merged, prompt, want)
    stage("export reloaded in transformers")
    return result


def train_main(name: str, out: Path) -> None:
    """The first child: build the model, train, sync, save; report into OUT/train.json."""
    shape, stage = SHAPES[name], Stages()
    model = shaped_model_path(
        shape.published(), shape.text_layers, shape.vision_layers, shape.dtype
    )
    stage("model built and saved")
    result, ckpt = train_and_sync(shape, model, out, stage)
    report = {"result": result, "model": str(model), "checkpoint": str(ckpt), "stages": stage.rows}
    report |= {"peak": peak_rss_gib(), "started": stage.started}
    (out / "train.json").write_text(json.dumps(report))


def reload_main(name: str, out: Path) -> None:
    """The second child: export the checkpoint (over the built base model), reload it; report
    into OUT/reload.json."""
    shape, stage = SHAPES[name], Stages()
    trained = json.loads((out / "train.json").read_text())
    ckpt = Path(trained["checkpoint"])
    want = trained["result"]["sync"]["want"]["ids"]
    result = reload_export(shape, ckpt, out, want, stage)
    for used in (Path(trained["model"]), ckpt.parent, out / "merged"):
        shutil.rmtree(used)
    stage("model, checkpoint and export deleted")
    report = {"result": result, "stages": stage.rows}
    report |= {"peak": peak_rss_gib(), "started": stage.started}
    (out / "reload.json").write_text(json.dumps(report))


def both_main(name: str, out: Path) -> None:
    """Both halves in this process, for a shape small enough that the export's copies fit
    beside what the closed engine keeps (Shape.one_process): one interpreter's imports and
    one tokenizer parse instead of two."""
    train_main(name, out)
    reload_main(name, out)


if __name__ == "__main__":
    halves = {"--train": train_main, "--reload": reload_main, "--both": both_main}
    halves[sys.argv[3]](sys.argv[1], Path(sys.argv[2]))
