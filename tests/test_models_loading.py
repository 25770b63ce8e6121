"""Model loading: attention-kernel choice and its errors, dtype, model paths, LoRA targets and
gradient checkpointing."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from grpo.types import PolicySettings
from models.loading import (
    ModelLoadError,
    choose_attention,
    default_dtype,
    load_base_model,
    resolve_model_path,
)
from models.policy import Policy

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a cuda device object needs no GPU


@pytest.fixture
def flash_attn_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "flash_attn" else real(name, *a),
    )


@pytest.fixture
def flash_attn_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "flash_attn" else real(name, *a),
    )


def test_flash_attention_requested_on_cpu_fails_clearly(tiny_model_dir: Path) -> None:
    with pytest.raises(ModelLoadError) as error:
        load_base_model(str(tiny_model_dir), CPU, attn_implementation="flash_attention_2")
    message = str(error.value)
    assert "flash_attention_2" in message and "CUDA is not available" in message
    assert "sdpa" in message  # and what to use instead
    with pytest.raises(ModelLoadError, match="flash_attention_2"):
        Policy(
            PolicySettings(model=str(tiny_model_dir), attn_implementation="flash_attention_2"), CPU
        )


def test_flash_attention_requested_without_package(flash_attn_missing: None) -> None:
    with pytest.raises(ModelLoadError, match=r"flash_attention_2.*flash_attn is not installed"):
        choose_attention(CUDA, "flash_attention_2")


def test_attention_choice(flash_attn_installed: None) -> None:
    assert choose_attention(CUDA, None) == "flash_attention_2"
    assert choose_attention(CUDA, "auto") == "flash_attention_2"
    assert choose_attention(CUDA, "flash_attention_2") == "flash_attention_2"
    assert choose_attention(CPU, None) == "sdpa"  # flash_attn alone is not enough
    assert choose_attention(CPU, "eager") == "eager"
    assert choose_attention(CUDA, "sdpa") == "sdpa"
    # float32 weights (full fine-tuning): flash-attn's kernels take 16-bit inputs only
    assert choose_attention(CUDA, None, torch.float32) == "sdpa"
    assert choose_attention(CUDA, None, torch.bfloat16) == "flash_attention_2"
    with pytest.raises(ModelLoadError, match="needs bfloat16/float16 weights"):
        choose_attention(CUDA, "flash_attention_2", torch.float32)


def test_attention_choice_without_flash_attn(flash_attn_missing: None) -> None:
    assert choose_attention(CUDA, None) == "sdpa"
    assert choose_attention(CPU, "auto") == "sdpa"


def test_default_dtype() -> None:
    assert default_dtype(CPU) == torch.float32
    assert default_dtype(CUDA) == torch.bfloat16


def test_resolve_model_path(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert resolve_model_path("tiny") == str(tiny_model_dir)
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert resolve_model_path("Qwen/Qwen2.5-VL-3B-Instruct") == "Qwen/Qwen2.5-VL-3B-Instruct"
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ModelLoadError, match="model directory not found") as error:
        resolve_model_path(missing)
    assert missing in str(error.value)


@pytest.fixture(scope="module")
def policy(tiny_model_dir: Path) -> Policy:
    return Policy(PolicySettings(model=str(tiny_model_dir)), CPU)


def test_loaded_tiny_model(policy: Policy) -> None:
    inner = policy.model.get_base_model()
    assert inner.config._attn_implementation == "sdpa"
    assert all(p.dtype == torch.float32 for p in policy.model.parameters())
    assert policy.pad_id == 151643 and policy.stop_ids == {151643, 151645}
    assert policy.vision_ids == set(range(151652, 151657))


def _lora_module_names(model: Any) -> list[str]:
    return [name for name, _ in model.named_modules() if name.endswith(".lora_A")]


def test_lora_adapts_only_the_language_model(policy: Policy) -> None:
    names = _lora_module_names(policy.model)
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert len(names) == 2 * len(projections)  # 2 layers x 7 projections
    assert all(".language_model.layers." in n for n in names)
    assert {n.split(".")[-2] for n in names} == set(projections)
    trainable = [n for n, p in policy.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not policy.vision_trainable


def test_lora_on_the_vision_tower_disables_the_feature_cache(tiny_model_dir: Path) -> None:
    settings = PolicySettings(model=str(tiny_model_dir), lora_vision=True)
    policy = Policy(settings, CPU)
    vision = [n for n in _lora_module_names(policy.model) if ".visual." in n]
    assert len(vision) == 2 * 5  # 2 blocks x (qkv, proj, gate_proj, up_proj, down_proj)
    assert all(".visual.blocks." in n for n in vision)
    assert policy.vision_trainable
    prompts = policy.encode([policy.prompt_input([{"role": "user", "content": "x"}], [])])
    assert policy.image_features(prompts) is None


def test_no_adapter(tiny_model_dir: Path) -> None:
    policy = Policy(PolicySettings(model=str(tiny_model_dir), lora_r=0), CPU)
    assert not _lora_module_names(policy.model)
    assert policy.trainable_parameters() == []


def test_gradient_checkpointing_gives_the_same_gradients(
    tiny_model_dir: Path, images: list[Any]
) -> None:
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # same LoRA A init
        settings = PolicySettings(
            model=str(tiny_model_dir),
            gradient_checkpointing=checkpointing,
        )
        policy = Policy(settings, CPU)
        policy.model.train()  # transformers checkpoints only in training mode
        assert policy.model.get_base_model().is_gradient_checkpointing == checkpointing
        content = [{"type": "image"}, {"type": "text", "text": "what?"}]
        prompts = [policy.prompt_input([{"role": "user", "content": content}], images[:1])]
        batch = policy.rollout_batch(policy.encode(prompts), [[1, 2, 3], [4, 5]], 2)
        policy.logprobs(batch, 1.0).logp.sum().backward()
        grads.append({n: p.grad for n, p in policy.model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)
    assert any(g.abs().sum() > 0 for g in grads[0].values())
