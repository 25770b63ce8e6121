"""bench/gpu_check.py's checks, run here on the CPU in float32 where they can run at all.

The same functions run on a GPU in bf16; here they prove the checks themselves work (and can
fail), and that the script tells a CPU-only machine so instead of pretending.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_check
from bench.gpu_check import Check, check_kernels, run_checks
from models.tiny import tiny_model_path
from tests.launch import ROOT

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model() -> Path:
    return tiny_model_path()


def test_on_a_cpu_machine_it_says_so_in_one_line_and_exits_0() -> None:
    result = subprocess.run(
        [sys.executable, "bench/gpu_check.py"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "nothing checked" in lines[0]


def test_kernel_choice_on_cpu_is_sdpa_and_float32() -> None:
    result = check_kernels(CPU, torch.float32)
    assert result.status == "ok", result.line()
    assert result.data == {"attention": "sdpa", "dtype": "torch.float32"}
    assert check_kernels(CPU, torch.bfloat16).status == "FAIL"  # not what runs on a CPU


def test_kernel_check_fails_on_cuda_without_flash_attn(monkeypatch: pytest.MonkeyPatch) -> None:
    """The choice logic alone (no CUDA call): a CUDA device without flash_attn gets sdpa,
    which the GPU check must report as a failure, naming the fix."""
    real = gpu_check.importlib.util.find_spec
    monkeypatch.setattr(
        "models.loading.importlib.util.find_spec",
        lambda name, *a: None if name == "flash_attn" else real(name, *a),
    )
    result = check_kernels(torch.device("cuda"), torch.bfloat16)
    assert result.status == "FAIL" and "flash_attn is not installed" in result.detail


def test_lean_log_probs_equal_naive(model: Path) -> None:
    result = gpu_check.check_lean_naive(CPU, torch.float32, model)
    assert result.status == "ok", result.line()
    assert 0 <= result.data["max_abs"] <= gpu_check.LOGP_TOL[torch.float32]


def test_sleep_is_reported_as_skipped_on_cpu(model: Path) -> None:
    result = gpu_check.check_sleep(CPU, torch.float32, model)
    assert result.status == "skipped" and "CUDA only" in result.detail


def test_two_ranks_are_skipped_without_two_gpus(model: Path) -> None:
    result = gpu_check.check_two_ranks(CPU, torch.float32, model)
    assert result.status == "skipped" and "found 0" in result.detail


def test_a_crashing_or_failing_check_makes_the_exit_status_1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def crash(device: torch.device, dtype: torch.dtype) -> Check:
        raise RuntimeError("boom\nsecond line")

    def fine(device: torch.device, dtype: torch.dtype) -> Check:
        return Check("fine", "ok", "all good")

    results = run_checks([("crash", crash), ("fine", fine)], CPU, torch.float32, prefix="m/")
    assert [r.status for r in results] == ["FAIL", "ok"]
    assert capsys.readouterr().out.splitlines() == [
        "FAIL     m/crash: RuntimeError: boom",
        "ok       m/fine: all good",
    ]
    assert gpu_check.exit_code(results) == 1
    assert gpu_check.exit_code(results[1:]) == 0


def test_mismatch_statistics() -> None:
    trainer = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    stats = gpu_check.mismatch_stats([[-1.0, -2.5, float("nan")], [-0.4]], trainer)
    assert stats["tokens"] == 3
    assert stats["max_abs"] == pytest.approx(0.5) and stats["mean_abs"] == pytest.approx(0.2)
    assert stats["frac_over_0.1"] == pytest.approx(1 / 3)


@pytest.mark.vllm
@pytest.mark.parametrize("mode", ["merged", "adapter"])
def test_weight_sync_greedy_equality(model: Path, mode: str) -> None:
    pytest.importorskip("vllm")
    result = gpu_check.check_sync(CPU, torch.float32, model, mode)
    assert result.status == "ok", result.line()


@pytest.mark.vllm
def test_sampler_trainer_mismatch_is_small_in_float32(model: Path) -> None:
    pytest.importorskip("vllm")
    result = gpu_check.check_mismatch(CPU, torch.float32, model)
    assert result.status == "ok", result.line()
    assert result.data["tokens"] > 0
