"""data.tasks: prompts, reward specs and built-in data of each task."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from data import DataError, ImageRef, Sample, available_tasks, get_task, load_samples
from data.synthetic_ocr import generate_ocr_dataset
from data.tasks import SyntheticData, Task


def sample(query: str = "", n_images: int = 1) -> Sample:
    images = [ImageRef(where="t.jsonl:1", path=Path(f"{i}.png")) for i in range(n_images)]
    return Sample(query=query, solution="x", images=images, columns={}, where="t.jsonl:1")


def test_registry():
    assert available_tasks() == ["ocr", "math", "count", "gsm8k", "arith"]
    assert get_task("count").name == "count"
    with pytest.raises(
        ValueError, match="unknown task 'ocrr'; available: ocr, math, count, gsm8k, arith"
    ):
        get_task("ocrr")


def test_ocr_prompts_follow_the_recipe():
    ocr = get_task("ocr")
    train = ocr.messages(sample(""))  # folder-format sample: no query, default one used
    assert train == [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": ocr.prompt_text(sample(""))}],
        }
    ]
    text = train[0]["content"][1]["text"]
    assert text.startswith("请识别图片中的文字")
    assert "<think></think>" in text and "<answer></answer>" in text
    eval_text = ocr.messages(sample(""), evaluation=True)[0]["content"][1]["text"]
    assert eval_text.startswith("请识别图片中的文字") and "只输出" in eval_text
    assert "<think>" not in eval_text
    assert "format" in ocr.default_rewards and "format" not in ocr.eval_rewards


def test_system_prompt_and_image_placeholders_in_order():
    count = get_task("count")
    messages = count.messages(sample("How many red cubes?", n_images=3))
    assert messages[0]["role"] == "system" and "<answer>" in messages[0]["content"]
    content = messages[1]["content"]
    assert content[:3] == [{"type": "image"}] * 3
    assert content[3] == {"type": "text", "text": "How many red cubes?"}


def test_text_only_gsm8k_keeps_braces():
    gsm8k = get_task("gsm8k")
    query = "If {x} = 3, what is 2x?"  # braces in a query must survive templating
    messages = gsm8k.messages(sample(query, n_images=0))
    assert len(messages) == 1
    (part,) = messages[0]["content"]
    assert part["text"].startswith(query) and "\\boxed{}" in part["text"]
    assert gsm8k.default_rewards == "boxed:1.0"


def test_empty_query_without_default_is_an_error():
    with pytest.raises(DataError, match=r"^t.jsonl:1: empty query, and task 'gsm8k'"):
        get_task("gsm8k").messages(sample("", n_images=0))


def test_reward_specs():
    expected = {
        "ocr": "ocr:1.0,format:0.5",
        "math": "math:1.0,format:0.5",
        "count": "count:1.0,format:0.5",
    }
    for name, spec in expected.items():
        assert get_task(name).default_rewards == spec


def test_template_must_have_query_slot():
    with pytest.raises(ValueError, match=r"has no \{query\}"):
        Task("bad", None, "no slot", "{query}", "", "format:1.0", "format:1.0")


def test_tasks_without_builtin_data_ask_for_data(tmp_path):
    for name in ("math", "gsm8k"):
        with pytest.raises(DataError, match="pass a data file or folder with --data"):
            get_task(name).default_data(tmp_path)
    with pytest.raises(ValueError, match="split must be one of"):
        get_task("ocr").default_data(tmp_path, "test")


def test_builtin_ocr_eval_data_loads(tmp_path):
    path = get_task("ocr").default_data(tmp_path, "eval")
    samples = load_samples(path)
    assert len(samples) == 64 and path.name == "eval.jsonl"
    messages = get_task("ocr").messages(samples[0], evaluation=True)
    assert messages[0]["content"][0] == {"type": "image"}


def test_builtin_count_train_data_loads(tmp_path):
    samples = load_samples(get_task("count").default_data(tmp_path, "train"))
    assert len(samples) == 256 and all(s.solution.isdigit() for s in samples)


def small_ocr_task() -> Task:
    ocr = get_task("ocr")
    builtin = SyntheticData(generate_ocr_dataset, version=1, train=(4, 1), eval=(3, 2))
    return Task(**{**ocr.__dict__, "builtin": builtin})


def test_default_data_is_built_once_and_cached(tmp_path):
    task = small_ocr_task()
    path = task.default_data(tmp_path)
    stamp = {p: p.stat().st_mtime_ns for p in path.parent.rglob("*")}
    assert task.default_data(tmp_path) == path  # second call: no rebuild
    assert {p: p.stat().st_mtime_ns for p in path.parent.rglob("*")} == stamp
    assert [p.name for p in tmp_path.iterdir()] == [path.parent.name]  # no temp folders left
    assert oct(path.parent.stat().st_mode & 0o777) == oct(0o755)


def test_default_data_is_deterministic_and_splits_differ(tmp_path):
    task = small_ocr_task()
    train_a = task.default_data(tmp_path / "a")
    train_b = task.default_data(tmp_path / "b")
    eval_a = task.default_data(tmp_path / "a", "eval")
    assert train_a.read_bytes() == train_b.read_bytes()
    train = [json.loads(line)["response"] for line in train_a.read_text("utf-8").splitlines()]
    evals = [json.loads(line)["response"] for line in eval_a.read_text("utf-8").splitlines()]
    assert len(train) == 4 and len(evals) == 3 and train[:3] != evals


def test_lost_race_keeps_the_winner(tmp_path, monkeypatch):
    """Another process finishing first: our rename fails, its folder is used, ours dropped."""
    task = small_ocr_task()
    winner = task.default_data(tmp_path / "other")
    real_rename = os.rename

    def other_process_won(src, dst):
        real_rename(winner.parent, dst)  # the other rank's finished folder appears first
        real_rename(src, dst)  # ENOTEMPTY, as for a real lost race

    monkeypatch.setattr(os, "rename", other_process_won)
    path = task.default_data(tmp_path / "mine")
    assert path.is_file() and len(load_samples(path)) == 4
    assert [p.name for p in (tmp_path / "mine").iterdir()] == [path.parent.name]
