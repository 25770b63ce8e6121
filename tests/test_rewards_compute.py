"""score_completions: the [N, K] table, None -> NaN, and errors that name function and sample."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch

from rewards import RewardError, registry, score_completions

WHERE = ["train.jsonl:1", "train.jsonl:2", "train.jsonl:3"]
COMPLETIONS = ["<answer>a1</answer>", "<answer>b1</answer>", "<answer>3</answer>"]
COLUMNS = {"solution": ["a1", "a1", "3"], "kind": ["ocr", "ocr", "count"]}


@pytest.fixture(autouse=True)
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    yield


def add(name: str, fn: Callable) -> None:
    registry.register(name)(fn)


def test_table_and_weights() -> None:
    def only_count(completions: list[str], kind: list[str], **_: list) -> list[float | None]:
        return [1.0 if k == "count" else None for k in kind]

    add("only_count", only_count)
    table, weights = score_completions(
        [("ocr", 1.0), ("format", 0.5), ("only_count", 2.0)], COMPLETIONS, COLUMNS, WHERE
    )
    assert table.shape == (3, 3) and table.dtype == torch.float32
    assert weights.tolist() == [1.0, 0.5, 2.0] and weights.dtype == torch.float32
    assert table[:, 0].tolist() == pytest.approx([1.0, 2 / 3, 1.0])  # ocr
    assert table[:, 1].tolist() == [0.0, 0.0, 0.0]  # no <think>: format fails
    assert math.isnan(table[0, 2]) and math.isnan(table[1, 2]) and table[2, 2] == 1.0


def test_functions_receive_aligned_columns_and_accept_numpy_results() -> None:
    seen: dict = {}

    def spy(completions: list[str], **columns: list) -> np.ndarray:
        seen.update(columns, completions=completions)
        return np.arange(len(completions), dtype=np.float64)

    add("spy", spy)
    table, _ = score_completions([("spy", 1.0)], COMPLETIONS, COLUMNS, WHERE)
    assert seen == {**COLUMNS, "completions": COMPLETIONS}
    assert table[:, 0].tolist() == [0.0, 1.0, 2.0]


def test_a_raising_function_names_itself_and_the_sample() -> None:
    def picky(completions: list[str], **_: list) -> list[float | None]:
        return [
            float(int(c.removeprefix("<answer>").removesuffix("</answer>"))) for c in completions
        ]

    add("picky", picky)
    with pytest.raises(
        RewardError, match=r"reward 'picky' failed on sample train\.jsonl:1: ValueError"
    ):
        score_completions([("picky", 1.0)], COMPLETIONS, COLUMNS, WHERE)


def test_a_failure_no_single_sample_reproduces_names_the_batch() -> None:
    def batch_only(completions: list[str], **_: list) -> list[float | None]:
        if len(completions) > 1:
            raise RuntimeError("batch too big")
        return [1.0]

    add("batch_only", batch_only)
    with pytest.raises(
        RewardError,
        match=r"'batch_only' failed on batch train\.jsonl:1 \.\. train\.jsonl:3 \(3 samples\)",
    ):
        score_completions([("batch_only", 1.0)], COMPLETIONS, COLUMNS, WHERE)


@pytest.mark.parametrize(
    ("result", "message"),
    [
        ([1.0, 1.0], r"'bad' returned 2 values for 3 completions"),
        ([1.0, math.nan, 1.0], r"'bad' returned nan for sample train\.jsonl:2; return None"),
        ([1.0, 1.0, -math.inf], r"'bad' returned -inf for sample train\.jsonl:3"),
        ([1.0, "0.5", 1.0], r"'bad' returned non-numeric str '0\.5' for sample train\.jsonl:2"),
        ([torch.tensor(1.0)] * 3, r"non-numeric Tensor .* train\.jsonl:1"),
        (1.0, r"'bad' returned float, expected a list of 3"),
        ("abc", r"'bad' returned str"),
        (None, r"'bad' returned NoneType"),
    ],
)
def test_unusable_results_are_errors(result: object, message: str) -> None:
    add("bad", lambda completions, **_: result)
    with pytest.raises(RewardError, match=message):
        score_completions([("ocr", 1.0), ("bad", 1.0)], COMPLETIONS, COLUMNS, WHERE)


def test_integers_and_bools_are_numbers() -> None:
    add("ints", lambda completions, **_: [1, True, 0])
    table, _ = score_completions([("ints", 1.0)], COMPLETIONS, COLUMNS, WHERE)
    assert table[:, 0].tolist() == [1.0, 1.0, 0.0]


def test_bad_calls() -> None:
    with pytest.raises(KeyError, match="unknown reward 'nope'"):
        score_completions([("nope", 1.0)], COMPLETIONS, COLUMNS, WHERE)
    with pytest.raises(ValueError, match="no reward functions"):
        score_completions([], COMPLETIONS, COLUMNS, WHERE)
    with pytest.raises(ValueError, match="2 sample locations for 3 completions"):
        score_completions([("ocr", 1.0)], COMPLETIONS, COLUMNS, WHERE[:2])
    with pytest.raises(ValueError, match="column 'solution' has 1 values for 3 completions"):
        score_completions([("ocr", 1.0)], COMPLETIONS, {"solution": ["a"]}, WHERE)


def test_a_missing_column_names_the_sample() -> None:
    with pytest.raises(
        RewardError, match=r"'ocr' failed on sample train\.jsonl:1: KeyError.*'solution' column"
    ):
        score_completions([("ocr", 1.0)], COMPLETIONS, {}, WHERE)
