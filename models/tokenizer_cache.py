"""A tokenizer is parsed once per process; every caller gets its own copy of the result.

transformers 5 spends ~2 s loading the 151,643-token Qwen2.5 tokenizer (tokenizer.json parsed
in Python, then its vocabulary and merges rebuilt into the Rust backend), and a process loads
the same one several times: the policy's processor, vLLM's engine, an export, an evaluation.
The first load of a local directory is kept; later loads with the same arguments get a copy
whose Python state (padding side, special tokens, chat template, an image processor's sizes)
is their own, while the parts nothing mutates after construction are shared: the Rust
backend (transformers sets its padding and truncation afresh on every call) and the Python
vocabulary and merge tables. A file changed on disk changes the key, so it is read again.

Nothing here alters what a load returns: tests/test_tokenizer_cache.py compares a copy with
a fresh load, and checks that changing one copy leaves the others as loaded.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

SHARED_MIN_ITEMS = 10_000  # a container this large on a tokenizer is its vocabulary or merges
PLAIN_TYPES = (str, int, float, bool, type(None))
_LOADED: dict[tuple, Any] = {}


def load_key(kind: str, path: str | Path, kwargs: dict[str, Any]) -> tuple | None:
    """What identifies a load: the directory, its small files' sizes and times, the
    arguments. None (never cached) for a hub id, a single file or an argument that is an
    object (a processor built around a given tokenizer)."""
    folder = Path(path)
    if not folder.is_dir() or not all(isinstance(v, PLAIN_TYPES) for v in kwargs.values()):
        return None
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix != ".safetensors")
    stamps = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return (kind, str(folder.resolve()), stamps, tuple(sorted(kwargs.items())))


def own_copy(loaded: Any) -> Any:
    """A deep copy of a tokenizer or processor that shares only its tokenizer's read-only
    parts (the Rust backend, the vocabulary and merge tables)."""
    tokenizer = getattr(loaded, "tokenizer", loaded)
    memo: dict[int, Any] = {}
    for value in getattr(tokenizer, "__dict__", {}).values():
        if type(value).__module__.startswith("tokenizers") or (
            isinstance(value, (dict, list)) and len(value) >= SHARED_MIN_ITEMS
        ):
            memo[id(value)] = value
    return copy.deepcopy(loaded, memo)


def cached_load(kind: str, load: Callable[..., Any], path: Any, **kwargs: Any) -> Any:
    """load(path, **kwargs), from this process's earlier identical load when there is one."""
    key = load_key(kind, path, kwargs) if isinstance(path, (str, Path)) else None
    if key is None:
        return load(path, **kwargs)
    if key not in _LOADED:
        _LOADED[key] = load(path, **kwargs)
    return own_copy(_LOADED[key])


def load_tokenizer(path: str, **kwargs: Any) -> Any:
    """AutoTokenizer.from_pretrained(path, **kwargs), parsed once per process."""
    from transformers import AutoTokenizer

    return cached_load("tokenizer", AutoTokenizer.from_pretrained, path, **kwargs)


def load_auto_processor(path: str, **kwargs: Any) -> Any:
    """AutoProcessor.from_pretrained(path, **kwargs), parsed once per process."""
    from transformers import AutoProcessor

    return cached_load("processor", AutoProcessor.from_pretrained, path, **kwargs)


@contextlib.contextmanager
def tokenizer_loads_cached() -> Iterator[None]:
    """Within: AutoTokenizer.from_pretrained goes through this process's cache, for the
    loads other libraries make (vLLM's engine loads its own tokenizer at start-up)."""
    from transformers import AutoTokenizer

    original = AutoTokenizer.__dict__["from_pretrained"]
    unbound = original.__func__

    def from_pretrained(cls: type, path: Any, *args: Any, **kwargs: Any) -> Any:
        if args:
            return unbound(cls, path, *args, **kwargs)
        return cached_load("tokenizer", lambda p, **kw: unbound(cls, p, **kw), path, **kwargs)

    AutoTokenizer.from_pretrained = classmethod(from_pretrained)  # type: ignore[method-assign]
    try:
        yield
    finally:
        AutoTokenizer.from_pretrained = original  # type: ignore[method-assign]


@contextlib.contextmanager
def tokenizers_passed_by_reference() -> Iterator[None]:
    """Within: copy.deepcopy of a transformers tokenizer returns the tokenizer itself.

    A vision-language engine builds its HF processor at start-up with its tokenizer as a
    keyword argument, and transformers deep-copies the keyword arguments of from_pretrained
    several times over: a 151k-token tokenizer costs ~1 s a copy here, ~15 s of a tiny
    Qwen2.5-VL engine's ~20 s start (bench/engine_start.py). The processor only reads its
    tokenizer, so sharing it is what the copies amount to."""
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    before = PreTrainedTokenizerBase.__dict__.get("__deepcopy__")
    PreTrainedTokenizerBase.__deepcopy__ = lambda self, memo: self  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if before is not None:
            PreTrainedTokenizerBase.__deepcopy__ = before  # type: ignore[attr-defined]
        else:
            del PreTrainedTokenizerBase.__deepcopy__  # type: ignore[attr-defined]
