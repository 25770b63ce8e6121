"""Metric reduction across ranks and the reward plot."""

from __future__ import annotations

import json
from pathlib import Path

from grpo.metrics import MetricsLogger, plot_rewards, read_metrics
from tests.launch import ROOT, torchrun


def test_reduce_metrics_over_two_ranks_with_missing_keys_and_nan(tmp_path: Path) -> None:
    out = tmp_path / "reduced"
    torchrun(ROOT / "tests" / "dist_metrics_worker.py", str(out))
    ranks = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    expected = {"reward_mean": 1.5, "length_max": 1.0, "length_min": 0.0, "kl": 0.5, "loss": 3.0}
    assert ranks[0] == expected


def test_logger_writes_jsonl_and_plot(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path, enabled=True, tensorboard=False)
    for step in range(1, 21):
        logger.log(step, {"reward_mean": step / 20, "reward/ocr_mean": step / 40})
    logger.close()
    assert [row["step"] for row in read_metrics(tmp_path)] == list(range(1, 21))
    plot = plot_rewards(tmp_path)
    assert plot is not None and plot.stat().st_size > 1000
    assert plot_rewards(tmp_path / "empty") is None
