"""Rewards used by the training tests (loaded with --reward-plugin)."""

from __future__ import annotations

import math

from rewards import register


@register("test_text_hash")
def text_hash(completions: list[str], **columns: list) -> list[float | None]:
    """A reward that differs between almost any two completions, so groups carry signal."""
    return [(sum(map(ord, c)) % 97) / 97 for c in completions]


@register("test_raises")
def raises(completions: list[str], **columns: list) -> list[float | None]:
    raise RuntimeError("reward exploded")


@register("test_nan")
def nan(completions: list[str], **columns: list) -> list[float | None]:
    return [math.nan for _ in completions]


@register("script")
def script(completions: list[str], solution: list[str], **columns: list) -> list[float | None]:
    """The learning test's task: the answer must start with an ASCII letter when the label is
    "latin", and with anything else when it is "other"."""
    out: list[float | None] = []
    for completion, label in zip(completions, solution, strict=True):
        first = completion.strip()[:1]
        latin = first.isascii() and first.isalpha()
        out.append(1.0 if latin == (label == "latin") else 0.0)
    return out


@register("test_constant")
def constant(completions: list[str], **columns: list) -> list[float | None]:
    """Every completion equal: every group has zero spread and carries no signal."""
    return [1.0 for _ in completions]


@register("test_flat_for_even")
def flat_for_even(
    completions: list[str], solution: list[str], **columns: list
) -> list[float | None]:
    """Prompts whose label ends in an even digit always score 1.0 (a group without spread);
    the others score like test_text_hash (spread almost surely)."""
    return [
        1.0 if int(gold[-1]) % 2 == 0 else (sum(map(ord, c)) % 97) / 97
        for c, gold in zip(completions, solution, strict=True)
    ]
