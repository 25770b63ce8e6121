"""Every loss, advantage and correction variant trains end to end on the tiny model, and
dynamic sampling fills each batch with groups that carry signal (within its bound)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from grpo import distributed
from grpo.advantages import informative_groups
from grpo.metrics import Stopwatch
from grpo.trainer import build_trainer, collect, train_step
from models import BACKEND
from tests.training_helpers import small_config, write_ocr_jsonl

VARIANTS: list[dict[str, Any]] = [
    {"importance_sampling_level": "sequence"},
    {"importance_sampling_level": "sequence_token"},
    {"policy_loss": "cispo"},
    {"policy_loss": "sapo"},
    {"delta": 1.5, "epsilon_high": 0.28},
    {"clip_ratio_c": 3.0},
    {"kl_estimator": "k1"},
    {"kl_estimator": "k2"},
    {"kl_estimator": "low_var_kl"},
    {"kl_in_reward": True},
    {"kl_in_reward": True, "num_iterations": 2},
    {"entropy_coef": 0.01},
    {"top_entropy_quantile": 0.5},
    {"is_mode": "sequence_mask", "is_upper": 3.0},
    {"is_mode": "token_mask", "is_lower": 0.5, "is_upper": 2.0},
    {"importance_sampling_cap": 2.0},
    {"off_policy_delta": 0.1},
    {"reward_aggregation": "normalize_then_sum", "rewards": "test_text_hash:1.0,format:0.5"},
    {"rewards": "test_text_hash:1.0,overlong:0.5", "overlong_buffer": 2},
    {"dynamic_sampling": True},
    {
        "loss_type": "dapo",
        "gradient_accumulation_steps": 2,
        "is_mode": "sequence_truncate",
        "is_upper": 2.0,
    },
]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_ocr_jsonl(tmp_path_factory.mktemp("ocr"))


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(f"{k}={v[k]}" for k in v))
def test_variant_trains(variant: dict[str, Any], data_file: Path, tmp_path: Path) -> None:
    config = small_config(data_file, tmp_path / "run", **variant)
    trainer = build_trainer(config, distributed.init_distributed(), BACKEND)
    before = [p.detach().clone() for p in trainer.policy.trainable_parameters()]
    for _ in range(2):
        metrics, _ = train_step(trainer)
        assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])
    after = trainer.policy.trainable_parameters()
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_dynamic_sampling_fills_the_batch_with_informative_groups(
    data_file: Path, tmp_path: Path
) -> None:
    """Half of the prompts (even labels) always give equal rewards: every batch still holds
    prompts_per_step groups with spread, and it took more than one draw at least once."""
    config = small_config(
        data_file,
        tmp_path / "run",
        rewards="test_flat_for_even:1.0",
        prompts_per_step=3,
        dynamic_sampling=True,
        dynamic_sampling_max_draws=20,
    )
    trainer = build_trainer(config, distributed.init_distributed(), BACKEND)
    draws = []
    for _ in range(4):
        t = collect(
            trainer.policy,
            trainer.sampler,
            trainer.task,
            trainer.stream,
            trainer.reward_specs,
            config,
            Stopwatch(),
        )
        rewards = torch.tensor([r["reward"] for r in t.records])  # [P * G]
        assert informative_groups(rewards, config.num_generations).sum() == 3
        assert all(int(r["solution"][-1]) % 2 == 1 for r in t.records)
        draws.append(t.metrics["dynamic_sampling_draws"])
    assert max(draws) > 1


def test_dynamic_sampling_honours_its_bound(data_file: Path, tmp_path: Path) -> None:
    config = small_config(
        data_file,
        tmp_path / "run",
        rewards="test_constant:1.0",
        dynamic_sampling=True,
        dynamic_sampling_max_draws=3,
    )
    trainer = build_trainer(config, distributed.init_distributed(), BACKEND)
    with pytest.warns(UserWarning, match=r"0 of 2 groups with reward spread after 3 draws"):
        t = collect(
            trainer.policy,
            trainer.sampler,
            trainer.task,
            trainer.stream,
            trainer.reward_specs,
            config,
            Stopwatch(),
        )
    assert t.metrics["dynamic_sampling_draws"] == 3
    assert len(t.records) == config.prompts_per_step * config.num_generations
    assert trainer.stream.position.index == 3 * config.prompts_per_step % 8  # 3 draws of 2
