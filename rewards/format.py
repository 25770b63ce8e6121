"""`format` and `format_strict`: does the completion follow the R1 layout?

    <think> reasoning </think> <answer> answer </answer>

`format` (1.0 / 0.0): one <think> block, then one <answer> block, with nothing but
whitespace before, between and after them. Each of the four tags appears exactly once, so
"<answer>1</answer><answer>2</answer>" or a nested tag fails. Blocks may be empty.

`format_strict` (1.0 / 0.0): the exact line layout R1-style prompts ask for,

    "<think>\\n{reasoning}\\n</think>\\n<answer>\\n{answer}\\n</answer>"

optionally followed by one newline; both blocks non-blank; tags once each.
"""

from __future__ import annotations

import re
from typing import Any

from rewards.registry import reward

_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_LENIENT = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.DOTALL)
_STRICT = re.compile(r"<think>\n(.*?)\n</think>\n<answer>\n(.*?)\n</answer>\n?", re.DOTALL)


def _tags_once(text: str) -> bool:
    return all(text.count(tag) == 1 for tag in _TAGS)


def follows_format(text: str) -> bool:
    """The lenient R1 layout (module docstring)."""
    return _tags_once(text) and _LENIENT.fullmatch(text) is not None


def follows_strict_format(text: str) -> bool:
    """The strict R1 line layout (module docstring)."""
    match = _STRICT.fullmatch(text)
    return match is not None and _tags_once(text) and all(block.strip() for block in match.groups())


# The layout is the completion's alone: no gold needed, rows without a solution score too.
@reward("format", needs_gold=False)
def format_reward(completion: str, gold: str | None, **_: Any) -> float | None:
    """1.0 where the completion follows the lenient R1 layout, else 0.0."""
    return 1.0 if follows_format(completion) else 0.0


@reward("format_strict", needs_gold=False)
def format_strict_reward(completion: str, gold: str | None, **_: Any) -> float | None:
    """1.0 where the completion follows the strict R1 line layout, else 0.0."""
    return 1.0 if follows_strict_format(completion) else 0.0
