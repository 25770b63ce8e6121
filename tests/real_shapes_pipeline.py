"""NOT COLLECTED YET (the name does not start with test_): the per-shape pipeline, kept here
until it fits a 24 GiB machine; its 3B case was OOM-killed at 10.3 GB while vLLM loaded the
checkpoint (another job held ~5 GB). Rename to test_real_shapes_pipeline.py once it passes;
the peak-RSS summary hook it needs (pytest_terminal_summary reading tests.shape_report) was on
tests/conftest.py in commit 45ec97a.

The published Qwen2.5-VL architectures (3B, 7B, 72B) through training, sync and export.

tests/fixtures/qwen2.5-vl-*-instruct.config.json are the models' published config.json files.
Each case builds a checkpoint with exactly those shapes (widths, heads and KV heads, head_dim
128, mrope_section, tied or untied embeddings, vocabulary, vision tower), cut to few layers,
random weights, the real tokenizer (models/tiny.py shaped_model_path), and runs it in a
process of its own (tests/shape_worker.py): one train_step with each sampler, a strong LoRA
change synced into vLLM, the merged export reloaded in transformers and in vLLM. Each case's
peak RSS and time are printed in pytest's terminal summary.

dtype: 3B and 7B in float32. The 72B shape runs in bfloat16 (trainer and vLLM): its two
152064 x 8192 embedding matrices and one 8192-wide layer are ~13.5 GB in float32, twice that
with the engine's copy, more than this 24 GiB machine holds; in bf16 the pair is ~13.5 GB.
Greedy comparisons are exact in float32. In bf16 two kernels (or a merged vs an unmerged
weight) may round a near-tie the other way: a difference is accepted only where the two
tokens' logits under the policy are within BF16_TIE of each other at the first divergence.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from models.tiny import shaped_config
from tests.launch import ROOT
from tests.shape_report import record

FIXTURES = Path(__file__).parent / "fixtures"
# (fixture name, dtype, text layers)
SHAPES = {
    "3b": ("float32", 2),
    "7b": ("float32", 2),
    "72b": ("bfloat16", 1),
}
BF16_TIE = 0.1  # logits; bf16 keeps 8 bits of mantissa: a 0.1 gap at |logit| ~ 10 is 1 ulp-ish


def published(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"qwen2.5-vl-{name}-instruct.config.json").read_text())


@pytest.mark.parametrize("name", list(SHAPES))
def test_the_built_config_is_the_published_one_with_fewer_layers(name: str) -> None:
    source = published(name)
    config = shaped_config(source, text_layers=2, vision_layers=2)
    text, vision = config.text_config, config.vision_config
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "rms_norm_eps",
        "max_position_embeddings",
    ):
        assert getattr(text, key) == source[key], key
    assert text.num_hidden_layers == 2 and vision.depth == 2
    assert text.hidden_size // text.num_attention_heads == 128  # head_dim
    assert (
        text.rope_parameters["mrope_section"]
        == [16, 24, 24]
        == source["rope_scaling"]["mrope_section"]
    )
    assert text.rope_parameters["rope_theta"] == source["rope_theta"] == 1e6
    assert config.tie_word_embeddings is source["tie_word_embeddings"] is (name == "3b")
    assert text.vocab_size == (151936 if name == "3b" else 152064)
    for key in ("hidden_size", "num_heads", "intermediate_size", "window_size", "patch_size"):
        assert getattr(vision, key) == source["vision_config"][key], key
    assert vision.hidden_size == 1280 and vision.num_heads == 16 and vision.window_size == 112
    assert vision.out_hidden_size == text.hidden_size
    assert vision.fullatt_block_indexes == [1]  # one windowed block, then a full-attention one


SLOW = [pytest.mark.slow, pytest.mark.vllm]


@pytest.fixture(scope="module", params=[pytest.param(n, marks=SLOW) for n in SHAPES])
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The worker's result.json for one shape (it fails the test with the worker's output)."""
    name = request.param
    dtype, layers = SHAPES[name]
    out = tmp_path_factory.mktemp(f"shape-{name}")
    fixture = FIXTURES / f"qwen2.5-vl-{name}-instruct.config.json"
    command = [sys.executable, str(ROOT / "tests" / "shape_worker.py"), str(fixture), dtype]
    start = time.perf_counter()
    result = subprocess.run(
        [*command, str(layers), str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    data = json.loads((out / "result.json").read_text())
    data |= {"name": name, "dtype": dtype, "wall_seconds": time.perf_counter() - start}
    record(
        f"Qwen2.5-VL-{name.upper()} shape ({layers} text + 2 vision layers, {dtype}): "
        f"peak RSS {data['peak_rss_gib']:.1f} GiB, {data['wall_seconds']:.0f} s "
        f"(hf step {data['hf_step']['seconds']:.0f} s, "
        f"vllm step {data['vllm_step']['seconds']:.0f} s, export {data['export_seconds']:.0f} s)"
    )
    return data


def agrees(case: dict, key: str) -> None:
    """Greedy outputs equal; in bf16 also a near-tie at the first divergence (see module doc)."""
    got, want, gap = case[key]["got"], case[key]["want"], case[key]["tie_gap"]
    assert want, "the policy's greedy output is empty: nothing was compared"
    if case["dtype"] == "float32" or gap is None:
        assert got == want, key
    else:
        assert gap < BF16_TIE, f"{key}: {got} vs {want}, logit gap {gap:.3f}"


@pytest.mark.slow
@pytest.mark.vllm
def test_a_train_step_with_each_sampler_moves_the_adapter(case: dict) -> None:
    for sampler in ("hf_step", "vllm_step"):
        step = case[sampler]
        assert step["lora_moved"], sampler
        assert math.isfinite(step["loss"]), sampler
        assert step["finite_metrics"] > 0


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_follows_a_strong_lora_change_after_sync(case: dict) -> None:
    agrees(case, "sync")
    assert case["sync"]["before"] != case["sync"]["want"]  # the change matters: the test can fail


@pytest.mark.slow
@pytest.mark.vllm
def test_the_export_reloads_in_transformers_with_the_same_greedy_output(case: dict) -> None:
    agrees(case, "export_hf")


@pytest.mark.slow
@pytest.mark.vllm
def test_the_export_reloads_in_vllm_with_the_same_greedy_output(case: dict) -> None:
    agrees(case, "export_vllm")
