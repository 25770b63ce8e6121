"""The training loop end to end on the tiny model: a step, resume, torchrun, bad input."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from data.sample import DataError
from grpo import distributed
from grpo.config import load_config
from grpo.trainer import Trajectory, build_trainer, train, train_step, update
from models import BACKEND
from rewards.compute import RewardError
from tests.launch import ROOT, torchrun
from tests.training_helpers import (
    PLUGIN,
    fixed_trajectory,
    small_config,
    train_killed_then_resumed,
    write_ocr_jsonl,
)
from tests.vllm_helpers import image_prompts


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_ocr_jsonl(tmp_path_factory.mktemp("ocr"))


def adapter_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / "adapter" / "adapter_model.safetensors"))


def test_one_step_updates_lora_and_reports_metrics(data_file: Path, tmp_path: Path) -> None:
    config = small_config(data_file, tmp_path / "run")
    trainer = build_trainer(config, distributed.init_distributed(), BACKEND)
    before = [p.detach().clone() for p in trainer.policy.trainable_parameters()]
    frozen = {
        n: p.detach().clone()
        for n, p in trainer.policy.model.named_parameters()
        if not p.requires_grad and "embed" in n
    }
    metrics, records = train_step(trainer)
    after = trainer.policy.trainable_parameters()
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    for name, p in trainer.policy.model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), "a frozen weight moved"
    for key in (
        "loss",
        "kl",
        "entropy",
        "grad_norm",
        "reward_mean",
        "clip_frac",
        "completion_length_mean",
        "truncated_frac",
        "time/sample",
        "time/backward",
        "zero_std_group_frac",
        "completion_tokens_per_second",
        "lr",
    ):
        assert key in metrics and math.isfinite(metrics[key]), key
    assert metrics["grad_norm"] > 0
    assert len(records) == config.prompts_per_step * config.num_generations
    assert {"where", "completion", "reward", "advantage"} <= set(records[0])


def test_train_writes_checkpoint_metrics_and_plot(data_file: Path, tmp_path: Path) -> None:
    config = small_config(
        data_file, tmp_path / "run", save_steps=1, save_total_limit=1, log_completions_steps=1
    )
    run_dir = train(config, BACKEND)
    checkpoints = sorted(p.name for p in run_dir.iterdir() if p.name.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-2"]  # save_total_limit=1 removed checkpoint-1
    assert (run_dir / "checkpoint-2" / "adapter" / "adapter_config.json").is_file()
    info = json.loads((run_dir / "checkpoint-2" / "run.json").read_text())
    assert info["base_model"] == "tiny" and info["task"] == "ocr" and info["step"] == 2
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    assert (run_dir / "completions.jsonl").is_file()
    assert (run_dir / "reward_curve.png").stat().st_size > 1000
    assert (run_dir / "config.yaml").is_file()
    with pytest.raises(FileExistsError, match="--resume"):
        train(config, BACKEND)  # a second run into the same directory must not mix with the first


def test_resume_equals_uninterrupted(
    data_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    straight = small_config(
        data_file,
        tmp_path / "straight",
        max_steps=4,
        save_steps=2,
        num_iterations=2,
        warmup_steps=1,
    )
    train(straight, BACKEND)

    train_killed_then_resumed(straight, tmp_path / "killed", monkeypatch)

    a = adapter_weights(tmp_path / "straight" / "checkpoint-4")
    b = adapter_weights(tmp_path / "killed" / "checkpoint-4")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)
    steps = [json.loads(x)["step"] for x in (tmp_path / "killed" / "metrics.jsonl").open()]
    assert steps == [1, 2, 3, 4]


def test_torchrun_two_ranks_keep_identical_lora(data_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "dist"
    torchrun(ROOT / "tests" / "dist_train_worker.py", str(data_file), str(out), timeout=600)
    rank0 = torch.load(out / "lora-rank0.pt")
    rank1 = torch.load(out / "lora-rank1.pt")
    initial = torch.load(out / "lora-initial-rank0.pt")
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    assert any(not torch.equal(rank0[k], initial[k]) for k in rank0), "nothing was trained"
    completions = [json.loads(line) for line in (out / "completions.json").open()]
    assert completions[0] != completions[1], "both ranks sampled the same prompts"


def test_reward_that_raises_names_function_and_sample(data_file: Path, tmp_path: Path) -> None:
    config = small_config(data_file, tmp_path / "run", rewards="test_raises:1.0")
    trainer = build_trainer(config, distributed.init_distributed(), BACKEND)
    with pytest.raises(RewardError) as error:
        train_step(trainer)
    assert "test_raises" in str(error.value) and "train.jsonl:" in str(error.value)


def test_nan_reward_is_an_error_not_a_loss(data_file: Path, tmp_path: Path) -> None:
    config = small_config(data_file, tmp_path / "run", rewards="test_nan:1.0")
    trainer = build_trainer(config, distributed.init_distributed(), BACKEND)
    with pytest.raises(RewardError, match="test_nan"):
        train_step(trainer)


def test_prompt_over_max_length_is_an_error(data_file: Path, tmp_path: Path) -> None:
    config = small_config(data_file, tmp_path / "run", max_prompt_length=10)
    trainer = build_trainer(config, distributed.init_distributed(), BACKEND)
    with pytest.raises(DataError, match=r"train\.jsonl:\d+: prompt with 1 image"):
        train_step(trainer)


def test_cli_flags_override_preset_and_file(tmp_path: Path) -> None:
    file = tmp_path / "c.yaml"
    file.write_text("learning_rate: 0.5\nnum_generations: 3\n")
    config = load_config(
        [
            "--config",
            str(file),
            "--num-generations",
            "5",
            "--beta",
            "0",
            "--reward-plugin",
            PLUGIN,
            "--mask-truncated-completions",
        ]
    )
    assert (config.learning_rate, config.num_generations, config.beta) == (0.5, 5, 0.0)
    assert config.mask_truncated_completions is True and config.reward_plugin == [PLUGIN]
    with pytest.raises(ValueError, match="unknown config field"):
        file.write_text("learning_rat: 1\n")
        load_config(["--config", str(file)])
    with pytest.raises(ValueError, match="loss_type"):
        load_config(["--loss-type", "ppo"])


@pytest.mark.parametrize(
    "overrides",
    [
        {"mask_truncated_completions": True},  # 6 tokens: every completion is truncated
        {"skip_zero_std_groups": True, "rewards": "test_constant:1.0"},
    ],
    ids=["truncated", "zero-std"],
)
def test_rows_without_signal_leave_the_weights_alone(
    data_file: Path, tmp_path: Path, overrides: dict
) -> None:
    config = small_config(data_file, tmp_path / "run", **overrides)
    trainer = build_trainer(config, distributed.init_distributed(), BACKEND)
    before = [p.detach().clone() for p in trainer.policy.trainable_parameters()]
    metrics, _ = train_step(trainer)
    assert metrics["grad_norm"] == 0.0
    after = trainer.policy.trainable_parameters()
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_accumulated_generation_batches_train_with_every_loss(
    data_file: Path, tmp_path: Path, loss_type: str
) -> None:
    config = small_config(
        data_file,
        tmp_path / "run",
        loss_type=loss_type,
        gradient_accumulation_steps=2,
        scale_rewards="batch",
    )
    trainer = build_trainer(config, distributed.init_distributed(), BACKEND)
    metrics, records = train_step(trainer)
    assert math.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
    assert len(records) == 2 * config.prompts_per_step * config.num_generations


def test_resume_from_another_models_checkpoint_names_it(data_file: Path, tmp_path: Path) -> None:
    from models.tiny import TinySpec, tiny_model_path

    config = small_config(data_file, tmp_path / "run", max_steps=1, save_steps=1)
    train(config, BACKEND)
    other = TinySpec(hidden_size=32, num_heads=1, num_kv_heads=1, intermediate_size=64)
    resumed = replace(config, model=str(tiny_model_path(spec=other)), max_steps=2, resume=True)
    with pytest.raises(RuntimeError, match=r"checkpoint-1: the adapter does not fit this model"):
        train(resumed, BACKEND)


def test_visual_token_counts_are_printed_at_start_up(
    data_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The counts printed are those of the images as fitted to 28*28..56*56 pixels, computed
    here from the image files themselves."""
    from PIL import Image

    from grpo.rollout import visual_token_counts
    from models.processor import fitted_size

    config = small_config(data_file, tmp_path / "run")
    trainer = build_trainer(config, distributed.init_distributed(), BACKEND)
    printed = capsys.readouterr().out
    expected = []
    for line in data_file.read_text().splitlines():
        with Image.open(data_file.parent / json.loads(line)["image_path"]) as image:
            h, w = fitted_size(image.height, image.width, 28 * 28, 56 * 56)
        expected.append((h // 28) * (w // 28))
    counts = sorted(visual_token_counts(trainer.policy, trainer.stream.items))
    assert counts == sorted(expected)  # every sample counted (fewer than 1,000)
    assert f"min {min(expected)}, " in printed and f"max {max(expected)}" in printed


def hand_trajectory(trainer: Any, advantages: list[float]) -> Trajectory:
    """Two image prompts x G=2 fixed completions with the given advantages."""
    completions = [[11, 12, 13], [14, 15], [16], [17, 18, 19]]
    prompts = image_prompts(trainer.policy)[:2]
    return fixed_trajectory(trainer.policy, prompts, completions, advantages, trainer.config, 2)


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_a_batch_without_advantage_skips_its_pass_and_steps_as_if_it_ran(
    data_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, beta: float
) -> None:
    """An update with signal (AdamW's moments become non-zero), then one whose advantages are
    all zero: with beta 0 its pass is skipped, and the weights end bit-identical to running it
    (the zero gradient still decays the moments, so they move); with beta > 0 the KL term has
    a gradient, so the pass runs."""
    import grpo.trainer as trainer_module

    ends, skipped = [], []
    for forced in (False, True):
        config = small_config(data_file, tmp_path / f"run-{forced}", beta=beta)
        trainer = build_trainer(config, distributed.init_distributed(), BACKEND)
        params = trainer.policy.trainable_parameters()
        signal = hand_trajectory(trainer, [1.0, -1.0, 0.5, -0.5])
        update(trainer.policy, trainer.optimizer, trainer.scheduler, [signal], config)
        moved = [p.detach().clone() for p in params]
        if forced:
            monkeypatch.setattr(trainer_module, "has_gradient", lambda t, s: True)
        zero = hand_trajectory(trainer, [0.0, 0.0, 0.0, 0.0])
        stats = update(trainer.policy, trainer.optimizer, trainer.scheduler, [zero], config)
        monkeypatch.undo()
        skipped.append(stats.loss_stats["policy_passes_skipped"])
        ends.append([p.detach().clone() for p in params])
        assert not all(torch.equal(a, b) for a, b in zip(moved, ends[-1], strict=True))
    assert skipped == ([1.0, 0.0] if beta == 0 else [0.0, 0.0])
    assert all(torch.equal(a, b) for a, b in zip(*ends, strict=True))
