"""GRPO learns an image-dependent task on the CPU, and only because it sees the image.

The task (tests/training_helpers.write_colour_script_data): a reddish image must be answered
with a token starting with a Latin letter, a bluish one with anything else; one-token answers.
A policy that ignores the image cannot beat 0.5 on average. The same run with the labels
shuffled against the images is the control: it must stay near 0.5.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from grpo.trainer import train
from models import BACKEND
from tests.training_helpers import script_feature_model, small_config, write_colour_script_data

STEPS = 30
START_STEPS, END_STEPS = 5, 5


def run(tmp_path: Path, model: Path, shuffle: bool, sampler: str = "hf") -> list[float]:
    data = write_colour_script_data(tmp_path / f"data-{shuffle}", shuffle_labels=shuffle)
    config = small_config(
        data,
        tmp_path / f"run-{shuffle}",
        model=str(model),
        rewards="script:1.0",
        max_steps=STEPS,
        prompts_per_step=8,
        num_generations=8,
        max_completion_length=1,
        learning_rate=3e-3,
        beta=0.0,
        lr_scheduler="constant",
        min_pixels=56 * 56,
        max_pixels=56 * 56,
        sampler=sampler,
    )
    run_dir = train(config, BACKEND)
    return [json.loads(line)["reward_mean"] for line in (run_dir / "metrics.jsonl").open()]


@pytest.mark.slow
def test_reward_rises_only_when_the_image_carries_the_answer(tmp_path: Path) -> None:
    model = script_feature_model(tmp_path / "model")
    learned = run(tmp_path, model, shuffle=False)
    control = run(tmp_path, model, shuffle=True)
    start = sum(learned[:START_STEPS]) / START_STEPS
    end = sum(learned[-END_STEPS:]) / END_STEPS
    control_end = sum(control[-END_STEPS:]) / END_STEPS
    assert 0.3 < start < 0.7, f"the untrained policy should be near chance, got {start:.2f}"
    assert end > start + 0.3 and end > 0.85, f"did not learn: {learned}"
    assert control_end < 0.7, f"learned without the image: {control}"


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_sampler_learns_like_the_transformers_one(tmp_path: Path) -> None:
    pytest.importorskip("vllm", exc_type=ImportError)
    model = script_feature_model(tmp_path / "model")
    learned = run(tmp_path, model, shuffle=False, sampler="vllm")
    start = sum(learned[:START_STEPS]) / START_STEPS
    end = sum(learned[-END_STEPS:]) / END_STEPS
    assert end > start + 0.3 and end > 0.85, f"did not learn with vLLM sampling: {learned}"
