"""`math`: is the answer mathematically equal to the gold answer? (math-verify)

reward = 1.0 if equal, else 0.0; None where the gold `solution` is None or blank.

1. The answer is the last <answer> block's content, else the whole completion (math-verify
   then finds the \\boxed{} or final expression in it); the gold goes through the same rule.
2. Equal after text normalisation (case, spaces, surrounding $, a final period) -> 1.0.
   This is the fallback for gold answers math-verify cannot parse ("Paris", "B").
3. Otherwise math-verify parses both (LaTeX, fractions, \\boxed{}, sets, intervals) and
   compares symbolically: "\\frac{1}{2}", "0.5" and "\\boxed{1/2}" are all equal. A bare
   answer or gold without math delimiters is parsed as "$...$" first, since math-verify reads
   undelimited "2\\sqrt{3}" as just 2.

Time limit: math-verify's own timeout uses signal.alarm, which works only on the main thread.
We switch it off and run each check in a daemon thread instead, waiting at most
`timeout_seconds`; a check that overruns scores 0.0. Python cannot kill a thread, so a
runaway check is abandoned: it keeps running (holding a share of the GIL) until it finishes,
and as a daemon it never blocks interpreter exit. This works from any thread.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from rewards.answer import answer_or_text, extract_answer
from rewards.per_sample import per_sample
from rewards.registry import RewardFn, register

T = TypeVar("T")

_MATH_DELIMITERS = ("$", "\\(", "\\[", "\\boxed")


class _DropTimeoutDisabledWarning(logging.Filter):
    """math-verify warns that we must time-limit it ourselves; we do (run_with_timeout)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutDisabledWarning())


def run_with_timeout(fn: Callable[..., T], timeout_seconds: float, *args: Any) -> T:
    """fn(*args) in a daemon thread; TimeoutError if it takes longer than timeout_seconds.

    The function's own exceptions are re-raised here. On timeout the thread is abandoned.
    """
    outcome: dict[str, Any] = {}
    done = threading.Event()

    def target() -> None:
        try:
            outcome["value"] = fn(*args)
        except BaseException as e:  # handed to the caller below
            outcome["error"] = e
        finally:
            done.set()

    threading.Thread(target=target, daemon=True, name="reward-timeout").start()
    if not done.wait(timeout_seconds):
        raise TimeoutError(f"{getattr(fn, '__name__', fn)} took over {timeout_seconds} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def normalise_text(text: str) -> str:
    """Case-folded, spaces collapsed, surrounding $ and a final period removed."""
    text = text.strip().strip("$").strip().removesuffix(".")
    return re.sub(r"\s+", " ", text).casefold()


def parse_math(text: str, bare: bool) -> list:
    """math-verify's parse without its signal-based timeout.

    bare: the text is meant to be only an answer; wrap it in $...$ when it has no math
    delimiters (math-verify otherwise reads "2\\sqrt{3}" as 2).
    """
    from math_verify import parse

    if bare and not any(d in text for d in _MATH_DELIMITERS):
        wrapped = parse(f"${text}$", parsing_timeout=None)
        if wrapped:
            return wrapped
    return parse(text, parsing_timeout=None)


def math_equal(completion: str, gold: str) -> bool:
    """Steps 1-3 of the module docstring, without the time limit."""
    from math_verify import verify

    gold_answer = answer_or_text(gold)
    tagged = extract_answer(completion)
    answer = tagged if tagged is not None else completion.strip()
    if normalise_text(answer) == normalise_text(gold_answer):
        return True
    gold_parsed = parse_math(gold_answer, bare=True)
    if not gold_parsed:
        return False  # text comparison (above) was the only test available
    answer_parsed = parse_math(answer, bare=tagged is not None)
    return bool(verify(gold_parsed, answer_parsed, timeout_seconds=None))


def make_math_reward(timeout_seconds: float = 5.0) -> RewardFn:
    """A math reward whose per-completion check is limited to timeout_seconds."""

    def math_reward(completion: str, gold: str, **_: Any) -> float | None:
        if not gold.strip():
            return None  # a blank solution is a missing one
        # math-verify (sympy and its LaTeX parser, ~0.8 s) is imported on first use, which
        # a run without maths never reaches, and here, outside the time limit
        import math_verify  # noqa: F401

        try:
            equal = run_with_timeout(math_equal, timeout_seconds, completion, gold)
        except TimeoutError:
            equal = False  # an answer too costly to check earns nothing
        return 1.0 if equal else 0.0

    return per_sample(math_reward, name="math")


register("math")(make_math_reward())
