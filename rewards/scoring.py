"""Scoring greedy answers on a validation set: the metrics evaluate.py reports.

Metrics are computed on two views of each completion: "raw", the completion stripped, and
"answer", the content of its last <answer>...</answer> block (the whole completion when there
is none):
- text tasks (main reward `ocr`): text accuracy, CER, exact match (rewards/ocr_metrics.py);
- other tasks: accuracy = fraction of samples whose main reward is 1. The raw view scores the
  completion as the trainer's reward does; the answer view scores the extracted answer wrapped
  in <answer> tags, so a reward that reads only the answer block also accepts a bare answer;
- every task: format rate (the <think>..</think><answer>..</answer> layout) and the mean of
  each reward on the raw completion.
Samples are anything with .solution, .columns and .where (data.sample.Sample).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from rewards.answer import answer_or_text
from rewards.compute import sample_columns, score_completions
from rewards.format import follows_format
from rewards.ocr_metrics import edit_distance, exact_match, ocr_metrics, text_accuracy

TEXT_REWARDS = ("ocr",)  # a task whose main reward is one of these is scored as text
VIEWS = ("raw", "answer")


def views(text: str) -> dict[str, str]:
    """The two views of a completion that metrics are computed on (module docstring)."""
    return {"raw": text.strip(), "answer": answer_or_text(text)}


def nan_mean(values: list[float | None]) -> float:
    """Mean over the values that are not None/NaN; NaN when there are none."""
    known = [v for v in values if v is not None and not math.isnan(v)]
    return sum(known) / len(known) if known else float("nan")


def text_metrics(texts: list[str], samples: Sequence[Any]) -> tuple[list[dict], dict[str, float]]:
    """Per-sample and corpus text accuracy / CER / exact match, on both views."""
    labels = [answer_or_text(s.solution) for s in samples]
    rows: list[dict[str, float]] = [{} for _ in texts]
    summary: dict[str, float] = {}
    for view in VIEWS:
        predictions = [views(t)[view] for t in texts]
        for row, p, g in zip(rows, predictions, labels, strict=True):
            row[f"text_accuracy/{view}"] = text_accuracy(p, g)
            row[f"exact_match/{view}"] = exact_match(p, g)
            row[f"edit_distance/{view}"] = edit_distance(p, g)
        for name, value in ocr_metrics(predictions, labels).items():
            summary[f"{name}/{view}"] = value
    return rows, summary


def accuracy_metrics(
    texts: list[str], samples: Sequence[Any], main_reward: str
) -> tuple[list[dict], dict[str, float | None]]:
    """accuracy/<view>: the main reward equals 1 (None where it does not apply)."""
    columns, where = sample_columns(samples, 1)
    rows: list[dict[str, float | None]] = [{} for _ in texts]
    summary: dict[str, float] = {}
    for view in VIEWS:
        inputs = texts if view == "raw" else [f"<answer>{views(t)[view]}</answer>" for t in texts]
        scores, _ = score_completions([(main_reward, 1.0)], inputs, columns, where)  # [N, 1]
        for row, value in zip(rows, scores[:, 0].tolist(), strict=True):
            row[f"accuracy/{view}"] = None if math.isnan(value) else float(value == 1.0)
        summary[f"accuracy/{view}"] = nan_mean([r[f"accuracy/{view}"] for r in rows])
    return rows, summary


def score_predictions(
    main_reward: str,
    samples: Sequence[Any],
    texts: list[str],
    specs: list[tuple[str, float]],
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """(per-sample metric dicts, corpus metrics) for the decoded completions. `main_reward`
    decides the headline metrics: text metrics for a text reward, else accuracy."""
    if main_reward in TEXT_REWARDS:
        rows, summary = text_metrics(texts, samples)
    else:
        rows, summary = accuracy_metrics(texts, samples, main_reward)
    formats = [float(follows_format(t)) for t in texts]
    summary["format_rate"] = nan_mean(formats)
    columns, where = sample_columns(samples, 1)
    per_function, _ = score_completions(specs, texts, columns, where)  # [N, K]
    for k, (name, _) in enumerate(specs):
        values = [None if math.isnan(v) else v for v in per_function[:, k].tolist()]
        summary[f"reward/{name}"] = nan_mean(values)
        for row, value in zip(rows, values, strict=True):
            row[f"reward/{name}"] = value
    for row, value in zip(rows, formats, strict=True):
        row["format"] = value
    return rows, summary
