"""Run by tests/test_fsdp.py under torchrun: the whole loop, `train(config)`, with --fsdp on
the tiny model (sampling with the sharded policy's own weights in lock-step across ranks,
rewards, updates, checkpoints), or its resume with --resume.

    python fsdp_train_worker.py DATA OUT STEPS [resume]
"""

from __future__ import annotations

import sys
from pathlib import Path

import models  # noqa: F401
from grpo.trainer import train
from models import BACKEND
from tests.launch import cleanup_checked
from tests.training_helpers import small_config


def main(data: str, out: str, steps: str, *mode: str) -> None:
    config = small_config(
        Path(data),
        Path(out) / "run",
        fsdp=True,
        sampler="hf",
        max_steps=int(steps),
        save_steps=1,
        max_completion_length=8,
        resume=bool(mode),
        lr_scheduler="constant",  # the schedule must not depend on max_steps: 2 steps + 1 = 3
    )
    train(config, BACKEND)
    cleanup_checked()  # as train.py does


if __name__ == "__main__":
    main(*sys.argv[1:])
