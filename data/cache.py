"""Where built artefacts (tokenizer, tiny model, built-in data) are cached between runs, and
the file fingerprint the caches, checkpoint manifests and downloads are checked with."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_root() -> Path:
    """$VLGRPO_CACHE, else $XDG_CACHE_HOME/vl-grpo, else ~/.cache/vl-grpo."""
    if env := os.environ.get("VLGRPO_CACHE"):
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "vl-grpo"


def build_once(target: Path, build: Callable[[Path], object]) -> Path:
    """Return `target`, building it first with `build(tmp_dir)` if it does not exist.

    The build writes into a temporary sibling directory that is renamed into place, so a
    killed build never leaves a directory that looks complete, and two processes racing
    (torchrun ranks) both end up with one complete copy.
    """
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: keep theirs
            if not target.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
