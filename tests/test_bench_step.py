"""bench/step.py's command line: what a run compares, and the ratio line it ends with."""

from __future__ import annotations

import pytest

from bench.step import configurations, parse_args, per_token, ratio


def test_a_plain_run_is_the_whole_comparison() -> None:
    runs = configurations(parse_args(["--model", "smollm2", "--task", "arith"]))
    assert [(sampler, beta) for sampler, beta, _ in runs] == [
        ("hf", 0.04),
        ("hf", 0.0),
        ("vllm", 0.04),
        ("vllm", 0.0),
    ]
    assert all(variants == [False, True] for _, _, variants in runs)  # lean, then naive


def test_flags_narrow_the_comparison() -> None:
    assert configurations(parse_args(["--sampler", "hf", "--beta", "0", "--lean"])) == [
        ("hf", 0.0, [False])
    ]
    assert configurations(parse_args(["--sampler", "vllm", "--naive"])) == [
        ("vllm", 0.04, [True]),
        ("vllm", 0.0, [True]),
    ]
    with pytest.raises(SystemExit):
        parse_args(["--lean", "--naive"])


def record(step: float, length: float, rss: float) -> dict[str, float | str]:
    return {
        "sampler": "hf",
        "beta": 0.04,
        "prompts": 4,
        "group": 8,
        "step_time_median": step,
        "step_time_min": step,
        "time/sample": step / 2,
        "time/logprobs": step / 4,
        "time/backward": step / 4,
        "peak_rss_mib": rss,
        "completion_length_mean": length,
    }


def test_ratio_compares_per_step_and_per_completion_token() -> None:
    lean, naive = record(10.0, 25.0, 1000.0), record(40.0, 50.0, 3000.0)
    assert per_token(lean) == pytest.approx(10.0 / (4 * 8 * 25.0))
    line = ratio(lean, naive)
    assert line["step_time_median"] == 4.0
    assert line["time_per_completion_token"] == 2.0  # naive's rows were twice as long
    assert line["peak_rss_mib"] == 3.0
    assert (line["completion_length_lean"], line["completion_length_naive"]) == (25.0, 50.0)
