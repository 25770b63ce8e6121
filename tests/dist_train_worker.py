"""Run by test_trainer under torchrun: two training steps, then each rank dumps its LoRA."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import models  # noqa: F401
from grpo import distributed
from grpo.trainer import build_trainer, train_step
from models import BACKEND
from tests.launch import cleanup_checked
from tests.training_helpers import small_config


def lora_state(trainer) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().clone() for n, p in trainer.policy.model.named_parameters() if p.requires_grad
    }


def main(data: str, out: str) -> None:
    info = distributed.init_distributed()
    config = small_config(Path(data), Path(out) / "run")
    trainer = build_trainer(config, info, BACKEND)
    Path(out).mkdir(parents=True, exist_ok=True)
    torch.save(lora_state(trainer), Path(out) / f"lora-initial-rank{info.rank}.pt")
    records = []
    for _ in range(2):
        _, step_records = train_step(trainer)
        records.append(step_records[0]["where"])
    torch.save(lora_state(trainer), Path(out) / f"lora-rank{info.rank}.pt")
    with (Path(out) / "completions.json").open("a") as f:
        f.write(json.dumps(records) + "\n")
    distributed.barrier()
    cleanup_checked()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
