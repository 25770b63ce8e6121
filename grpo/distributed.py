"""torchrun / process-group helpers.

Every helper degrades to the single-process case: when no process group exists, collectives
return their input and barriers do nothing, so the same code runs under plain ``python`` and
under ``torchrun --nproc_per_node K``.

The collectives here carry statistics (reward sums, token counts), not gradients: they are not
differentiable.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None when single-process (no process group)


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise RuntimeError(
            f"WORLD_SIZE is set but environment variable {name} is not: launch with torchrun "
            "or set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT yourself"
        )
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(backend: str | None = None) -> DistInfo:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK).

    Without WORLD_SIZE this is a single process: no process group is created, the device is
    ``cuda:0`` when CUDA is available, else the CPU. ``backend`` defaults to "nccl" with CUDA and
    "gloo" without. Calling it again once the group exists only reports the existing group.
    """
    cuda = torch.cuda.is_available()
    if "WORLD_SIZE" not in os.environ:
        device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        return DistInfo(rank=0, world_size=1, local_rank=0, device=device, backend=None)

    rank, world_size, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if backend is None:
        backend = "nccl" if cuda else "gloo"
    # One GPU per process, chosen by LOCAL_RANK; set before NCCL creates its communicators.
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        _import_group_defaults()
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    backend = str(dist.get_backend())
    return DistInfo(rank, world_size, local_rank, device, backend)


def is_distributed() -> bool:
    """True when a process group is initialised (even of size one)."""
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    """Number of processes in the group; 1 without one."""
    return dist.get_world_size() if is_distributed() else 1


def get_rank() -> int:
    """Rank of this process; 0 without a process group."""
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    """True on rank 0, and always in a single process: the one that logs and saves."""
    return get_rank() == 0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over all ranks (a new tensor; ``t`` itself is unchanged and returned as is
    when not distributed)."""
    if not is_distributed():
        return t
    out = t.detach().clone()  # all_reduce works in place; keep the caller's tensor intact
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` along dim 0 across ranks, in rank order: [n, ...] -> [world * n, ...].

    Every rank must pass the same shape (same number of dims at least); a mismatch raises
    ValueError on all ranks (shapes are exchanged first, so no rank hangs or receives garbage).
    """
    if not is_distributed():
        return t
    world = dist.get_world_size()
    shape = torch.tensor(list(t.shape), dtype=torch.long, device=t.device)  # [ndim]
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    if any(not torch.equal(s, shape) for s in shapes):
        raise ValueError(
            f"all_gather_cat needs equal shapes on every rank, got {[s.tolist() for s in shapes]}"
        )
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.detach().contiguous())
    return torch.cat(parts, dim=0)


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (any picklable object), in rank order; ``[obj]`` alone."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return rank ``src``'s ``obj`` on every rank (any picklable object)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


_MESHES: list[Any] = []  # the device meshes made here, whose groups cleanup() lets go


def _import_group_defaults() -> None:
    """Import torch.distributed.nn.functional while no process group exists. Its functions'
    `group=group.WORLD` defaults are read at import, and torch.distributed.checkpoint imports
    it: imported later they would hold the group for the rest of the process (see cleanup)."""
    import torch.distributed.nn.functional  # noqa: F401


def cleanup() -> None:
    """Destroy the process group if there is one (vLLM's teardown may have done so) and free
    it now, while the interpreter is whole.

    Call it after the last collective, once the trainer is dropped (its FSDP state holds the
    group). destroy_process_group only forgets the group: the C++ object, and a gloo group's
    worker threads, live while anything refers to it. Freed in interpreter shutdown instead,
    a worker thread can drop its last tensor after the GIL is gone and abort a run that had
    finished (SIGABRT, "terminate called without an active exception"; seen in CI). Besides
    the trainer, torch keeps the group through the device meshes in DTensor's caches and
    torch.distributed.nn's defaults (`_import_group_defaults`).
    """
    if is_distributed():
        dist.destroy_process_group()
    # DTensor's caches keep every device mesh they met, and a mesh holds its groups
    for mesh in _MESHES:
        mesh._pg_registry.clear()
    _MESHES.clear()
    gc.collect()  # the trainer's reference cycles: the group goes with the last of them


def broadcast_tensor(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank `src`'s value of ``t`` on every rank (a new tensor; ``t`` is returned as is when
    not distributed)."""
    if not is_distributed():
        return t
    out = t.detach().clone().contiguous()
    dist.broadcast(out, src=src)
    return out


def device_mesh(info: DistInfo) -> Any:
    """The 1-D device mesh FSDP2 shards over: every rank of the job.

    A single process (no torchrun) gets a process group of one first, so `--fsdp` runs the
    same code on one GPU, and its checkpoints resume onto more ranks and back.
    """
    from torch.distributed.device_mesh import init_device_mesh

    if not is_distributed():
        backend = "nccl" if info.device.type == "cuda" else "gloo"
        _import_group_defaults()
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    mesh = init_device_mesh(info.device.type, (get_world_size(),))
    _MESHES.append(mesh)
    return mesh
