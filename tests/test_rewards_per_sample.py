"""per_sample and the `reward` decorator: batching, the gold column, fields and None rows."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import rewards
from rewards import per_sample, registry


@pytest.fixture(autouse=True)
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    yield


def test_rows_get_their_gold_as_text_and_their_fields() -> None:
    calls: list[tuple[str, str | None, dict[str, Any]]] = []

    def spy(completion: str, gold: str | None, **fields: Any) -> float | None:
        calls.append((completion, gold, fields))
        return float(len(calls))

    batch = per_sample(spy)
    got = batch(["a", "b", "c"], solution=["x", 3, None], kind=["k1", "k2", "k3"])
    assert got == [1.0, 2.0, None]  # the None-gold row is not scored: spy ran twice
    assert calls == [("a", "x", {"kind": "k1"}), ("b", "3", {"kind": "k2"})]


def test_without_needs_gold_every_row_is_scored() -> None:
    def echo(completion: str, gold: str | None, **_: Any) -> float | None:
        return None if gold is None else float(gold)

    batch = per_sample(echo, needs_gold=False)
    assert batch(["a", "b"], solution=["1.5", None]) == [1.5, None]
    assert batch(["a", "b"]) == [None, None]  # no solution column at all: gold None


def test_missing_and_misaligned_columns_name_the_reward() -> None:
    batch = per_sample(lambda completion, gold, **_: 1.0, name="mine")
    with pytest.raises(KeyError, match="'mine' needs a 'solution' column"):
        batch(["a"], answer=["a"])
    with pytest.raises(ValueError, match="'mine': column 'kind' has 1 values for 2"):
        batch(["a", "b"], solution=["a", "b"], kind=["k"])
    assert batch([], solution=[]) == []  # an empty batch is fine


def test_reward_registers_the_batch_function() -> None:
    @rewards.reward("shouts_gold")
    def shouts_gold(completion: str, gold: str, **_: Any) -> float | None:
        """1.0 when the completion is the gold in capitals."""
        return float(completion == gold.upper())

    assert rewards.get_reward("shouts_gold") is shouts_gold
    assert shouts_gold(["HI", "hi", "HI"], solution=["hi", "hi", None]) == [1.0, 0.0, None]
    assert shouts_gold.__wrapped__("HI", "hi") == 1.0  # the per-sample function itself
    assert shouts_gold.__doc__ == "1.0 when the completion is the gold in capitals."
    with pytest.raises(ValueError, match="'shouts_gold' is already registered"):
        rewards.reward("shouts_gold")(lambda completion, gold, **_: 0.0)
    with pytest.raises(ValueError, match="reward name"):
        rewards.reward("a:b")


def test_score_completions_runs_per_sample_rewards() -> None:
    rewards.reward("length", needs_gold=False)(lambda completion, gold, **_: len(completion))
    table, _ = rewards.score_completions(
        [("length", 1.0), ("count", 1.0)],
        ["ab", "<answer>3</answer>"],
        {"solution": [None, "3"]},
        ["t:1", "t:2"],
    )
    assert table[:, 0].tolist() == [2.0, 18.0]
    assert table[1, 1] == 1.0 and table[0, 1].isnan()
