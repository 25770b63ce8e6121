"""FSDP2 (--fsdp) on two gloo ranks against one unsharded process, on the tiny Qwen2.5-VL.

What is compared: the trained tensors (the LoRA matrices, gathered in full) and the global
gradient norm after each of 3 optimizer steps on one fixed global batch (tests/fsdp_worker.py:
2 trajectories of fixed prompts, completions and advantages, reference log-probs at beta 0.04
computed by the policy itself, a grad clip that bites, LR warmup). Sampling is left out on
purpose, so the comparison is of the update maths: log-probs through the sharded blocks and
the root unit, loss, backward, the reduce-scatter's mean against our all-reduce's, clipping by
the global norm, AdamW on shards. The sharded run also uses gradient checkpointing, the
reference does not: equal numbers show both are the same maths.

Checkpoints: a sharded run killed (SIGKILL) after a saved step and one unsaved step resumes
from its torch.distributed.checkpoint state on 2 ranks, on 1, and a 1-process --fsdp run
resumes on 2; each continues to the same weights as the uninterrupted reference. The adapter
directory beside the sharded state is peft's format and holds the step's weights.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.launch import ROOT, torchrun
from tests.training_helpers import write_ocr_jsonl

WORKER = ROOT / "tests" / "fsdp_worker.py"
STEPS = 3
pytestmark = pytest.mark.slow


def single_process(*args: str) -> subprocess.CompletedProcess:
    """The worker as one plain process (no torchrun, no process group unless --fsdp)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, str(WORKER), *args], env=env, cwd=ROOT, capture_output=True, text=True
    )


def load(out: Path, name: str) -> dict[str, list]:
    return torch.load(out / f"{name}.pt")


def assert_same_training(got: dict[str, list], want: dict[str, list], first: int) -> None:
    """got's steps equal want's steps first, first + 1, ... in weights and grad norms."""
    assert len(got["weights"]) == len(want["weights"]) - first
    for k, weights in enumerate(got["weights"]):
        expected = want["weights"][first + k]
        assert sorted(weights) == sorted(expected)
        for name, tensor in expected.items():
            torch.testing.assert_close(
                weights[name], tensor, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
            )
    torch.testing.assert_close(
        torch.tensor(got["grad_norms"]), torch.tensor(want["grad_norms"][first:]), rtol=1e-5, atol=0
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_ocr_jsonl(tmp_path_factory.mktemp("fsdp-data")))


@pytest.fixture(scope="module")
def reference(data: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list]:
    """One unsharded process, the whole global batch as two accumulated trajectories."""
    out = tmp_path_factory.mktemp("single")
    result = single_process(data, str(out), "train", str(STEPS))
    assert result.returncode == 0, result.stderr[-3000:]
    return load(out, "train")


@pytest.fixture(scope="module")
def killed_run(data: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 sharded ranks: 1 step, checkpoint-1, a second step never saved, then SIGKILL."""
    out = tmp_path_factory.mktemp("killed")
    result = torchrun(WORKER, data, str(out), "save", "1", "fsdp=true", timeout=600, check=False)
    assert result.returncode != 0  # the workers killed themselves mid-run
    assert (out / "run" / "checkpoint-1" / "sharded" / ".metadata").is_file()
    return out


def test_reference_really_trains(reference: dict[str, list]) -> None:
    # Guards the comparisons: the LoRA B matrices (zero at init) moved, step after step.
    for weights in reference["weights"]:
        assert any(float(t.abs().max()) > 0 for n, t in weights.items() if "lora_B" in n)
    last, first = reference["weights"][-1], reference["weights"][0]
    assert any(not torch.equal(last[n], first[n]) for n in last)
    assert max(reference["grad_norms"]) > 0.05  # the clip at 0.05 acted


def test_sharded_steps_equal_single_process(data: str, tmp_path: Path) -> None:
    """With gradient checkpointing on both sides: it takes the padded log-prob pass (a
    recomputed block would extend a shared prefix cache twice), and the two sides must sum
    in the same layout, since AdamW turns rounding noise on ~0 gradients into steps."""
    flags = ("gradient_checkpointing=true",)
    result = single_process(data, str(tmp_path), "train", str(STEPS), *flags, "name=single")
    assert result.returncode == 0, result.stderr[-3000:]
    sharded = (*flags, "fsdp=true", "name=sharded")
    torchrun(WORKER, data, str(tmp_path), "train", str(STEPS), *sharded, timeout=600)
    assert_same_training(load(tmp_path, "sharded"), load(tmp_path, "single"), first=0)


def test_sharded_full_finetuning_equals_single_process(data: str, tmp_path: Path) -> None:
    """--lora-r 0: every language-model weight trains, the frozen reference copy is sharded
    too. float64: in float32 the reduction order's rounding noise on weights whose gradient
    is ~0 (most embedding rows) becomes Adam steps of up to lr, which no tolerance absorbs."""
    flags = ("lora_r=0", "dtype=float64")
    result = single_process(data, str(tmp_path), "train", str(STEPS), *flags, "name=single")
    assert result.returncode == 0, result.stderr[-3000:]
    sharded = (*flags, "fsdp=true", "gradient_checkpointing=true", "name=sharded")
    torchrun(WORKER, data, str(tmp_path), "train", str(STEPS), *sharded, timeout=900)
    single, got = load(tmp_path, "single"), load(tmp_path, "sharded")
    assert got["reference_sharded"] == [True] and single["reference_sharded"] == [False]
    embedding = next(n for n in single["weights"][0] if "embed_tokens" in n)  # trained here
    assert not torch.equal(single["weights"][0][embedding], single["weights"][-1][embedding])
    assert_same_training(got, single, first=0)


def test_kill_and_resume_equals_uninterrupted(data: str, killed_run: Path, reference: dict) -> None:
    out = killed_run.parent / "resume-2"
    shutil.copytree(killed_run, out)
    torchrun(WORKER, data, str(out), "resume", str(STEPS), "fsdp=true", timeout=600)
    assert_same_training(load(out, "resume"), reference, first=1)


def test_resume_two_ranks_onto_one(data: str, killed_run: Path, reference: dict) -> None:
    out = killed_run.parent / "resume-1"
    shutil.copytree(killed_run, out)
    torchrun(WORKER, data, str(out), "resume", str(STEPS), "fsdp=true", nproc=1, timeout=600)
    assert_same_training(load(out, "resume"), reference, first=1)


def test_resume_one_process_onto_two(data: str, reference: dict, tmp_path: Path) -> None:
    single_process(data, str(tmp_path), "save", "1", "fsdp=true")  # killed after its save
    assert (tmp_path / "run" / "checkpoint-1" / "sharded" / ".metadata").is_file()
    torchrun(WORKER, data, str(tmp_path), "resume", str(STEPS), "fsdp=true", timeout=600)
    assert_same_training(load(tmp_path, "resume"), reference, first=1)


def test_sharded_checkpoint_adapter_loads_in_peft(killed_run: Path, reference: dict) -> None:
    """checkpoint-1/adapter/, gathered from the shards, is a peft adapter of step 1's weights."""
    from grpo.types import PolicySettings
    from models import BACKEND

    adapter = killed_run / "run" / "checkpoint-1" / "adapter"
    policy = BACKEND.load_trained("tiny", adapter, PolicySettings(), torch.device("cpu"))
    loaded = {n: p for n, p in policy.model.named_parameters() if "lora_" in n}
    step1 = reference["weights"][0]
    assert sorted(loaded) == sorted(step1)
    for name, tensor in step1.items():
        torch.testing.assert_close(loaded[name].detach(), tensor, rtol=1e-5, atol=1e-6)


def test_whole_loop_with_fsdp_resumes_exactly(data: str, tmp_path: Path) -> None:
    """train() itself under --fsdp on 2 ranks: the sharded policy samples (in lock-step), is
    scored, updated and checkpointed every step. A run stopped after step 2 and resumed to 3
    ends with the same adapter, and logs the same rewards, as a run that went straight to 3."""
    from safetensors.torch import load_file

    worker = ROOT / "tests" / "fsdp_train_worker.py"
    stopped, straight = tmp_path / "stopped", tmp_path / "straight"
    torchrun(worker, data, str(stopped), "2", timeout=900)
    torchrun(worker, data, str(stopped), "3", "resume", timeout=900)
    torchrun(worker, data, str(straight), "3", timeout=900)

    def adapter(run: Path) -> dict[str, torch.Tensor]:
        return load_file(run / "run" / "checkpoint-3" / "adapter" / "adapter_model.safetensors")

    def rewards(run: Path) -> list[float]:
        lines = (run / "run" / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["reward_mean"] for line in lines if "reward_mean" in line]

    got, want = adapter(stopped), adapter(straight)
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6)
    assert rewards(stopped) == rewards(straight) and len(rewards(straight)) == 3
