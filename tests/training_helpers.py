"""Small datasets and configs shared by the training tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from grpo.config import TrainConfig
from grpo.trainer import Trajectory, add_fixed_logprobs

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
            record = {
                "query": "<image>请识别图片中的文字",
                "response": f"文字{i}",
                "image_path": f"{i}.png",
            }
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return folder / "train.jsonl"


def small_config(data: Path, out: Path, **overrides: object) -> TrainConfig:
    """A config that runs a step in a few seconds on the tiny model."""
    settings: dict = dict(
        task="ocr",
        model="tiny",
        data=str(data),
        output_dir=str(out),
        rewards="test_text_hash:1.0",
        reward_plugin=[PLUGIN],
        max_steps=2,
        prompts_per_step=2,
        num_generations=4,
        max_completion_length=6,
        learning_rate=1e-3,
        beta=0.04,
        save_steps=0,
        log_completions_steps=0,
        tensorboard=False,
        min_pixels=28 * 28,
        max_pixels=56 * 56,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def write_colour_script_data(folder: Path, n: int = 64, shuffle_labels: bool = False) -> Path:
    """The learning test's task: a reddish image asks for an answer starting with a Latin
    letter ("latin"), a bluish one for anything else ("other"). With `shuffle_labels` the
    labels are permuted against the images, so the image carries no information."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    labels = ["latin" if i % 2 == 0 else "other" for i in range(n)]
    colours = [(220, 30, 30) if label == "latin" else (30, 30, 220) for label in labels]
    if shuffle_labels:
        labels = [labels[i] for i in rng.permutation(n)]
    with (folder / "train.jsonl").open("w", encoding="utf-8") as f:
        for i, (label, colour) in enumerate(zip(labels, colours, strict=True)):
            noise = rng.integers(-20, 21, (56, 56, 3))
            pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
            record = {"query": "Answer.", "response": label, "image_path": f"{i}.png"}
            f.write(json.dumps(record) + "\n")
    return folder / "train.jsonl"


def script_feature_model(out: Path, strength: float = 0.3) -> Path:
    """The tiny model with one 'script' direction added to its token embeddings.

    A randomly initialised 64-wide model spreads probability over all 151,936 tokens and can
    move mass only one sampled token at a time. Here every token that starts with an ASCII
    letter gets +strength * u and every other token -strength * u (u a fixed unit vector), as a
    pretrained model's embeddings would encode the script: moving the last hidden state along
    u shifts mass between the two classes at once, so a policy can learn the task in tens of
    steps. The starting policy still picks each class about half of the time.
    """
    import torch
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from models.tiny import tiny_model_path

    source = tiny_model_path()
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(source)
    embeddings = model.get_input_embeddings().weight  # [V, H]
    u = torch.randn(embeddings.shape[1], generator=torch.Generator().manual_seed(1))
    u = u / u.norm()  # [H]
    first = [tokenizer.decode([i]).strip()[:1] for i in range(embeddings.shape[0])]
    sign = torch.tensor([1.0 if c.isascii() and c.isalpha() else -1.0 for c in first])  # [V]
    with torch.no_grad():
        embeddings += strength * sign[:, None] * u[None, :]
    model.save_pretrained(out)
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "processor_config.json",
        "generation_config.json",
    ):
        if (source / name).is_file():
            (out / name).write_bytes((source / name).read_bytes())
    return out


def train_killed_then_resumed(straight: TrainConfig, killed_dir: Path, monkeypatch) -> None:
    """Train `straight` into `killed_dir` as a run killed during step 3 (after checkpoint-2
    was written, before checkpoint-4), then resumed with --resume to the end."""
    from dataclasses import replace

    import pytest

    import grpo.trainer as trainer_module
    from grpo.trainer import train
    from models import BACKEND

    real_step, calls = trainer_module.train_step, []

    def killed_at_third_step(trainer):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(trainer)

    killed = replace(straight, output_dir=str(killed_dir))
    monkeypatch.setattr(trainer_module, "train_step", killed_at_third_step)
    with pytest.raises(KeyboardInterrupt):
        train(killed, BACKEND)
    monkeypatch.setattr(trainer_module, "train_step", real_step)
    assert not (killed_dir / "checkpoint-4").exists()
    train(replace(killed, resume=True), BACKEND)


def fixed_trajectory(
    policy: Any,
    prompts: list[Any],
    completions: list[list[int]],
    advantages: list[float],
    config: TrainConfig,
    group: int,
) -> Trajectory:
    """Given completions (group-major, `group` per prompt) with given advantages, as
    `collect` leaves them: the sampler's log-probs are the policy's own, fixed log-probs
    added."""
    encoded = policy.encode(prompts)
    batch = policy.rollout_batch(encoded, completions, group)
    features = policy.image_features(encoded)
    with torch.no_grad():
        sampler_logp = policy.logprobs(batch, config.temperature, image_features=features).logp
    t = Trajectory(batch, torch.tensor(advantages), features, sampler_logp)
    add_fixed_logprobs(policy, t, config)
    return t
