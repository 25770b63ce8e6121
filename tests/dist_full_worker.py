"""Run by test_full_finetuning under torchrun (1 or 2 gloo processes): full fine-tuning
updates on one fixed global batch, each rank taking its share of the prompts; rank r writes
its trained weights to DIR/weights-world<W>-rank<r>.pt.

Usage: torchrun --nproc_per_node W tests/dist_full_worker.py DATA DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import grpo.trainer as trainer_module
import models  # noqa: F401
from grpo import distributed
from grpo.trainer import build_trainer, update
from models import BACKEND
from tests.launch import cleanup_checked
from tests.training_helpers import fixed_trajectory, small_config
from tests.vllm_helpers import image_prompts

GROUP, STEPS = 2, 2
# float64: a weight whose true gradient is 0 (a key bias: softmax ignores a shift shared by all
# keys) gets a rounding-noise gradient, which Adam's g / (sqrt(v) + eps) turns into a step of
# up to lr in float32 (noise ~1e-9 against eps 1e-8) but not in float64 (noise ~1e-17), so in
# float64 the two summation orders agree to rounding.
DTYPE = "float64"
BUCKET = 1 << 14  # elements per all-reduce: the tiny model's gradients in 7 buckets
# the global batch: 2 prompts x 2 completions, group-major, and their advantages
COMPLETIONS = [[11, 12, 13, 14], [15, 16], [17, 18, 19], [20, 21, 22, 23]]
ADVANTAGES = [1.0, -1.0, 0.5, -0.5]


def main(data: str, out: str) -> None:
    info = distributed.init_distributed()
    trainer_module.GRADIENT_BUCKET = BUCKET  # many all-reduces, not one
    world, rank = info.world_size, info.rank
    run = Path(out) / f"run-{world}"
    config = small_config(Path(data), run, lora_r=0, full=True, dtype=DTYPE)
    trainer = build_trainer(config, info, BACKEND)
    policy = trainer.policy
    prompts = image_prompts(policy)
    per_rank = len(prompts) // world
    mine = range(rank * per_rank, (rank + 1) * per_rank)  # whole groups on one rank
    rows = [j * GROUP + g for j in mine for g in range(GROUP)]
    for _ in range(STEPS):
        t = fixed_trajectory(
            policy,
            [prompts[j] for j in mine],
            [COMPLETIONS[i] for i in rows],
            [ADVANTAGES[i] for i in rows],
            config,
            GROUP,
        )
        update(policy, trainer.optimizer, trainer.scheduler, [t], config)
    weights = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    torch.save(weights, Path(out) / f"weights-world{world}-rank{rank}.pt")
    distributed.barrier()
    cleanup_checked()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
