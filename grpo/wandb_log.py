"""Weights & Biases logging (--report-to wandb), optional and never in training's way.

wandb is an optional extra (`pip install -e ".[wandb]"`). `wandb.init` waits at most
WANDB_INIT_TIMEOUT seconds (default 30) for the service; when it cannot be reached the run logs
offline into <run>/wandb (upload it later with `wandb sync`), and if even that fails training
goes on without W&B, with a warning each time. WANDB_MODE=offline skips the service entirely.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any

TABLE_COLUMNS = [
    "step", "prompt", "image", "solution", "completion", "rewards", "reward", "advantage"
]  # fmt: skip


def start_wandb(run_dir: Path, config: Any) -> Any | None:
    """A wandb Run, or None (with a warning) when wandb is missing or cannot start."""
    try:
        import wandb
    except ImportError:
        warnings.warn(
            "report_to wandb: wandb is not installed (pip install -e '.[wandb]'); "
            "logging to JSONL and TensorBoard only",
            stacklevel=2,
        )
        return None
    timeout = float(os.environ.get("WANDB_INIT_TIMEOUT", "30"))
    kwargs = dict(
        project=config.wandb_project,
        name=run_dir.name,
        dir=str(run_dir),
        config=dataclasses.asdict(config),
        settings=wandb.Settings(init_timeout=timeout, silent=True, console="off"),
    )
    try:
        return wandb.init(**kwargs)
    except Exception as e:  # any failure to reach the service must not stop training
        message = f"W&B unreachable ({e!s:.200}); logging offline to {run_dir}/wandb"
        warnings.warn(message, stacklevel=2)
    try:
        return wandb.init(mode="offline", **kwargs)
    except Exception as e:
        message = f"W&B offline logging failed too ({e!s:.200}); going on without it"
        warnings.warn(message, stacklevel=2)
        return None


def completions_table(step: int, records: list[dict[str, Any]]) -> Any:
    """The step's completions as a wandb.Table (one row per completion)."""
    import wandb

    rows = [
        [step, r.get("prompt"), r.get("image"), r.get("solution"), r.get("completion"),
         str(r.get("rewards", {})), r.get("reward"), r.get("advantage")]
        for r in records
    ]  # fmt: skip
    return wandb.Table(columns=TABLE_COLUMNS, data=rows)
