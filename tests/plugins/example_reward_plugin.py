"""An example reward plugin: `--reward-plugin tests/plugins/example_reward_plugin.py`.

A plugin is any Python file; importing it runs its `register` calls. Each reward takes the
batch of completions plus the sample columns as keyword lists and returns one float (or None
where it does not apply) per completion. Accept **columns: other columns are passed too.
"""

from __future__ import annotations

from rewards import register


@register("example_brevity")
def brevity(completions: list[str], **columns: list) -> list[float | None]:
    """1.0 up to 20 characters, falling linearly to 0.0 at 100 characters."""
    return [min(1.0, max(0.0, (100 - len(c)) / 80)) for c in completions]


@register("example_mentions_solution")
def mentions_solution(completions: list[str], **columns: list) -> list[float | None]:
    """1.0 if the gold solution appears verbatim in the completion; None without a gold."""
    solutions = columns.get("solution", [None] * len(completions))
    return [
        None if gold is None else float(str(gold) in completion)
        for completion, gold in zip(completions, solutions, strict=True)
    ]
