"""GRPO teaches the real SmolLM2-135M-Instruct the arith task on the CPU, and only because the
rewards carry the answer.

The run: the arith preset (configs/arith.yaml: 2 prompts x G=8 completions, LoRA r=16,
lr 2e-4) for STEPS steps with the transformers sampler. The control: the same run on the same
questions with the gold answers permuted across problems, so a completion's reward is
unrelated to its question; the policy can still learn a format (a box, a short answer), but not
to be right. The measure is the training reward of the real run (number + boxed_number, on
its own questions) against its start and against the control's.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from data.cache import cache_root
from data.tasks import get_task
from grpo.config import TrainConfig
from grpo.trainer import train
from models import BACKEND

STEPS = 12
START_STEPS, END_STEPS = 3, 3


def arith_data(folder: Path, shuffle: bool) -> Path:
    """The built-in arith training split; with `shuffle` its answers permuted across rows."""
    rows = get_task("arith").default_data(cache_root() / "data", "train").read_text().splitlines()
    samples = [json.loads(line) for line in rows if line.strip()]
    if shuffle:
        answers = [s["solution"] for s in samples]
        random.Random(0).shuffle(answers)
        samples = [{**s, "solution": a} for s, a in zip(samples, answers, strict=True)]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    return path


def run(tmp_path: Path, shuffle: bool) -> list[float]:
    config = TrainConfig(
        task="arith",
        model="smollm2",
        data=str(arith_data(tmp_path / f"data-{shuffle}", shuffle)),
        output_dir=str(tmp_path / f"run-{shuffle}"),
        prompts_per_step=2,
        num_generations=8,
        max_completion_length=48,
        learning_rate=2e-4,
        lr_scheduler="constant",
        lora_r=16,
        lora_alpha=32,
        beta=0.0,
        max_steps=STEPS,
        save_steps=0,
        log_completions_steps=0,
        tensorboard=False,
    )
    run_dir = train(config, BACKEND)
    return [json.loads(line)["reward_mean"] for line in (run_dir / "metrics.jsonl").open()]


@pytest.mark.slow
def test_smollm2_reward_rises_only_with_true_answers(tmp_path: Path) -> None:
    learned = run(tmp_path, shuffle=False)
    control = run(tmp_path, shuffle=True)
    start = sum(learned[:START_STEPS]) / START_STEPS
    end = sum(learned[-END_STEPS:]) / END_STEPS
    control_end = sum(control[-END_STEPS:]) / END_STEPS
    assert end > start + 0.3, f"did not learn: {learned}"
    assert end > control_end + 0.3, f"the shuffled control learned as much: {control}"
