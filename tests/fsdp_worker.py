"""Run by tests/test_fsdp.py under torchrun: optimizer steps of an FSDP2-sharded policy on a
fixed global batch, checkpoints of the sharded run, and resumes on another world size.

The global batch is GLOBAL_TRAJECTORIES trajectories of fixed completions (no sampling), so
what is compared is the update maths: loss, backward, gradient averaging, clipping, AdamW.
World size w: rank r takes trajectories r, r + w, ...; one process takes them all as
gradient-accumulation batches, which is the same mean (update scales each by 1 / count).

    python fsdp_worker.py DATA OUT MODE STEPS [FLAG=VALUE ...]
    MODE: train   STEPS updates from the start, then dump the weights
          save    STEPS updates, a checkpoint, one more update, then SIGKILL (an unsaved step)
          resume  continue OUT's run from its checkpoint up to STEPS updates, dump the weights
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

import models  # noqa: F401
from grpo import distributed
from grpo.config import TrainConfig, coerce
from grpo.rollout import task_prompts
from grpo.trainer import Trainer, Trajectory, add_fixed_logprobs, build_trainer, resume, save
from grpo.trainer import update as update_step
from models import BACKEND
from models.sharding import is_dtensor
from tests.launch import cleanup_checked
from tests.training_helpers import small_config

GLOBAL_TRAJECTORIES = 2
PROMPTS, GROUP = 2, 4  # per trajectory


def fsdp_config(data: Path, out: Path, **overrides: object) -> TrainConfig:
    """The tiny model with LoRA, KL to the reference, a clip that bites, LR warmup."""
    settings: dict = dict(
        beta=0.04,
        max_grad_norm=0.05,
        warmup_steps=1,
        learning_rate=5e-3,
        max_steps=3,
        num_generations=GROUP,
        prompts_per_step=PROMPTS,
        sampler="hf",
        # one log-prob pass per trajectory on both sides, as a sharded policy takes: the
        # micro-batched sum (tests/test_prefix.py) rounds differently, and AdamW turns the
        # rounding noise of zero-gradient weights into steps of up to lr in float32
        logprob_group_batch=0,
    )
    settings.update(overrides)
    return small_config(data, out, **settings)


def fixed_completions(index: int, rows: int) -> list[list[int]]:
    """Deterministic completions of trajectory `index`: 2..6 ordinary tokens, some ending with
    <|im_end|> (a stop token), the others truncated."""
    gen = torch.Generator().manual_seed(1000 + index)
    out = []
    for row in range(rows):
        length = int(torch.randint(2, 7, (1,), generator=gen))
        ids = torch.randint(1000, 50000, (length,), generator=gen).tolist()
        if row % 2 == 0:
            ids[-1] = 151645
        out.append(ids)
    return out


def global_trajectory(trainer: Trainer, index: int) -> Trajectory:
    """Trajectory `index` of the global batch: fixed prompts, completions and advantages; the
    reference log-probs computed by the policy as collect() would."""
    policy, config = trainer.policy, trainer.config
    samples = trainer.stream.items[index * PROMPTS : (index + 1) * PROMPTS]
    encoded = policy.encode(task_prompts(policy, trainer.task, samples))
    batch = policy.rollout_batch(encoded, fixed_completions(index, PROMPTS * GROUP), GROUP)
    gen = torch.Generator().manual_seed(2000 + index)
    advantages = torch.randn(batch.num_rows, generator=gen)  # [N]
    t = batch.completion_mask.shape[1]
    sampler_logp = torch.full((batch.num_rows, t), float("nan"))  # [N, T] not reported
    trajectory = Trajectory(batch, advantages, policy.image_features(encoded), sampler_logp)
    add_fixed_logprobs(policy, trajectory, config)
    return trajectory


def my_trajectories(trainer: Trainer) -> list[Trajectory]:
    rank, world = distributed.get_rank(), distributed.get_world_size()
    return [global_trajectory(trainer, j) for j in range(GLOBAL_TRAJECTORIES) if j % world == rank]


def one_update(trainer: Trainer) -> float:
    """One optimizer step on this rank's part of the global batch; the global grad norm."""
    policy, config = trainer.policy, trainer.config
    stats = update_step(
        policy, trainer.optimizer, trainer.scheduler, my_trajectories(trainer), config
    )
    trainer.step += 1
    return stats.grad_norm


def trained_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The trainable tensors in full, by (peft) parameter name (rank 0; {} elsewhere)."""
    policy = trainer.policy
    if policy.sharded:
        from models.sharding import gathered_state

        return gathered_state(policy.root)
    return {n: p.detach().clone() for n, p in policy.model.named_parameters() if p.requires_grad}


def dump(trainer: Trainer, out: Path, record: dict[str, list], name: str) -> None:
    """OUT/NAME.pt (rank 0): the global grad norm and the full trained weights after each
    update this process ran."""
    if distributed.is_main_process():
        torch.save(record, out / f"{name}.pt")


def parse_overrides(items: list[str]) -> dict[str, object]:
    """FIELD=VALUE pairs, typed as TrainConfig's fields ("name" is the dump's name)."""
    out: dict[str, object] = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key] = value if key == "name" else coerce(key, value, "worker")
    return out


def main(data: str, out_dir: str, mode: str, steps: str, *flags: str) -> None:
    run(data, out_dir, mode, steps, *flags)
    cleanup_checked()  # after run(): its trainer, which holds the process group, is gone


def run(data: str, out_dir: str, mode: str, steps: str, *flags: str) -> None:
    info = distributed.init_distributed()
    out = Path(out_dir)
    overrides = parse_overrides(list(flags))
    name = str(overrides.pop("name", mode))
    config = fsdp_config(Path(data), out / "run", resume=mode == "resume", **overrides)
    trainer = build_trainer(config, info, BACKEND)
    record: dict[str, list] = {"grad_norms": [], "weights": []}
    if mode == "resume":
        resume(trainer)
    while trainer.step < int(steps):
        record["grad_norms"].append(one_update(trainer))
        record["weights"].append(trained_weights(trainer))
    if mode == "save":
        save(trainer)
        one_update(trainer)  # trained but never saved: the resume must not see it
        distributed.barrier()
        os.kill(os.getpid(), signal.SIGKILL)
    reference = getattr(trainer.policy, "reference", None)  # full fine-tuning's frozen copy
    if reference is not None:
        record["reference_sharded"] = [all(is_dtensor(p) for p in reference.parameters())]
    dump(trainer, out, record, name)
    distributed.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:])
