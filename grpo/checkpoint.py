"""Checkpoints: save atomically, find the latest, resume exactly.

Layout of `run_dir/checkpoint-<step>/`:

    adapter/             the LoRA adapter in peft's format (adapter_config.json + safetensors)
    trainer_state.pt     optimizer, LR scheduler, step, data position
    rng-rank<r>.pt       every rank's RNG states (python, torch, CUDA)
    run.json             base model, task and the resolved config (what evaluate.py reads)

A checkpoint is written into a hidden `.checkpoint-<step>.tmp` directory and renamed into place
when complete: rename is atomic, so a kill during a save leaves no `checkpoint-<step>` that
looks complete but is not, and only complete checkpoints are ever found by `latest_checkpoint`.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from grpo import distributed

_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_steps(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in `run_dir`, oldest first."""
    if not run_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in run_dir.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()
    ]
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoint_steps(run_dir)
    return found[-1][1] if found else None


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: Any,
    trainer_state: dict[str, Any],
    run_info: dict[str, Any],
    keep: int | None,
) -> Path:
    """Write checkpoint-<step> (all ranks call this; rank 0 writes the shared files)."""
    final = run_dir / f"checkpoint-{step}"
    tmp = run_dir / f".checkpoint-{step}.tmp"
    if distributed.is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp / "adapter")
        torch.save(trainer_state, tmp / "trainer_state.pt")
        (tmp / "run.json").write_text(json.dumps(run_info, indent=1, ensure_ascii=False))
    distributed.barrier()
    torch.save(rng_state(), tmp / f"rng-rank{distributed.get_rank()}.pt")
    distributed.barrier()
    if distributed.is_main_process():
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        _rotate(run_dir, keep)
    distributed.barrier()
    return final


def _rotate(run_dir: Path, keep: int | None) -> None:
    """Delete the oldest checkpoints beyond `keep`."""
    if keep is None or keep <= 0:
        return
    for _, path in checkpoint_steps(run_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(path: Path, model: Any) -> dict[str, Any]:
    """Load adapter weights into `model` and this rank's RNG; return the trainer state."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    adapter = load_file(str(path / "adapter" / "adapter_model.safetensors"))
    try:
        result = set_peft_model_state_dict(model, adapter)
    except RuntimeError as e:  # shape mismatch: the checkpoint was trained on another model
        raise RuntimeError(
            f"{path}: the adapter does not fit this model (was it trained "
            f"from another base model?): {str(e)[:500]}"
        ) from e
    if getattr(result, "unexpected_keys", None):
        raise RuntimeError(
            f"{path}: adapter has keys this model lacks: {result.unexpected_keys[:5]}"
        )
    rng_file = path / f"rng-rank{distributed.get_rank()}.pt"
    if not rng_file.is_file():
        raise RuntimeError(
            f"{path}: no RNG state for rank {distributed.get_rank()} "
            "(resumed with a different number of processes?)"
        )
    set_rng_state(torch.load(rng_file, weights_only=False))
    return torch.load(path / "trainer_state.pt", weights_only=False)


def read_run_info(path: Path) -> dict[str, Any]:
    """The run.json of a checkpoint (base model, task, config)."""
    info = path / "run.json"
    if not info.is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint of this trainer (no run.json)")
    return json.loads(info.read_text())
