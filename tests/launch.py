"""Running a worker script under torchrun on this machine (gloo, loopback only)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(
    script: Path, *args: str, nproc: int = 2, timeout: int = 300, check: bool = True
) -> subprocess.CompletedProcess:
    """Run `script args` on `nproc` local processes; fail the test with their output if any
    process fails (unless `check` is False: a worker that kills itself on purpose). The
    repository root is importable in the workers."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    env.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    # a rank that aborts (SIGABRT, SIGSEGV) prints its Python threads' stacks: once in CI a
    # rank died of "terminate called without an active exception" and nothing said where
    env.update(PYTHONFAULTHANDLER="1")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(script),
        *args,
    ]
    result = subprocess.run(
        command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + failure_part(result.stderr)
    return result


def failure_part(stderr: str, size: int = 6000) -> str:
    """The part of the ranks' stderr that says why: from the first fatal error's stack dump
    (torchrun's own traceback follows it), else the tail."""
    start = stderr.find("Fatal Python error")
    return stderr[start : start + size] if start >= 0 else stderr[-size:]


def cleanup_checked() -> None:
    """A worker's last call: grpo.distributed.cleanup(), then fail unless the process group
    is freed by it. A group that outlives it dies in interpreter shutdown, where a gloo worker
    thread can abort the process after the work is done (two CI runs lost a rank that way)."""
    import weakref

    import torch.distributed as dist

    from grpo import distributed

    world = weakref.ref(dist.group.WORLD) if dist.is_initialized() else None
    distributed.cleanup()
    if world is not None and world() is not None:
        raise AssertionError("the process group outlived grpo.distributed.cleanup()")
