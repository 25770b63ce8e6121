"""Reward functions and their registry.

    from rewards import get_reward, available, parse_reward_spec, load_plugin

    get_reward("ocr")(completions, solution=solutions)   # -> list[float | None]
    parse_reward_spec("ocr:1.0,format:0.5")             # -> [("ocr", 1.0), ("format", 0.5)]

Built in: ocr, format, format_strict, math, count, boxed, content (one module each;
importing the package registers them). A plugin file registers more with the `register`
decorator (rewards/registry.py).
"""

from rewards import boxed, content, count, format, math, ocr  # noqa: F401  (registers them)
from rewards.compute import RewardError, score_completions
from rewards.per_sample import SampleFn, per_sample
from rewards.registry import (
    PluginError,
    RewardFn,
    available,
    get_reward,
    load_plugin,
    parse_reward_spec,
    register,
    reward,
)

__all__ = [
    "PluginError",
    "RewardError",
    "RewardFn",
    "SampleFn",
    "available",
    "get_reward",
    "load_plugin",
    "parse_reward_spec",
    "per_sample",
    "register",
    "reward",
    "score_completions",
]
