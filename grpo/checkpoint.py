"""Checkpoints: save atomically, find the latest, resume exactly.

Layout of `run_dir/checkpoint-<step>/`:

    adapter/             the LoRA adapter in peft's format (adapter_config.json + safetensors)
    model/               instead, for full fine-tuning: the trained model as a directory
                         transformers and vLLM load (safetensors, config, processor/tokenizer)
    trainer_state.pt     optimizer, LR scheduler, step, data position
    rng-rank<r>.pt       every rank's RNG states (python, torch, CUDA)
    run.json             base model, task and the resolved config (what evaluate.py reads)
    manifest.json        size and sha256 of every other file, written last

The .pt files hold only tensors, numbers, strings, lists and dicts, and are read with
`torch.load(weights_only=True)`: a checkpoint is data, and one whose pickle asks to build any
other object is refused (unpickling it could run code). Python's RNG state is stored as lists.

`resolve_source` turns what evaluate.py is given (--ckpt, --model) into what to load:
- a checkpoint-N directory (adapter/ + run.json): the base model named in run.json (or
  --model, checked to be the same architecture) with the adapter on it;
- a full fine-tuning checkpoint-N (model/ + run.json): its model/ directory; --model, if
  given, is checked to be the same architecture and is the base --compare-base scores;
- a run directory: its latest checkpoint-N;
- a merged model directory (config.json, e.g. from `evaluate.py export`): that model;
- no --ckpt: the plain model --model.

A checkpoint is written into a hidden `.checkpoint-<step>.tmp` directory and renamed into place
when complete: rename is atomic, so a kill during a save leaves no `checkpoint-<step>` that
looks complete but is not, and only complete checkpoints are ever found by `latest_checkpoint`.
The manifest catches what rename cannot: a file damaged afterwards (a full disk, a bad copy);
`latest_valid_checkpoint` skips such a checkpoint, with a warning naming it.
"""

from __future__ import annotations

import json
import pickle
import random
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from data.cache import file_sha256
from grpo import distributed
from grpo.types import ADAPTER_CONFIG, ADAPTER_DIR, EXPORT_INFO, MODEL_DIR, Policy

BaseCheck = Callable[[str, str], None]  # (expected base, given model) -> raises if they differ


class CheckpointError(ValueError):
    """A path is not a checkpoint, run or model directory, or names no usable base model."""


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


MANIFEST = "manifest.json"


def rng_state() -> dict[str, Any]:
    """This process's RNG states in types `torch.load(weights_only=True)` reads."""
    version, internal, gauss = random.getstate()
    state = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_manifest(directory: Path) -> None:
    """manifest.json: {relative path: {size, sha256}} of every file below `directory`."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {
        str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": file_sha256(p)}
        for p in files
    }
    (directory / MANIFEST).write_text(json.dumps(entries, indent=1))


def manifest_problem(directory: Path) -> str | None:
    """Why `directory` fails its manifest (a missing, resized or changed file), or None."""
    try:
        entries = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return f"no readable {MANIFEST}"
    for name, entry in entries.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry["size"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {entry['size']}"
        if file_sha256(path) != entry["sha256"]:
            return f"{name} does not match its sha256 in the manifest"
    return None


def latest_valid_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that passes its manifest; a warning for each newer one that fails."""
    for _, path in reversed(checkpoint_steps(run_dir)):
        problem = manifest_problem(path)
        if problem is None:
            return path
        warnings.warn(f"skipping checkpoint {path}: {problem}", stacklevel=2)
    return None


def safe_load(path: Path) -> Any:
    """torch.load of data only: a pickle that would build any other object is refused."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: refused, it holds more than plain data and loading it could run code "
            f"({first})"
        ) from None


def trained_dir_name(policy: Policy) -> str:
    """Where a checkpoint keeps the trained weights: model/ (full fine-tuning) or adapter/."""
    return MODEL_DIR if policy.full else ADAPTER_DIR


def save_checkpoint(
    run_dir: Path,
    step: int,
    policy: Policy,
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
        policy.save_trainable(tmp / trained_dir_name(policy))
        torch.save(trainer_state, tmp / "trainer_state.pt")
        (tmp / "run.json").write_text(json.dumps(run_info, indent=1, ensure_ascii=False))
    distributed.barrier()
    torch.save(rng_state(), tmp / f"rng-rank{distributed.get_rank()}.pt")
    distributed.barrier()
    if distributed.is_main_process():
        write_manifest(tmp)  # last: a manifest vouches for files that are all there
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


def load_checkpoint(path: Path, policy: Policy) -> dict[str, Any]:
    """Load the trained weights into `policy` and this rank's RNG; return the trainer state.

    Both state files are read before anything changes, so a refused one leaves all as it was.
    """
    rng_file = path / f"rng-rank{distributed.get_rank()}.pt"
    if not rng_file.is_file():
        raise RuntimeError(
            f"{path}: no RNG state for rank {distributed.get_rank()} "
            "(resumed with a different number of processes?)"
        )
    trained = path / trained_dir_name(policy)
    if not trained.is_dir():
        held, wanted = (ADAPTER_DIR, MODEL_DIR) if policy.full else (MODEL_DIR, ADAPTER_DIR)
        mode = "full fine-tuning (--full)" if policy.full else "LoRA"
        raise RuntimeError(
            f"{path}: holds {held}/, not the {wanted}/ a {mode} run resumes from: resume "
            "with the settings it was trained with"
        )
    state, rng = safe_load(path / "trainer_state.pt"), safe_load(rng_file)
    policy.load_trainable(trained)
    set_rng_state(rng)
    return state


def read_run_info(path: Path) -> dict[str, Any]:
    """The run.json of a checkpoint (base model, task, config)."""
    info = path / "run.json"
    if not info.is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint of this trainer (no run.json)")
    return json.loads(info.read_text())


# --------------------------------------------------------------------------------------------
# What --ckpt / --model name (evaluate.py)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """What --ckpt / --model resolve to.

    model:   what to load (a base model under an adapter, or the model itself: a merged
             export, a full fine-tuning checkpoint's model/, a plain model);
    adapter: the peft adapter directory, for a LoRA training checkpoint;
    base:    the model to compare against (None: unknown);
    run:     run.json of the checkpoint or export_info.json of a merged model ({} if none).
    """

    kind: str  # "checkpoint" | "merged" | "model"
    model: str
    adapter: Path | None
    base: str | None
    path: Path | None
    run: dict[str, Any]

    @property
    def task(self) -> str | None:
        return self.run.get("task")

    @property
    def run_config(self) -> dict[str, Any]:
        return self.run.get("config") or {}


def _is_missing_dir(name: str) -> bool:
    return name.startswith(("/", ".", "~")) and not Path(name).expanduser().is_dir()


def trained_base(run: dict[str, Any]) -> str | None:
    """The base model a run trained: its resolved path if present here, else its name."""
    candidates = [run.get("base_model_path"), run.get("base_model")]
    usable = [str(c) for c in candidates if c and not _is_missing_dir(str(c))]
    return usable[0] if usable else None


def _checkpoint_base(
    run: dict[str, Any], where: Path, model: str | None, same_base: BaseCheck | None
) -> str:
    """The base model under a checkpoint's adapter: --model (checked) or the one in run.json."""
    named = run.get("base_model_path") or run.get("base_model")
    if not named:
        raise CheckpointError(f"{where}: run.json names no base model; pass --model")
    base = trained_base(run)
    if model is not None:
        if base is not None and same_base is not None:
            same_base(base, model)
        return model
    if base is None:
        raise CheckpointError(
            f"{where}: the base model {named} it was trained on is not on this machine; "
            "pass --model with its location"
        )
    return base


def resolve_source(
    ckpt: str | None, model: str | None, same_base: BaseCheck | None = None
) -> ModelSource:
    """Interpret --ckpt and --model (module docstring). `same_base(expected, given)` raises
    when --model is not the architecture the checkpoint was trained on."""
    if ckpt is None:
        if model is None:
            raise CheckpointError("give --ckpt (a checkpoint or merged model) or --model")
        return ModelSource("model", model, None, None, None, {})
    path = Path(ckpt).expanduser()
    if not path.exists():
        raise CheckpointError(f"--ckpt {ckpt}: no such file or directory")
    if (path / "run.json").is_file() and (path / "adapter").is_dir():
        run = read_run_info(path)
        base = _checkpoint_base(run, path, model, same_base)
        return ModelSource("checkpoint", base, path / "adapter", base, path, run)
    if (path / "run.json").is_file() and (path / MODEL_DIR / "config.json").is_file():
        run = read_run_info(path)
        base = trained_base(run)
        if model is not None and base is not None and same_base is not None:
            same_base(base, model)
        model_dir = str(path / MODEL_DIR)
        return ModelSource("checkpoint", model_dir, None, model or base, path, run)
    if (path / ADAPTER_CONFIG).is_file():  # an adapter folder: inside a checkpoint, or bare
        if (path.parent / "run.json").is_file():
            return replace(resolve_source(str(path.parent), model, same_base), adapter=path)
        named = json.loads((path / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        run = {"base_model": named} if named else {}
        base = _checkpoint_base(run, path, model, same_base)
        return ModelSource("checkpoint", base, path, base, path, run)
    if (latest := latest_checkpoint(path)) is not None:  # a run directory
        return resolve_source(str(latest), model, same_base)
    if (path / "config.json").is_file():
        info_file = path / EXPORT_INFO
        run = json.loads(info_file.read_text()) if info_file.is_file() else {}
        base = model or trained_base(run)
        return ModelSource("merged", str(path), None, base, path, run)
    raise CheckpointError(
        f"--ckpt {ckpt}: not a checkpoint (adapter/ or model/ + run.json), a run directory "
        "(checkpoint-N), or a model directory (config.json)"
    )
