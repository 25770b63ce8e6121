"""Merged export: layout, loads in transformers and vLLM, and computes what base + adapter does.

The checkpoint is written by the trainer's own save_checkpoint from a LoRA policy whose factors
are random (peft starts B at zero, which would make the merge the identity and every equality
below vacuous). The base is the vLLM-compatible tiny model (head size 32), so the same export
also serves the vLLM test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import evaluate
from evaluate import export_checkpoint
from grpo.checkpoint import CheckpointError, save_checkpoint
from grpo.evaluation import EvalReport, EvalSettings
from grpo.evaluation import evaluate as evaluate_with
from grpo.types import EXPORT_INFO, PolicySettings, PromptInput, SamplingSettings
from models import BACKEND
from models.export import load_policy
from models.policy import Policy
from models.samplers import TransformersSampler
from models.tiny import tiny_model_path
from tests.training_helpers import write_ocr_jsonl
from tests.vllm_helpers import VLLM_TINY, image_prompts


def run_evaluation(settings: EvalSettings) -> EvalReport:
    return evaluate_with(settings, BACKEND)


GREEDY = SamplingSettings(max_new_tokens=8, greedy=True)
CPU = torch.device("cpu")


def _weights(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118


@pytest.fixture(scope="module")
def base_dir() -> Path:
    return tiny_model_path(spec=VLLM_TINY)


@pytest.fixture(scope="module")
def checkpoint(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trainer checkpoint (adapter/ + run.json) with clearly non-zero LoRA factors."""
    torch.manual_seed(0)
    policy = Policy(PolicySettings(model=str(base_dir), lora_r=4, lora_alpha=8), CPU)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in policy.model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    run = {"base_model": str(base_dir), "base_model_path": policy.path, "task": "ocr"}
    run_dir = tmp_path_factory.mktemp("run")
    return save_checkpoint(run_dir, 3, policy, {"step": 3}, {**run, "step": 3}, None)


@pytest.fixture(scope="module")
def exported(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "merged"
    evaluate.main(["export", "--ckpt", str(checkpoint), "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def adapted(checkpoint: Path) -> Policy:
    """Base + adapter, as evaluation loads a checkpoint."""
    return load_policy(
        str(tiny_model_path(spec=VLLM_TINY)), checkpoint / "adapter", PolicySettings(lora_r=0), CPU
    )


@pytest.fixture(scope="module")
def prompts(adapted: Policy) -> list[PromptInput]:
    return image_prompts(adapted)


def test_export_is_a_full_model_directory(exported: Path, base_dir: Path) -> None:
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "processor_config.json",
        EXPORT_INFO,
    ):
        assert (exported / name).is_file(), name
    assert (exported / "chat_template.jinja").read_text() == (
        base_dir / "chat_template.jinja"
    ).read_text()
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    info = json.loads((exported / EXPORT_INFO).read_text())
    assert info["task"] == "ocr" and info["base_model_path"] == str(base_dir)
    assert not list(exported.parent.glob(".merged.tmp-*"))  # written beside, then renamed


def test_export_has_the_base_tensor_names_and_changes_only_adapted_weights(
    exported: Path, base_dir: Path
) -> None:
    merged, base = _weights(exported), _weights(base_dir)
    assert set(merged) == set(base)  # same names as the original checkpoint, no lora tensors
    changed = {k for k in base if not torch.equal(merged[k], base[k])}
    adapted_kinds = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert changed  # the adapter is not the identity
    for key in changed:
        assert key.startswith("model.layers.") and key.endswith(".weight"), key
        assert key.split(".")[-2] in adapted_kinds, key
    # every adapted LM projection moved, by much more than rounding
    layers = VLLM_TINY.num_layers
    assert len(changed) == layers * len(adapted_kinds)
    assert all((merged[k] - base[k]).abs().max() > 1e-2 for k in changed)


def test_transformers_loads_export_and_matches_base_plus_adapter(
    exported: Path, adapted: Policy, prompts: list[PromptInput]
) -> None:
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(exported, dtype=torch.float32)
    model.eval()
    batch = adapted.encode(prompts)
    fields = {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
        "mm_token_type_ids": batch.mm_token_type_ids,
        "pixel_values": batch.pixel_values,
        "image_grid_thw": batch.image_grid_thw,
    }
    with torch.no_grad():
        merged_logits = model(**fields).logits  # [P, L, V]
        adapter_logits = adapted.model(**fields).logits  # [P, L, V]
        with adapted.model.disable_adapter():
            base_logits = adapted.model(**fields).logits  # [P, L, V]
    mask = batch.attention_mask.bool()  # padded positions are not compared
    torch.testing.assert_close(merged_logits[mask], adapter_logits[mask], rtol=0, atol=1e-5)
    assert (base_logits[mask] - adapter_logits[mask]).abs().max() > 1e-3  # the test can fail

    merged = Policy(PolicySettings(model=str(exported), lora_r=0), CPU)
    ids = TransformersSampler(merged).generate(prompts, 1, GREEDY).completion_ids
    assert ids == TransformersSampler(adapted).generate(prompts, 1, GREEDY).completion_ids
    assert all(len(row) > 0 for row in ids)


def test_export_keeps_the_stored_dtype_or_casts(checkpoint: Path, tmp_path: Path) -> None:
    out = export_checkpoint(str(checkpoint), str(tmp_path / "bf16"), dtype="bfloat16")
    weights = _weights(out)
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_export_refuses_to_overwrite(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(SystemExit, match="not empty"):
        evaluate.main(["export", "--ckpt", str(checkpoint), "--out", str(out)])
    assert (out / "keep.txt").read_text() == "x"
    assert not list(tmp_path.glob(".taken.tmp-*"))


def test_export_needs_an_adapter(exported: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no adapter to merge"):
        export_checkpoint(str(exported), str(tmp_path / "again"))


@pytest.mark.vllm
def test_vllm_loads_export_and_matches_transformers(
    exported: Path, checkpoint: Path, tmp_path: Path
) -> None:
    """evaluate.py --sampler vllm on the merged directory: the engine loads the export from
    disk; with --compare-base the base model's weights are pushed into the same engine. Both
    must answer as transformers does with base + adapter, and with the adapter disabled."""
    pytest.importorskip("vllm")
    data = write_ocr_jsonl(tmp_path / "data", 2)
    common = {"data": str(data), "max_new_tokens": 8, "compare_base": True}
    with_vllm = run_evaluation(
        EvalSettings(ckpt=str(exported), sampler="vllm", out=str(tmp_path / "v"), **common)
    )
    with_hf = run_evaluation(
        EvalSettings(ckpt=str(checkpoint), sampler="hf", out=str(tmp_path / "h"), **common)
    )
    assert with_vllm.summary["sampler"] == "vllm" and with_vllm.summary["source"] == "merged"
    for a, b in zip(with_vllm.predictions, with_hf.predictions, strict=True):
        assert (a["prediction"], a["num_tokens"]) == (b["prediction"], b["num_tokens"])
    for a, b in zip(with_vllm.base_predictions, with_hf.base_predictions, strict=True):
        assert (a["prediction"], a["num_tokens"]) == (b["prediction"], b["num_tokens"])
    assert [p["prediction"] for p in with_hf.predictions] != [
        p["prediction"] for p in with_hf.base_predictions
    ]
