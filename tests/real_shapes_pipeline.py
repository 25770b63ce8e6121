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

import pytest

from tests.launch import ROOT
from tests.shape_report import record
from tests.test_real_shapes import BF16_TIE, FIXTURES, SHAPES, published  # noqa: F401

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
