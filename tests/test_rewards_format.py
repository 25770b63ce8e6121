"""format and format_strict on well-formed and malformed completions."""

from __future__ import annotations

import pytest

from rewards import get_reward

STRICT_OK = "<think>\nthe digits read 42\n</think>\n<answer>\n42\n</answer>"


@pytest.mark.parametrize(
    ("completion", "lenient", "strict"),
    [
        (STRICT_OK, 1.0, 1.0),
        (STRICT_OK + "\n", 1.0, 1.0),  # one trailing newline is fine
        ("<think>x</think><answer>42</answer>", 1.0, 0.0),  # no line breaks
        ("  <think>x</think> \n\n <answer>42</answer>\n ", 1.0, 0.0),  # whitespace around
        ("<think></think><answer></answer>", 1.0, 0.0),  # empty blocks: lenient only
        ("<think>\n \n</think>\n<answer>\n42\n</answer>", 1.0, 0.0),  # blank reasoning
        (STRICT_OK + "\n\n", 1.0, 0.0),
        ("<think>\nmulti\nline\n</think>\n<answer>\n4\n2\n</answer>", 1.0, 1.0),
        # Malformed.
        ("", 0.0, 0.0),
        ("42", 0.0, 0.0),
        ("<answer>42</answer>", 0.0, 0.0),  # no think block
        ("<answer>42</answer><think>x</think>", 0.0, 0.0),  # wrong order
        ("<think>x</think>so<answer>42</answer>", 0.0, 0.0),  # text between the blocks
        ("Sure! <think>x</think><answer>42</answer>", 0.0, 0.0),  # text before
        ("<think>x</think><answer>42</answer> done", 0.0, 0.0),  # text after
        ("<think>x</think><answer>4</answer><answer>2</answer>", 0.0, 0.0),  # two answers
        ("<think>x<think>y</think><answer>42</answer>", 0.0, 0.0),  # nested think
        ("<think>x</think><answer>42", 0.0, 0.0),  # truncated
        ("<think>\nx\n</think>\n<answer>\n<answer>42\n</answer>", 0.0, 0.0),
        ("<THINK>x</THINK><ANSWER>42</ANSWER>", 0.0, 0.0),  # tags are case-sensitive
    ],
)
def test_format_rewards(completion: str, lenient: float, strict: float) -> None:
    assert get_reward("format")([completion]) == [lenient]
    assert get_reward("format_strict")([completion], solution=["42"]) == [strict]


def test_batch_alignment() -> None:
    batch = [STRICT_OK, "nope", "<think>a</think> <answer>b</answer>"]
    assert get_reward("format")(batch, solution=["42"] * 3) == [1.0, 0.0, 1.0]
    assert get_reward("format_strict")(batch) == [1.0, 0.0, 0.0]
