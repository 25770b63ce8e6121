"""The `arith` task and its built-in data; GSM8K's own answer format in data.readers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data import DataError, get_task, load_samples
from data.synthetic_arith import MAX_OPERAND, MIN_OPERAND, generate_arith_dataset, split_of

QUESTION = re.compile(r"What is (\d+(?: [+-] \d+)+)\?")


def records(jsonl: Path) -> list[dict]:
    return [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]


def recompute(question: str) -> tuple[list[int], int, bool]:
    """(operands, result, every partial result >= 0), read back from the question's text."""
    match = QUESTION.fullmatch(question)
    assert match, question
    tokens = match.group(1).split(" ")
    operands = [int(t) for t in tokens[::2]]
    total, never_negative = operands[0], True
    for operator, operand in zip(tokens[1::2], operands[1:], strict=True):
        total = total + operand if operator == "+" else total - operand
        never_negative &= total >= 0
    return operands, total, never_negative


@pytest.fixture(scope="module")
def builtin(tmp_path_factory) -> dict[str, Path]:
    cache = tmp_path_factory.mktemp("arith-cache")
    task = get_task("arith")
    return {split: task.default_data(cache, split) for split in ("train", "eval")}


def test_every_gold_is_the_value_of_its_question(builtin):
    for split, jsonl in builtin.items():
        rows = records(jsonl)
        assert all(set(r) == {"query", "solution"} for r in rows)
        three_terms = 0
        for row in rows:
            operands, result, never_negative = recompute(row["query"])
            assert row["solution"] == str(result)
            assert never_negative
            assert all(MIN_OPERAND <= x <= MAX_OPERAND for x in operands)
            assert len(operands) in (2, 3)
            three_terms += len(operands) == 3
        assert three_terms == len(rows) // 5, split
        assert len({r["query"] for r in rows}) == len(rows)  # no question twice in a split


def test_default_splits_have_the_documented_sizes_and_never_overlap(builtin):
    train, evaluation = records(builtin["train"]), records(builtin["eval"])
    assert (len(train), len(evaluation)) == (512, 128)
    assert not {r["query"] for r in train} & {r["query"] for r in evaluation}
    assert any(" - " in r["query"] for r in train) and any(" + " in r["query"] for r in train)


def test_splits_are_disjoint_for_any_seed_and_size(tmp_path):
    # The largest two-term draws there are: every two-term question of each split.
    train = records(generate_arith_dataset(tmp_path / "a", n=578, seed=7, split_name="train"))
    evaluation = records(generate_arith_dataset(tmp_path / "b", n=183, seed=7, split_name="eval"))
    train_q, eval_q = {r["query"] for r in train}, {r["query"] for r in evaluation}
    assert not train_q & eval_q
    assert {split_of(q) for q in train_q} == {"train"}
    assert {split_of(q) for q in eval_q} == {"eval"}
    with pytest.raises(ValueError, match="eval split has 147 2-term questions, 148 were asked"):
        generate_arith_dataset(tmp_path / "c", n=185, seed=7, split_name="eval")


def test_same_seed_same_bytes_other_seed_other_questions(tmp_path):
    first = generate_arith_dataset(tmp_path / "1", n=50, seed=3)
    again = generate_arith_dataset(tmp_path / "2", n=50, seed=3)
    other = generate_arith_dataset(tmp_path / "3", n=50, seed=4)
    assert first.read_bytes() == again.read_bytes()
    assert records(first) != records(other)
    with pytest.raises(ValueError, match="split must be one of"):
        generate_arith_dataset(tmp_path / "4", n=5, seed=3, split_name="test")
    with pytest.raises(ValueError, match="n must be >= 1"):
        generate_arith_dataset(tmp_path / "5", n=0, seed=3)


def test_arith_task_prompts_text_only_and_asks_for_a_box(builtin):
    task = get_task("arith")
    sample = load_samples(builtin["eval"])[0]
    assert sample.images == [] and sample.solution.isdigit()
    for evaluation in (False, True):
        messages = task.messages(sample, evaluation=evaluation)
        assert [m["role"] for m in messages] == ["user"]
        (part,) = messages[0]["content"]
        assert part["type"] == "text"
        assert part["text"] == sample.query + "\nPut your final answer in \\boxed{}."
    assert task.default_rewards == "number:1.0,boxed_number:1.0"
    assert task.eval_rewards.split(",")[0] == "number:1.0"  # evaluation accuracy reads this one


def test_arith_preset_is_sized_for_smollm2_on_cpu():
    from grpo.config import load_config

    config = load_config(["--task", "arith"])
    assert (config.model, config.num_generations, config.max_completion_length) == (
        "smollm2",
        8,
        64,
    )
    assert config.lora_r == 16 and config.learning_rate == 2e-4  # measured by bench/learn.py
    assert config.beta == 0.0 and config.temperature == 1.0
    assert config.rewards is None  # the task's default rewards


# ---------------------------------------------------------------------------------------------
# GSM8K's own format: {"question", "answer": "reasoning...\n#### 72"}

NATALIA = {
    "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as "
    "many clips in May. How many clips did Natalia sell altogether in April and May?",
    "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
}
BIG = {"question": "How many grams?", "answer": "10 * 123.4 = 1234\n#### 1,234"}
NEGATIVE = {"question": "What is 2 - 5?", "answer": "2 - 5 = -3\n#### -3"}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_gsm8k_solution_is_the_number_after_the_marker(tmp_path):
    data = write_jsonl(tmp_path / "gsm8k.jsonl", [NATALIA, BIG, NEGATIVE])
    samples = load_samples(data)
    assert [s.solution for s in samples] == ["72", "1234", "-3"]
    assert samples[0].query == NATALIA["question"]
    assert all(s.images == [] and "answer" not in s.columns for s in samples)
    text = get_task("gsm8k").messages(samples[0])[0]["content"][0]["text"]
    assert text.startswith(NATALIA["question"]) and "\\boxed{}" in text


def test_gsm8k_record_without_marker_names_its_line(tmp_path):
    broken = {"question": "How many?", "answer": "She has 5 apples."}
    data = write_jsonl(tmp_path / "gsm8k.jsonl", [NATALIA, BIG, broken])
    with pytest.raises(DataError, match=r"gsm8k\.jsonl:3: GSM8K 'answer' without its final") as e:
        load_samples(data)
    assert "gsm8k.jsonl:1 has one" in str(e.value)
    kept = load_samples(data, skip_bad=True)
    assert [s.solution for s in kept] == ["72", "1234"]


def test_gsm8k_marker_must_be_followed_by_a_number(tmp_path):
    data = write_jsonl(tmp_path / "g.jsonl", [{"question": "Q?", "answer": "so\n#### twelve"}])
    with pytest.raises(DataError, match=r"g\.jsonl:1: GSM8K 'answer' must end with '#### <n"):
        load_samples(data)


def test_plain_question_answer_file_is_not_gsm8k(tmp_path):
    plain = write_jsonl(
        tmp_path / "plain.jsonl",
        [{"question": "12 + 30 = ?", "answer": "42"}, {"question": "Name?", "answer": "Bob"}],
    )
    assert [s.solution for s in load_samples(plain)] == ["42", "Bob"]
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"question": "Q?", "answer": "42"}, NATALIA])
    with pytest.raises(DataError, match=r"mixed\.jsonl:2: 'answer' has a GSM8K '#### <number>'"):
        load_samples(mixed)


def test_gsm8k_parquet_as_hugging_face_ships_it(tmp_path):
    path = tmp_path / "main-test.parquet"
    table = pa.table({k: [NATALIA[k], BIG[k]] for k in ("question", "answer")})
    pq.write_table(table, path)
    assert [s.solution for s in load_samples(path)] == ["72", "1234"]
    pq.write_table(pa.table({"question": ["Q?"], "answer": ["no marker"]}), path)
    assert load_samples(path)[0].solution == "no marker"  # one plain record: format (e)
