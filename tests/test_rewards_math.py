"""math: equivalence through math-verify, the text fallback, and the thread-safe time limit."""

from __future__ import annotations

import threading

import pytest

import rewards.math as math_reward
from rewards import get_reward

reward = get_reward("math")


@pytest.mark.parametrize(
    ("completion", "solution", "expected"),
    [
        (r"<answer>\frac{1}{2}</answer>", "0.5", 1.0),
        (r"so the answer is \boxed{0.5}", r"\frac{1}{2}", 1.0),  # no tag: math-verify finds it
        (r"<think>...</think><answer>$\dfrac{1}{2}$</answer>", "1/2", 1.0),
        (r"<answer>2\sqrt{3}</answer>", r"\sqrt{12}", 1.0),  # bare LaTeX answer parsed whole
        (r"<answer>2</answer>", r"\sqrt{12}", 0.0),
        (r"<answer>x^2+1</answer>", r"$1+x^2$", 1.0),
        (r"<answer>\boxed{1000}</answer>", "1,000", 1.0),
        ("<answer>3</answer>", "<answer>3</answer>", 1.0),  # gold through the same rule
        ("<answer>4</answer>", "3", 0.0),
        # Golds math-verify cannot parse fall back to normalised text.
        ("<answer>Paris.</answer>", "paris", 1.0),
        ("<answer>Lyon</answer>", "Paris", 0.0),
        # Malformed completions.
        ("", "3", 0.0),
        ("<answer></answer>", "3", 0.0),
        (r"<answer>\frac{1}{</answer>", "0.5", 0.0),
        ("garbage {{{ $$ \\", "3", 0.0),
    ],
)
def test_math(completion: str, solution: str, expected: float) -> None:
    assert reward([completion], solution=[solution]) == [expected]


def test_not_applicable() -> None:
    assert reward(["<answer>3</answer>"] * 3, solution=[None, "  ", "3"]) == [None, None, 1.0]


def test_works_off_the_main_thread() -> None:
    # math-verify's default (signal.alarm) time limit fails here; ours must not.
    results: list = []
    worker = threading.Thread(
        target=lambda: results.append(
            reward([r"<answer>\frac{2}{4}</answer>", "<answer>7</answer>"], solution=["0.5"] * 2)
        )
    )
    worker.start()
    worker.join(timeout=60)
    assert results == [[1.0, 0.0]]


def test_a_check_that_overruns_scores_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()

    def stuck(completion: str, gold: str) -> bool:
        release.wait(30)  # a runaway sympy simplification, released at the end of the test
        return True

    monkeypatch.setattr(math_reward, "math_equal", stuck)
    quick = math_reward.make_math_reward(timeout_seconds=0.2)
    try:
        assert quick(["<answer>1</answer>"], solution=["1"]) == [0.0]
    finally:
        release.set()


def test_run_with_timeout() -> None:
    assert math_reward.run_with_timeout(lambda x: x + 1, 5.0, 1) == 2
    with pytest.raises(ZeroDivisionError):
        math_reward.run_with_timeout(lambda: 1 / 0, 5.0)
    release = threading.Event()
    with pytest.raises(TimeoutError, match=r"took over 0\.1 s"):
        math_reward.run_with_timeout(release.wait, 0.1, 30)
    release.set()
