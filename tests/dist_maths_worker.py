"""Worker for tests/test_distributed_maths.py, launched as two gloo processes by torchrun.

Usage: torchrun --nproc_per_node 2 tests/dist_maths_worker.py DIR
Reads DIR/batch.pt (the global batch), computes on this rank's share of the groups, and writes
DIR/rank{r}.pt for the test to compare with the single-process computation.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from grpo import distributed as gd
from grpo.advantages import SCALES, aggregate_rewards, group_advantages
from grpo.loss import LOSS_TYPES, LossSettings, grpo_loss
from grpo.sampler_correction import importance_weights, off_policy_sequence_mask

# The batch-wide variants, with the settings tests/test_distributed_maths.py repeats.
TOP_ENTROPY = {"top_entropy_quantile": 0.3, "entropy_coef": 0.02, "beta": 0.04, "eps_high": 0.28}
SEQ_MASK = {"lower": 0.5, "upper": 1.5, "delta": 0.05}


def shard(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rows of this rank: contiguous, so whole groups stay on one rank."""
    per_rank = t.shape[0] // world
    return t[rank * per_rank : (rank + 1) * per_rank]


def main(out_dir: Path) -> None:
    info = gd.init_distributed()
    rank, world = info.rank, info.world_size
    full = torch.load(out_dir / "batch.pt")
    mine = {k: shard(v, rank, world) for k, v in full.items() if torch.is_tensor(v)}
    out: dict[str, object] = {"info": (info.rank, info.world_size, info.local_rank, info.backend)}
    out["is_distributed"], out["is_main"] = gd.is_distributed(), gd.is_main_process()

    for scale in SCALES:
        adv = group_advantages(mine["rewards"], full["group_size"], scale)
        out[f"adv_{scale}"] = gd.all_gather_cat(adv)

    num_items = gd.all_reduce_sum(mine["mask"].sum())
    out["num_items"] = num_items
    for loss_type in LOSS_TYPES:
        logp = mine["logp"].clone().requires_grad_(True)
        loss, _ = grpo_loss(
            logp,
            mine["old_logp"],
            mine["ref_logp"],
            mine["advantages"],
            mine["mask"],
            LossSettings(beta=0.04, eps_high=0.28, loss_type=loss_type),
            num_items=num_items if loss_type == "dapo" else None,
            is_weights=mine["is_weights"],
        )
        loss.backward()
        out[f"loss_{loss_type}"], out[f"grad_{loss_type}"] = loss.detach(), logp.grad

    variants(mine, full, num_items, out)
    out["broadcast"] = gd.broadcast_object({"from": rank, "payload": [rank] * 3}, src=1)
    try:
        gd.all_gather_cat(torch.zeros(rank + 1))
        out["unequal_gather"] = "no error"
    except ValueError as err:
        out["unequal_gather"] = str(err)
    gd.barrier()
    torch.save(out, out_dir / f"rank{rank}.pt")
    gd.cleanup()
    assert not gd.is_distributed(), "cleanup() left the process group alive"


def variants(mine: dict, full: dict, num_items: torch.Tensor, out: dict[str, object]) -> None:
    """Top-entropy mask (all-rank quantile), GDPO + batch advantages, sequence masks + dapo."""
    g = full["group_size"]
    for loss_type in ("dapo", "grpo"):
        logp = mine["logp"].clone().requires_grad_(True)
        entropy = mine["entropy"].clone().requires_grad_(True)
        settings = LossSettings(loss_type=loss_type, **TOP_ENTROPY)
        args = (logp, mine["old_logp"], mine["ref_logp"], mine["advantages"], mine["mask"])
        loss, stats = grpo_loss(*args, settings, num_items=num_items, entropy=entropy)
        loss.backward()
        key = f"top_entropy_{loss_type}"
        out[key] = (loss.detach(), logp.grad, entropy.grad, stats["entropy_threshold"])

    rewards = aggregate_rewards(mine["per_function"], full["weights"], g, "normalize_then_sum")
    out["gdpo_adv"] = gd.all_gather_cat(group_advantages(rewards, g, "batch"))

    weights, metrics = importance_weights(
        mine["old_logp"], mine["sampler_logp"], mine["mask"], "sequence_mask",
        SEQ_MASK["lower"], SEQ_MASK["upper"],
    )  # fmt: skip
    keep, opsm = off_policy_sequence_mask(
        mine["logp"], mine["sampler_logp"], mine["advantages"], mine["mask"], SEQ_MASK["delta"]
    )
    logp = mine["logp"].clone().requires_grad_(True)
    args = (logp, mine["old_logp"], mine["ref_logp"], mine["advantages"], mine["mask"])
    w = weights * keep[:, None]  # [N, T]
    loss, _ = grpo_loss(*args, LossSettings(loss_type="dapo"), num_items=num_items, is_weights=w)
    loss.backward()
    counts = torch.stack([metrics["is_high"] + metrics["is_low"], opsm["opsm_dropped"]])  # [2]
    out["seq_mask_dapo"] = (loss.detach(), logp.grad, gd.all_reduce_sum(counts))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
