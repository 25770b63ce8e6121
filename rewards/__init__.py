"""Reward functions and their registry.

    from rewards import get_reward, available, parse_reward_spec, load_plugin, reward

    get_reward("ocr")(completions, solution=solutions)   # -> list[float | None]
    parse_reward_spec("ocr:1.0,format:0.5")             # -> [("ocr", 1.0), ("format", 0.5)]

Built in (one module each, named after the reward; importing the package registers them):

    ocr             weighted character edit distance to the gold
    format          the <think>...</think><answer>...</answer> layout (format_strict: exact lines)
    math            math-verify equivalence, time-limited
    count           the <answer> integer equals the gold integer
    boxed           the last \\boxed{} matches the gold (numbers compared as numbers)
    content         numbers all-or-nothing plus text similarity
    number          the final number stated equals the gold number (number.py)
    boxed_number    the last \\boxed{} holds the gold number (number.py)
    overlong        DAPO's soft overlong penalty from token lengths (fields: overlong.py)

Rewards are written per sample, `f(completion, gold, **fields) -> float | None`, and
registered with the `reward` decorator, which builds the batch function the registry
holds (rewards/per_sample.py). A plugin file registers more with `reward`, or a batch
function with `register` (rewards/registry.py).
"""

from rewards import (  # noqa: F401  (importing them registers them)
    boxed,
    content,
    count,
    format,
    math,
    number,
    ocr,
    overlong,
)
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
