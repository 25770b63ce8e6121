"""Reward functions by name: the registry, the `--rewards` spec parser and plugin loading.

The registry holds batch functions, which score all completions of a batch at once:

    f(completions: list[str], **columns) -> list[float | None]

Each column (e.g. `solution`) is a list aligned with `completions`; the result holds one
float per completion, or None where the reward does not apply. `register` adds one as is.
Most rewards judge one completion at a time, so `reward` registers a per-sample function
instead and builds the batch function around it (rewards/per_sample.py): the row's
`solution` arrives as `gold` (as text; rows without one score None unless
needs_gold=False), its other columns as keyword fields, which the function must accept
and may ignore (**fields).

A plugin is a Python file that registers more rewards when imported:

    from rewards import reward

    @reward("mentions_gold")
    def mentions_gold(completion: str, gold: str, **fields) -> float | None:
        return 1.0 if gold in completion else 0.0

    @reward("brevity", needs_gold=False)
    def brevity(completion: str, gold: str | None, **fields) -> float | None:
        return -len(completion) / 1000
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from rewards.per_sample import RewardFn, SampleFn, per_sample

_REGISTRY: dict[str, RewardFn] = {}
_LOADED_PLUGINS: dict[Path, list[str]] = {}


class PluginError(RuntimeError):
    """A reward plugin file could not be loaded."""


def register(name: str, *, replace: bool = False) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make `fn` available as `get_reward(name)`.

    A name can be registered once; `replace=True` deliberately overrides an existing one
    (e.g. a plugin's own `ocr`). Returns the function unchanged.
    """
    if not isinstance(name, str) or not name or "," in name or ":" in name or name != name.strip():
        raise ValueError(
            f"reward name must be a non-empty string without ',' ':' or edge spaces: {name!r}"
        )

    def decorator(fn: RewardFn) -> RewardFn:
        if not callable(fn):
            raise TypeError(f"reward {name!r}: {fn!r} is not callable")
        if name in _REGISTRY and not replace:
            other = _REGISTRY[name]
            raise ValueError(
                f"reward {name!r} is already registered (by {other.__module__}."
                f"{getattr(other, '__qualname__', other)}); pass replace=True to override"
            )
        _REGISTRY[name] = fn
        return fn

    return decorator


def reward(
    name: str, *, needs_gold: bool = True, replace: bool = False
) -> Callable[[SampleFn], RewardFn]:
    """Decorator: register the per-sample `fn(completion, gold, **fields) -> float | None`.

    Shorthand for register(name, replace=replace)(per_sample(fn, name=name,
    needs_gold=needs_gold)); returns the registered batch function.
    """
    add = register(name, replace=replace)  # a bad name fails here, before any function

    def decorator(fn: SampleFn) -> RewardFn:
        return add(per_sample(fn, name=name, needs_gold=needs_gold))

    return decorator


def get_reward(name: str) -> RewardFn:
    """The reward function registered as `name`; KeyError listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown reward {name!r}; available: {', '.join(available())}") from None


def available() -> list[str]:
    """Names of all registered rewards, sorted."""
    return sorted(_REGISTRY)


def parse_reward_spec(spec: str | Mapping[str, Any]) -> list[tuple[str, float]]:
    """'ocr:1.0,format:0.5' -> [('ocr', 1.0), ('format', 0.5)]; a missing weight is 1.0.

    The YAML form is a mapping {name: weight} (a None weight is 1.0). Weights must be
    finite numbers (negative ones are allowed: a penalty). ValueError names the bad part.
    Names are not looked up here: plugins may register them later.
    """
    if isinstance(spec, Mapping):
        parts = [(str(name), weight) for name, weight in spec.items()]
        return _check_specs([(name, _weight(w, f"{name}: {w}")) for name, w in parts])
    if not isinstance(spec, str):
        raise TypeError(f"reward spec must be a string or a mapping, got {type(spec).__name__}")
    if not spec.strip():
        raise ValueError("reward spec is empty; expected e.g. 'ocr:1.0,format:0.5'")
    result = []
    for part in spec.split(","):
        name, sep, weight = part.partition(":")
        name = name.strip()
        if not name:
            raise ValueError(f"reward spec {spec!r}: part {part!r} has no reward name")
        result.append((name, _weight(weight.strip() if sep else None, part)))
    return _check_specs(result)


def _weight(value: Any, part: str) -> float:
    """One spec weight as a finite float; None (omitted) means 1.0."""
    if value is None:
        return 1.0
    try:
        weight = float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"reward spec part {part.strip()!r}: weight {value!r} is not a number"
        ) from None
    if isinstance(value, bool) or not math.isfinite(weight):
        raise ValueError(f"reward spec part {part.strip()!r}: weight must be a finite number")
    return weight


def _check_specs(specs: list[tuple[str, float]]) -> list[tuple[str, float]]:
    names = [name for name, _ in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"reward spec names {', '.join(duplicates)} more than once")
    if not specs:
        raise ValueError("reward spec is empty; expected e.g. 'ocr:1.0,format:0.5'")
    return specs


def load_plugin(path: str | Path) -> list[str]:
    """Import the Python file at `path` so that its `register` calls add rewards.

    Returns the names it registered. Loading the same file again is a no-op (the names of
    the first load are returned), so configs and resumed runs may repeat it safely.
    FileNotFoundError if there is no such file; PluginError if importing it raises.
    """
    file = Path(path).expanduser().resolve()
    if file in _LOADED_PLUGINS:
        return list(_LOADED_PLUGINS[file])
    if not file.is_file():
        raise FileNotFoundError(f"reward plugin file not found: {path}")
    # A unique module name per file: two plugins both called rewards.py must not collide.
    module_name = f"_reward_plugin_{file.stem}_{hashlib.sha1(str(file).encode()).hexdigest()[:8]}"
    module_spec = importlib.util.spec_from_file_location(module_name, file)
    if module_spec is None or module_spec.loader is None:
        raise PluginError(f"reward plugin {file}: not importable as a Python file")
    module = importlib.util.module_from_spec(module_spec)
    before = dict(_REGISTRY)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[module_name]
        _REGISTRY.clear()
        _REGISTRY.update(before)  # no half-registered plugin
        raise PluginError(f"reward plugin {file} failed to import: {type(e).__name__}: {e}") from e
    added = sorted(n for n, fn in _REGISTRY.items() if before.get(n) is not fn)
    _LOADED_PLUGINS[file] = added
    return list(added)
