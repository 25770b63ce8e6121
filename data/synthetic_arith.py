"""Built-in arithmetic questions for text-only models: "What is 14 + 7?" -> "21".

Two kinds of question, operands 1..20 (`MIN_OPERAND`..`MAX_OPERAND`), results never negative:
- two terms (4 in 5 questions): a + b, or a - b with a >= b;
- three terms (1 in 5): a + b + c, a + b - c, a - b + c, a - b - c, kept when every partial
  result and the final one are >= 0 (evaluated left to right).
The gold is the result as a decimal integer string.

Train and eval never share a question, whatever the seeds and sizes: each possible question
belongs to exactly one split, fixed by a hash of its text (`split_of`: sha256, so the same on
every machine and Python version); a split's `n` questions are drawn without replacement from
its own pool with `random.Random(seed)`. About 1 in 4 questions belongs to eval.

Output (format (c) without messages, text-only; docs/data_formats.md):

    out_dir/<split>.jsonl   {"query": "What is 14 + 7?", "solution": "21"}
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from pathlib import Path

GENERATOR_VERSION = 1  # bump when the output for a seed changes: built-in data caches key on it
MIN_OPERAND, MAX_OPERAND = 1, 20
THREE_TERM_EVERY = 5  # one question in this many has three terms
EVAL_SHARE = 4  # one question in this many (by hash) belongs to the eval split
SPLIT_NAMES = ("train", "eval")


def question_text(operands: tuple[int, ...], operators: tuple[str, ...]) -> str:
    """("14", "7"), ("+",) -> "What is 14 + 7?"."""
    expression = str(operands[0])
    for operator, operand in zip(operators, operands[1:], strict=True):
        expression += f" {operator} {operand}"
    return f"What is {expression}?"


def evaluate(operands: tuple[int, ...], operators: tuple[str, ...]) -> list[int]:
    """The partial results left to right: [a, a op b, (a op b) op c, ...]."""
    results = [operands[0]]
    for operator, operand in zip(operators, operands[1:], strict=True):
        results.append(results[-1] + operand if operator == "+" else results[-1] - operand)
    return results


def split_of(question: str) -> str:
    """ "eval" for about 1 in EVAL_SHARE questions, "train" otherwise; a pure function of the
    text, so the two splits are disjoint by construction."""
    digest = hashlib.sha256(f"vl-grpo arith: {question}".encode()).digest()
    return "eval" if int.from_bytes(digest[:8], "big") % EVAL_SHARE == 0 else "train"


def question_pool(terms: int, split: str) -> list[tuple[str, str]]:
    """Every (question, gold) with `terms` operands that belongs to `split`, in a fixed order."""
    if split not in SPLIT_NAMES:
        raise ValueError(f"split must be one of {SPLIT_NAMES}, got {split!r}")
    operand_range = range(MIN_OPERAND, MAX_OPERAND + 1)
    pool = []
    for operands in itertools.product(operand_range, repeat=terms):
        for operators in itertools.product("+-", repeat=terms - 1):
            results = evaluate(operands, operators)
            if min(results) < 0:  # keep every step non-negative: no negative numbers at all
                continue
            question = question_text(operands, operators)
            if split_of(question) == split:
                pool.append((question, str(results[-1])))
    return pool


def generate_arith_dataset(out_dir: Path, n: int, seed: int, split_name: str = "train") -> Path:
    """Write `n` distinct questions of `split_name` to out_dir/<split_name>.jsonl; return it.

    n // THREE_TERM_EVERY of them have three terms; their order is shuffled. ValueError when
    n exceeds what the split holds (463 two-term train questions, 147 eval).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = random.Random(seed)
    n_three = n // THREE_TERM_EVERY
    chosen: list[tuple[str, str]] = []
    for terms, count in ((2, n - n_three), (3, n_three)):
        pool = question_pool(terms, split_name)
        if count > len(pool):
            raise ValueError(
                f"{split_name} split has {len(pool)} {terms}-term questions, {count} were asked for"
            )
        chosen += rng.sample(pool, count)
    rng.shuffle(chosen)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = out_dir / f"{split_name}.jsonl"
    with jsonl.open("w", encoding="utf-8") as f:
        for question, gold in chosen:
            f.write(json.dumps({"query": question, "solution": gold}) + "\n")
    return jsonl
