"""Checking every image of a data set before training: in parallel, and once per data file.

`check_images` decodes each ImageRef with the same function training uses (ImageRef.decode)
and returns, in the order given, what is wrong with it (or None) and its notes. Large sets are
split into chunks decoded by worker processes; results are gathered in input order, so errors
and warnings come out as they would from one process.

`CheckCache` keeps those results on disk so that a restart, or the other ranks of a torchrun
job, do not decode again. An entry is valid only for the same data file (absolute path, size,
mtime, SHA-256 of its bytes), the same image files (path, size, mtime of each, in order) and
the same checking rules (RULES_VERSION). Ranks racing on a cold cache take a file lock: the
first decodes and writes, the others wait and read.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import multiprocessing
import os
import tempfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from itertools import groupby
from pathlib import Path
from typing import Any

from data.cache import cache_root, file_sha256
from data.sample import DataError, ImageRef

logger = logging.getLogger(__name__)

RULES_VERSION = 1  # bump when data/images.py changes what passes or what it warns about
CHUNK = 256  # images per task sent to a worker: big enough to amortise the pickling
PARALLEL_MIN_IMAGES = 512  # below this a worker's start-up costs more than it saves
MAX_WORKERS = 8

Check = tuple[str | None, tuple[str, ...]]  # (problem, notes), both without the "file:line: "


def check_images(refs: list[ImageRef], workers: int | None = None) -> list[Check]:
    """(problem or None, notes) for each ref, in order; decoded in `workers` processes
    (default: the CPU count, at most MAX_WORKERS; small sets are decoded in this process)."""
    if workers is None:
        workers = min(os.cpu_count() or 1, MAX_WORKERS)
    if workers <= 1 or len(refs) < PARALLEL_MIN_IMAGES:
        return _check_chunk(refs)
    # spawn, not fork: the caller may already hold torch/gloo threads, and fork copies locks
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        chunks = pool.map(_check_chunk, _chunks(refs))
        return [check for chunk in chunks for check in chunk]


def _chunks(refs: list[ImageRef]) -> Iterator[list[ImageRef]]:
    """Consecutive runs of refs; a Parquet row group stays in one chunk so one worker reads
    it once (its image column is the smallest unit Parquet can read)."""
    keyed = enumerate(refs)
    for _, run in groupby(keyed, key=lambda ir: _chunk_key(ir[0], ir[1])):
        yield [ref for _, ref in run]


def _chunk_key(index: int, ref: ImageRef) -> tuple[Any, ...]:
    if ref.cell is not None:
        return (str(ref.cell.file), ref.cell.row_group)
    return ("", index // CHUNK)


def _check_chunk(refs: list[ImageRef]) -> list[Check]:
    return [_check_one(ref) for ref in refs]


def _check_one(ref: ImageRef) -> Check:
    try:
        _, notes = ref.decode()
    except DataError as e:
        return _strip(str(e), ref.where), ()
    return None, tuple(notes)


def _strip(message: str, where: str) -> str:
    prefix = f"{where}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


# ---------------------------------------------------------------------------------------------
# the on-disk cache


def default_cache_dir() -> Path:
    """data/cache.py's cache_root()/data-checks: every cache of a run under one directory."""
    return cache_root() / "data-checks"


class CheckCache:
    """The cached checks of one data file, under `directory` (see the module docstring)."""

    def __init__(self, directory: Path, data_file: Path, refs: list[ImageRef]) -> None:
        absolute = data_file.absolute()
        name = hashlib.sha256(str(absolute).encode()).hexdigest()[:32]
        self.file = directory / f"{name}.json"
        self.data_file = absolute
        self.refs = refs

    def key(self) -> dict[str, Any]:
        """What the entry is valid for; recomputed on every load (a hash of the data file and
        one stat() per image file: far cheaper than decoding)."""
        stat = self.data_file.stat()
        return {
            "rules": RULES_VERSION,
            "path": str(self.data_file),
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "sha256": file_sha256(self.data_file),
            "images": _image_stats_hash(self.refs),
            "count": len(self.refs),
        }

    def load(self, key: dict[str, Any]) -> list[Check] | None:
        """The cached checks if the entry exists and was made for `key`, else None."""
        try:
            entry = json.loads(self.file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(entry, dict) or entry.get("key") != key:
            return None
        return [(problem, tuple(notes)) for problem, notes in entry["checks"]]

    def store(self, key: dict[str, Any], checks: list[Check]) -> None:
        """Write atomically (temp file + rename): a killed run never leaves half an entry."""
        self.file.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"key": key, "checks": [[p, list(n)] for p, n in checks]})
        fd, tmp = tempfile.mkstemp(prefix=f".{self.file.name}.", dir=self.file.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, self.file)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive lock on this entry, so only one rank decodes a cold data set."""
        self.file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.file.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def cached_check_images(
    refs: list[ImageRef], data_file: Path, cache_dir: Path, workers: int | None = None
) -> tuple[list[Check], bool]:
    """(checks, hit): `check_images` through the on-disk cache of `data_file`. A cache
    directory that cannot be written costs the caching, not the run."""
    cache = CheckCache(cache_dir, data_file, refs)
    try:
        with cache.locked():
            key = cache.key()
            checks = cache.load(key)
            if checks is not None:
                return checks, True
            checks = check_images(refs, workers)
            cache.store(key, checks)
            return checks, False
    except OSError as e:
        logger.warning("image-check cache %s unusable (%s); checking without it", cache.file, e)
        return check_images(refs, workers), False


def _image_stats_hash(refs: list[ImageRef]) -> str:
    """A digest of (path, size, mtime) of every image file, in order; embedded images are
    covered by the data file's own hash."""
    digest = hashlib.sha256()
    for ref in refs:
        if ref.path is None:
            digest.update(b"-\n")
            continue
        try:
            stat = ref.path.stat()
            digest.update(f"{ref.path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{ref.path}\0missing\n".encode())
    return digest.hexdigest()
