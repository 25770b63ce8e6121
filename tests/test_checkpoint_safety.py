"""Checkpoints that cannot mislead: a manifest per checkpoint, data-only state files, resume
after kill -9 at random moments or from damaged files, logs without a step twice."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from grpo.checkpoint import (
    CheckpointError,
    latest_valid_checkpoint,
    manifest_problem,
    write_manifest,
)
from grpo.config import TrainConfig, to_yaml
from grpo.metrics import cut_logs_back
from grpo.trainer import train
from models import BACKEND
from tests.launch import ROOT
from tests.training_helpers import small_config, write_ocr_jsonl

ADAPTER = Path("adapter") / "adapter_model.safetensors"


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_ocr_jsonl(tmp_path_factory.mktemp("ocr"))


def reference_config(data_file: Path, out: Path) -> TrainConfig:
    """Frequent saves, every checkpoint kept, a short run."""
    return small_config(
        data_file, out, max_steps=4, save_steps=1, save_total_limit=None, warmup_steps=1
    )


@pytest.fixture(scope="module")
def reference_run(data_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run: the adapter every interrupted run must reproduce bit for bit."""
    return train(reference_config(data_file, tmp_path_factory.mktemp("ref") / "run"), BACKEND)


def assert_same_adapter(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / ADAPTER)), load_file(str(b / ADAPTER))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def logged_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").open()]


# --- the manifest -----------------------------------------------------------------------------


def test_manifest_names_a_missing_resized_or_changed_file(tmp_path: Path) -> None:
    (tmp_path / "adapter").mkdir()
    (tmp_path / ADAPTER).write_bytes(b"0123456789")
    (tmp_path / "run.json").write_text("{}")
    write_manifest(tmp_path)
    assert manifest_problem(tmp_path) is None
    (tmp_path / ADAPTER).write_bytes(b"0123456780")  # same size, other content
    assert "adapter_model.safetensors does not match its sha256" in manifest_problem(tmp_path)
    (tmp_path / ADAPTER).write_bytes(b"01234")
    assert "has 5 bytes, the manifest says 10" in manifest_problem(tmp_path)
    (tmp_path / "run.json").unlink()
    (tmp_path / ADAPTER).write_bytes(b"0123456789")
    assert manifest_problem(tmp_path) == "run.json is missing"


def test_cut_logs_back_drops_later_steps_and_a_torn_line(tmp_path: Path) -> None:
    rows = "".join(json.dumps({"step": s, "x": 1}) + "\n" for s in (1, 2, 3))
    (tmp_path / "metrics.jsonl").write_text(rows + '{"step": 4, "x"')
    (tmp_path / "completions.jsonl").write_text(rows)
    cut_logs_back(tmp_path, 2)
    assert logged_steps(tmp_path) == [1, 2]
    steps = [json.loads(x)["step"] for x in (tmp_path / "completions.jsonl").open()]
    assert steps == [1, 2]


# --- state files are data ---------------------------------------------------------------------


class Payload:
    """Unpickling this calls open(marker, "w"): stands for any code a pickle can run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def test_a_pickle_that_would_run_code_is_refused_and_not_run(
    data_file: Path, tmp_path: Path, reference_run: Path
) -> None:
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir)
    checkpoint = run_dir / "checkpoint-4"
    marker = tmp_path / "pwned"
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    torch.save({**state, "extra": Payload(marker)}, checkpoint / "trainer_state.pt")
    write_manifest(checkpoint)  # a crafted checkpoint would carry a matching manifest
    config_yaml = (run_dir / "config.yaml").read_bytes()
    config = dataclasses.replace(reference_config(data_file, run_dir), resume=True, max_steps=5)
    with pytest.raises(CheckpointError) as error:
        train(config, BACKEND)
    assert str(checkpoint / "trainer_state.pt") in str(error.value)
    assert "refused" in str(error.value)
    assert not marker.exists(), "the pickle ran"
    assert (run_dir / "config.yaml").read_bytes() == config_yaml
    assert not list(run_dir.glob("config.resume-*"))


# --- resume from damaged checkpoints and after kill -9 ----------------------------------------


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(
    data_file: Path, tmp_path: Path, reference_run: Path
) -> None:
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir)
    adapter = run_dir / "checkpoint-4" / ADAPTER
    adapter.write_bytes(adapter.read_bytes()[:100])  # truncated
    with pytest.warns(UserWarning, match=r"checkpoint-4: adapter.* bytes"):
        assert latest_valid_checkpoint(run_dir) == run_dir / "checkpoint-3"
    config = dataclasses.replace(reference_config(data_file, run_dir), resume=True)
    with pytest.warns(UserWarning, match=str(run_dir / "checkpoint-4")):
        train(config, BACKEND)
    assert_same_adapter(reference_run / "checkpoint-4", run_dir / "checkpoint-4")
    assert logged_steps(run_dir) == [1, 2, 3, 4]


def start(config_file: Path, *flags: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "train.py", "--config", str(config_file), *flags],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def step_seconds(run_dir: Path) -> float:
    """How long one step and its save took in a run that saved every step: the time between
    its first two checkpoints' manifests (each written last, when its checkpoint is whole)."""
    first, second = (run_dir / f"checkpoint-{k}" / "manifest.json" for k in (1, 2))
    return second.stat().st_mtime - first.stat().st_mtime


def kill_after_a_new_checkpoint(
    process: subprocess.Popen, run_dir: Path, rng: random.Random, window: float
) -> bool:
    """SIGKILL `process` a random moment within `window` seconds after it wrote a checkpoint
    newer than the ones there now (so a resume always has one); returns whether it finished
    first."""
    before = {p.name for p in run_dir.glob("checkpoint-*")}
    deadline = time.monotonic() + 300
    while {p.name for p in run_dir.glob("checkpoint-*")} <= before:
        if process.poll() is not None:
            return True
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, window))  # anywhere in the next step, its log or its save
    if process.poll() is not None:
        return True
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    return False


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_equals_uninterrupted(
    data_file: Path, tmp_path: Path, reference_run: Path
) -> None:
    seed = random.SystemRandom().randrange(1 << 30)  # pytest may seed `random` per test
    print(f"kill moments seeded with {seed}")  # to replay a failure
    rng = random.Random(seed)
    run_dir = tmp_path / "run"
    config_file = tmp_path / "config.yaml"
    config_file.write_text(to_yaml(reference_config(data_file, run_dir)))
    # one step of the uninterrupted run on this machine, not a fixed time: a fixed 2.5 s let a
    # fast machine finish the remaining steps before the kill came
    window = step_seconds(reference_run)
    print(f"kills within {window:.2f} s of a checkpoint")
    process, kills = start(config_file), 0
    for _ in range(2):
        if kill_after_a_new_checkpoint(process, run_dir, rng, window):
            break
        kills += 1
        process = start(config_file, "--resume")
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    assert kills >= 1, "the run finished before any kill"
    assert_same_adapter(reference_run / "checkpoint-4", run_dir / "checkpoint-4")
    assert logged_steps(run_dir) == [1, 2, 3, 4]
