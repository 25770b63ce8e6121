"""Small datasets and configs shared by the training tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from grpo.config import TrainConfig

PLUGIN = str(Path(__file__).parent / "plugins" / "training_rewards.py")


def write_ocr_jsonl(folder: Path, n: int = 8) -> Path:
    """n format-(a) samples with small images of different sizes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with (folder / "train.jsonl").open("w", encoding="utf-8") as f:
        for i in range(n):
            h, w = 28 + 14 * (i % 3), 56 + 28 * (i % 2)
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
            record = {"query": "<image>请识别图片中的文字", "response": f"文字{i}",
                      "image_path": f"{i}.png"}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return folder / "train.jsonl"


def small_config(data: Path, out: Path, **overrides: object) -> TrainConfig:
    """A config that runs a step in a few seconds on the tiny model."""
    settings: dict = dict(
        task="ocr", model="tiny", data=str(data), output_dir=str(out),
        rewards="test_text_hash:1.0", reward_plugin=[PLUGIN],
        max_steps=2, prompts_per_step=2, num_generations=4, max_completion_length=6,
        learning_rate=1e-3, beta=0.04, save_steps=0, log_completions_steps=0,
        tensorboard=False, lora_dropout=0.0, min_pixels=28 * 28, max_pixels=56 * 56,
    )
    settings.update(overrides)
    return TrainConfig(**settings)
