"""Batch-scaled advantages and the dapo loss under torch.distributed (two gloo processes) equal
the single-process computation on the concatenated batch; grpo.distributed helpers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from grpo import distributed as gd
from grpo.advantages import SCALES, aggregate_rewards, group_advantages
from grpo.loss import LossSettings, entropy_threshold, grpo_loss
from grpo.sampler_correction import importance_weights, off_policy_sequence_mask
from tests.dist_maths_worker import SEQ_MASK, TOP_ENTROPY
from tests.launch import torchrun

WORKER = Path(__file__).resolve().with_name("dist_maths_worker.py")
WORLD, GROUP, PROMPTS, T = 2, 3, 4, 6
F64 = torch.float64


def global_batch() -> dict[str, torch.Tensor | int]:
    """12 rows; rank 0's completions are long and rank 1's short, so token counts differ."""
    gen = torch.Generator().manual_seed(0)
    n = PROMPTS * GROUP
    logp = -torch.rand(n, T, generator=gen, dtype=F64) * 3
    rewards = torch.randn(n, generator=gen, dtype=F64)
    rewards[7] = float("nan")
    rewards[9:12] = 0.5  # an all-equal group on rank 1
    lengths = torch.tensor([6, 5, 6, 4, 6, 5, 1, 2, 0, 3, 1, 2])
    per_function = torch.randn(n, 3, generator=gen, dtype=F64) * torch.tensor(
        [1.0, 5.0, 0.2], dtype=F64
    )
    per_function[2, 1] = per_function[10, 0] = float("nan")
    return {
        "group_size": GROUP,
        "rewards": rewards,
        "logp": logp,
        "old_logp": logp + 0.3 * torch.randn(n, T, generator=gen, dtype=F64),
        "ref_logp": logp + 0.3 * torch.randn(n, T, generator=gen, dtype=F64),
        "advantages": torch.randn(n, generator=gen, dtype=F64),
        "mask": (torch.arange(T)[None, :] < lengths[:, None]).to(F64),
        "is_weights": torch.rand(n, T, generator=gen, dtype=F64) + 0.5,
        # rank 1's entropies are lower, so a rank-local quantile would differ from the global one
        "entropy": torch.rand(n, T, generator=gen, dtype=F64)
        * torch.tensor([3.0] * 6 + [1.0] * 6, dtype=F64)[:, None],
        "per_function": per_function,
        "weights": torch.tensor([1.0, 0.5, 2.0], dtype=F64),
        "sampler_logp": logp + 0.15 * torch.randn(n, T, generator=gen, dtype=F64),
    }


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Run the worker once under torchrun and load what each rank wrote."""
    out = tmp_path_factory.mktemp("dist")
    torch.save(global_batch(), out / "batch.pt")
    torchrun(WORKER, str(out), nproc=WORLD, timeout=120)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("scale", SCALES)
def test_advantages_equal_single_process(ranks: list[dict], scale: str) -> None:
    b = global_batch()
    single = group_advantages(b["rewards"], GROUP, scale)
    for result in ranks:  # all_gather_cat gives every rank the whole batch, in rank order
        torch.testing.assert_close(
            result[f"adv_{scale}"], single, rtol=1e-12, atol=0, equal_nan=True
        )


def test_batch_scale_really_is_global(ranks: list[dict]) -> None:
    # Guards the test above: each half's own batch std differs from the global one.
    b = global_batch()
    half = group_advantages(b["rewards"][:6], GROUP, "batch")
    assert not torch.allclose(half, ranks[0]["adv_batch"][:6])


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_loss_and_gradient_equal_single_process(ranks: list[dict], loss_type: str) -> None:
    """The mean of the per-rank losses is the global loss; with DDP's gradient averaging each
    rank's gradient / world size is the global gradient of its rows."""
    b = global_batch()
    logp = b["logp"].clone().requires_grad_(True)
    settings = LossSettings(beta=0.04, eps_high=0.28, loss_type=loss_type)
    args = (b["old_logp"], b["ref_logp"], b["advantages"], b["mask"], settings)
    loss, _ = grpo_loss(logp, *args, is_weights=b["is_weights"])
    loss.backward()
    mean_loss = sum(r[f"loss_{loss_type}"] for r in ranks) / WORLD
    torch.testing.assert_close(mean_loss, loss.detach(), rtol=1e-12, atol=0)
    grads = torch.cat([r[f"grad_{loss_type}"] for r in ranks]) / WORLD
    torch.testing.assert_close(grads, logp.grad, rtol=1e-12, atol=0)


def test_dapo_token_count_is_global(ranks: list[dict]) -> None:
    total = global_batch()["mask"].sum()
    assert all(r["num_items"] == total for r in ranks)
    # Guards the dapo test: the ranks' token counts differ, so a local mean would not match.
    assert global_batch()["mask"][:6].sum() != global_batch()["mask"][6:].sum()


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_top_entropy_mask_equals_single_process(ranks: list[dict], loss_type: str) -> None:
    """The entropy threshold is a quantile over all ranks' tokens: the two-rank loss, gradients
    (logp and entropy) and threshold equal one process on the concatenated batch."""
    b = global_batch()
    logp = b["logp"].clone().requires_grad_(True)
    entropy = b["entropy"].clone().requires_grad_(True)
    args = (logp, b["old_logp"], b["ref_logp"], b["advantages"], b["mask"])
    settings = LossSettings(loss_type=loss_type, **TOP_ENTROPY)
    loss, stats = grpo_loss(*args, settings, entropy=entropy)
    loss.backward()
    results = [r[f"top_entropy_{loss_type}"] for r in ranks]
    torch.testing.assert_close(
        sum(r[0] for r in results) / WORLD, loss.detach(), rtol=1e-12, atol=0
    )
    grads = torch.cat([r[1] for r in results]) / WORLD
    torch.testing.assert_close(grads, logp.grad, rtol=1e-12, atol=0)
    torch.testing.assert_close(
        torch.cat([r[2] for r in results]) / WORLD, entropy.grad, rtol=1e-12, atol=0
    )
    for r in results:
        assert r[3] == stats["entropy_threshold"]
    # Guards: each rank's own quantile differs from the global one.
    for half in (slice(0, 6), slice(6, 12)):
        local = entropy_threshold(
            b["entropy"][half], b["mask"][half], TOP_ENTROPY["top_entropy_quantile"]
        )
        assert local != stats["entropy_threshold"]


def test_gdpo_then_batch_advantages_equal_single_process(ranks: list[dict]) -> None:
    b = global_batch()
    rewards = aggregate_rewards(b["per_function"], b["weights"], GROUP, "normalize_then_sum")
    single = group_advantages(rewards, GROUP, "batch")
    for result in ranks:
        torch.testing.assert_close(result["gdpo_adv"], single, rtol=1e-12, atol=0, equal_nan=True)


def test_sequence_masks_with_dapo_equal_single_process(ranks: list[dict]) -> None:
    b = global_batch()
    weights, metrics = importance_weights(
        b["old_logp"],
        b["sampler_logp"],
        b["mask"],
        "sequence_mask",
        SEQ_MASK["lower"],
        SEQ_MASK["upper"],
    )
    keep, opsm = off_policy_sequence_mask(
        b["logp"], b["sampler_logp"], b["advantages"], b["mask"], SEQ_MASK["delta"]
    )
    logp = b["logp"].clone().requires_grad_(True)
    args = (logp, b["old_logp"], b["ref_logp"], b["advantages"], b["mask"])
    loss, _ = grpo_loss(*args, LossSettings(loss_type="dapo"), is_weights=weights * keep[:, None])
    loss.backward()
    results = [r["seq_mask_dapo"] for r in ranks]
    torch.testing.assert_close(
        sum(r[0] for r in results) / WORLD, loss.detach(), rtol=1e-12, atol=0
    )
    torch.testing.assert_close(
        torch.cat([r[1] for r in results]) / WORLD, logp.grad, rtol=1e-12, atol=0
    )
    counts = torch.stack([metrics["is_high"] + metrics["is_low"], opsm["opsm_dropped"]])
    for r in results:
        torch.testing.assert_close(r[2], counts)
    # Guards: both rules dropped something, and not everything.
    assert counts[0] > 0 and counts[1] > 0 and (weights * keep[:, None]).sum() > 0


def test_helpers_under_torchrun(ranks: list[dict]) -> None:
    for rank, result in enumerate(ranks):
        assert result["info"] == (rank, WORLD, rank, "gloo")
        assert result["is_distributed"] and result["is_main"] == (rank == 0)
        assert result["broadcast"] == {"from": 1, "payload": [1, 1, 1]}
        assert "equal shapes" in result["unequal_gather"]


def test_single_process_helpers(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = gd.init_distributed()
    assert (info.rank, info.world_size, info.local_rank, info.backend) == (0, 1, 0, None)
    assert not dist.is_initialized() and not gd.is_distributed()
    assert gd.is_main_process() and gd.get_world_size() == 1 and gd.get_rank() == 0
    t = torch.arange(3.0)
    assert gd.all_reduce_sum(t) is t and gd.all_gather_cat(t) is t
    obj = {"a": 1}
    assert gd.broadcast_object(obj) is obj
    gd.barrier()
    gd.cleanup()


def test_missing_rank_variable_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(RuntimeError, match="RANK"):
        gd.init_distributed()
