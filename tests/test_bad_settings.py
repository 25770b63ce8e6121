"""Bad settings are caught before anything loads, with one line naming the field; a failed
start (--overwrite or --resume) leaves the old run on disk exactly as it was."""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

import grpo.trainer as trainer_module
import train as train_script
from grpo.config import ConfigError, load_config, to_yaml, validate
from grpo.trainer import train
from models import BACKEND
from tests.launch import ROOT
from tests.training_helpers import PLUGIN, small_config, write_ocr_jsonl


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_ocr_jsonl(tmp_path_factory.mktemp("ocr"))


def tree_state(folder: Path) -> dict[str, tuple[str, int]]:
    """Content hash and mtime of every file below `folder`: evidence that nothing changed."""
    return {
        str(p.relative_to(folder)): (
            hashlib.sha256(p.read_bytes()).hexdigest(),
            p.stat().st_mtime_ns,
        )
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


class NoModels:
    """A backend that fails the test if anything tries to load a model."""

    def load_policy(self, *args: object) -> None:
        raise AssertionError("a model was loaded before the settings were checked")

    make_sampler = load_policy


def fake_old_run(run_dir: Path) -> dict[str, tuple[str, int]]:
    (run_dir / "checkpoint-3" / "adapter").mkdir(parents=True)
    (run_dir / "checkpoint-3" / "adapter" / "w.safetensors").write_bytes(b"old weights")
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    (run_dir / "config.yaml").write_text("learning_rate: 0.1\n")
    return tree_state(run_dir)


# --- types and ranges ---------------------------------------------------------------------


def test_yaml_values_are_coerced_through_the_field_types(tmp_path: Path) -> None:
    file = tmp_path / "c.yaml"
    file.write_text(f"learning_rate: 1e-5\nmax_steps: '7'\nreward_plugin: {PLUGIN}\n")
    config = load_config(["--config", str(file)])
    assert config.learning_rate == 1e-5 and isinstance(config.learning_rate, float)
    assert config.max_steps == 7 and config.reward_plugin == [PLUGIN]


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("learning_rate: fast", ["learning_rate", "'fast'", "float", "c.yaml"]),
        ("max_steps: 2.5", ["max_steps", "2.5", "int"]),
        ("tensorboard: maybe", ["tensorboard", "'maybe'", "bool"]),
        ("reward_plugin: {a: 1}", ["reward_plugin", "list of strings"]),
        ("seed: 1\nmax_steps: 2: 3", ["c.yaml:2", "not valid YAML"]),
    ],
)
def test_a_value_of_the_wrong_type_names_field_value_and_file(
    tmp_path: Path, text: str, names: list[str]
) -> None:
    file = tmp_path / "c.yaml"
    file.write_text(text + "\n")
    with pytest.raises(ConfigError) as error:
        load_config(["--config", str(file)])
    for name in names:
        assert name in str(error.value)


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        ({"learning_rate": 0.0}, ["learning_rate", "0.0", "> 0"]),
        ({"max_completion_length": 0}, ["max_completion_length", ">= 1"]),
        ({"save_steps": -1}, ["save_steps", "-1", ">= 0"]),
        ({"top_p": 1.5}, ["top_p", "1.5", "(0, 1]"]),
        ({"top_k": -1}, ["top_k", ">= 0"]),
        ({"beta": -0.1}, ["beta", "-0.1"]),
        ({"epsilon_low": 1.5}, ["epsilon_low", "1.5"]),
        ({"min_pixels": 10_000, "max_pixels": 100}, ["min_pixels", "max_pixels"]),
        ({"num_generations": 1}, ["num_generations", ">= 2"]),
        ({"loss_type": "ppo"}, ["loss_type", "'ppo'", "dapo"]),
        ({"policy_loss": "x"}, ["policy_loss", "cispo"]),
        ({"kl_estimator": "k9"}, ["kl_estimator", "k3"]),
        ({"is_mode": "clip"}, ["is_mode", "token_truncate"]),
        ({"is_mode": "token_mask"}, ["is_mode", "is_upper"]),
        ({"importance_sampling_level": "doc"}, ["importance_sampling_level", "sequence"]),
        ({"reward_aggregation": "max"}, ["reward_aggregation", "normalize_then_sum"]),
        ({"sampler": "sglang"}, ["sampler", "vllm"]),
        ({"reward_plugin": "p.py"}, ["reward_plugin", "list of strings"]),
        ({"dtype": "bf16"}, ["dtype", "'bf16'", "bfloat16"]),
        ({"learning_rate": "1e-5"}, ["learning_rate", "'1e-5'", "float"]),
    ],
)
def test_a_value_out_of_range_names_field_value_and_rule(
    tmp_path: Path, overrides: dict, names: list[str]
) -> None:
    config = small_config(tmp_path / "d.jsonl", tmp_path / "run", **overrides)
    with pytest.raises(ConfigError) as error:
        validate(config)
    for name in names:
        assert name in str(error.value), str(error.value)


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        ({"data": "/no/such/train.jsonl"}, ["data", "/no/such/train.jsonl"]),
        ({"reward_plugin": ["/no/such/plugin.py"]}, ["reward_plugin", "/no/such/plugin.py"]),
        ({"rewards": "test_text_hash:1.0,no_such_reward:1"}, ["rewards", "no_such_reward"]),
        ({"top_p": 0.0}, ["top_p"]),
    ],
)
def test_inputs_are_checked_before_any_model_loads_and_nothing_is_written(
    data_file: Path, tmp_path: Path, overrides: dict, names: list[str]
) -> None:
    config = dataclasses.replace(small_config(data_file, tmp_path / "run"), **overrides)
    with pytest.raises(ConfigError) as error:
        train(config, NoModels())
    for name in names:
        assert name in str(error.value)
    assert not (tmp_path / "run").exists()


# --- train.py: one line, exit status, --debug -----------------------------------------------


def test_train_py_prints_one_line_and_exits_non_zero(tmp_path: Path) -> None:
    file = tmp_path / "c.yaml"
    file.write_text("learning_rate: fast\n")
    result = subprocess.run(
        [sys.executable, "train.py", "--config", str(file)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines == [f"error: {file}: learning_rate='fast': expected a float"], result.stderr


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    args = ["--output-dir", str(tmp_path / "run"), "--top-p", "0"]
    with pytest.raises(SystemExit, match=r"^error: top_p=0.0: must be in \(0, 1\]$"):
        train_script.main(args)
    with pytest.raises(ConfigError, match="top_p"):
        train_script.main([*args, "--debug"])


# --- the old run survives a failed start ------------------------------------------------------


def test_overwrite_that_fails_its_checks_leaves_the_old_run(
    data_file: Path, tmp_path: Path
) -> None:
    before = fake_old_run(tmp_path / "run")
    config = small_config(data_file, tmp_path / "run", overwrite=True, rewards="nope:1")
    with pytest.raises(ConfigError, match="nope"):
        train(config, NoModels())
    assert tree_state(tmp_path / "run") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_overwrite_restores_the_old_run_if_the_new_one_fails_before_saving(
    data_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = fake_old_run(tmp_path / "run")
    config = small_config(data_file, tmp_path / "run", overwrite=True, max_steps=1)

    def crash(trainer: object) -> None:
        raise RuntimeError("crash in step 1")

    monkeypatch.setattr(trainer_module, "train_step", crash)
    with pytest.raises(RuntimeError, match="crash in step 1"):
        train(config, BACKEND)
    assert tree_state(tmp_path / "run") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]

    monkeypatch.undo()  # now it succeeds: the old run is gone after the first checkpoint
    train(config, BACKEND)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert not (tmp_path / "run" / "checkpoint-3").exists()
    assert (tmp_path / "run" / "checkpoint-1").is_dir()
    assert (tmp_path / "run" / "config.yaml").read_text() == to_yaml(config)


def test_resume_keeps_config_yaml_and_records_its_flags_beside_it(
    data_file: Path, tmp_path: Path
) -> None:
    config = small_config(data_file, tmp_path / "run", max_steps=1)
    train(config, BACKEND)
    original = (tmp_path / "run" / "config.yaml").read_text()
    resumed = dataclasses.replace(config, resume=True, max_steps=2, learning_rate=5e-4)
    train(resumed, BACKEND)
    assert (tmp_path / "run" / "config.yaml").read_text() == original
    assert (tmp_path / "run" / "config.resume-1.yaml").read_text() == to_yaml(resumed)
