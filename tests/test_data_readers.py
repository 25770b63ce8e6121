"""data.readers: the five formats on small files, and every bad-input case."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data import DataError, Sample, find_index_file, load_samples


def png_bytes(seed: int = 0, size: tuple[int, int] = (12, 8)) -> bytes:
    """A small noisy PNG (noise so that truncating it really cuts image data)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_png(path: Path, seed: int = 0, size: tuple[int, int] = (12, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(seed, size))
    return path


def write_jsonl(path: Path, lines: list[object | str]) -> Path:
    """Objects are dumped; strings are written verbatim (for blank or malformed lines)."""
    text = "".join(
        (line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n"
        for line in lines
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def image_size(sample: Sample, i: int = 0) -> tuple[int, int]:
    return sample.images[i].open().size


# --------------------------------------------------------------------------------------------
# (a) {"query", "response", "image_path"}


def test_format_a_relative_paths_text_only_and_blank_lines(tmp_path, monkeypatch):
    data_dir = tmp_path / "set"
    write_png(data_dir / "imgs" / "a.png", size=(12, 8))
    write_png(data_dir / "imgs" / "b.png", size=(20, 10))
    data = write_jsonl(
        data_dir / "train.jsonl",
        [
            {"query": "<image>请识别图片中的文字", "response": "你好", "image_path": "imgs/a.png"},
            "",
            {"query": "<image>\n读一下", "response": "¥476.0", "image_path": "imgs/b.png", "id": 7},
            {"query": "1+1=?", "response": "2"},  # text-only
        ],
    )
    monkeypatch.chdir(tmp_path)  # relative paths must not depend on the working directory
    samples = load_samples(data)
    assert [s.query for s in samples] == ["请识别图片中的文字", "读一下", "1+1=?"]
    assert [s.solution for s in samples] == ["你好", "¥476.0", "2"]
    assert [s.where for s in samples] == [f"{data}:1", f"{data}:3", f"{data}:4"]
    assert [image_size(s) for s in samples[:2]] == [(12, 8), (20, 10)]
    assert samples[0].images[0].path == data_dir / "imgs" / "a.png"
    assert samples[2].images == []
    assert samples[1].columns == {"id": 7}  # unconsumed fields become reward kwargs
    assert samples[0].columns == {}


def test_absolute_image_path(tmp_path):
    image = write_png(tmp_path / "elsewhere" / "x.png")
    data = write_jsonl(
        tmp_path / "d" / "x.jsonl", [{"query": "q", "response": "r", "image_path": str(image)}]
    )
    assert load_samples(data)[0].images[0].path == image


# --------------------------------------------------------------------------------------------
# (b) folder + index file


def make_ocr_folder(folder: Path, index_name: str = "labels.txt") -> Path:
    write_png(folder / "img_0.png", seed=1)
    write_png(folder / "sub" / "img_1.png", seed=2)
    index = folder / index_name
    index.write_text("img_0.png\t今天天气很好\n\nsub/img_1.png\t合计 ¥12.5\n", encoding="utf-8")
    return index


def test_format_b_folder_with_labels_txt(tmp_path):
    index = make_ocr_folder(tmp_path / "ocr")
    samples = load_samples(tmp_path / "ocr")
    assert [s.solution for s in samples] == ["今天天气很好", "合计 ¥12.5"]
    assert [s.query for s in samples] == ["", ""]  # the task's default query fills it in
    assert [s.where for s in samples] == [f"{index}:1", f"{index}:3"]
    assert samples[1].images[0].path == tmp_path / "ocr" / "sub" / "img_1.png"


def test_format_b_index_found_by_tab_rule_and_given_directly(tmp_path):
    index = make_ocr_folder(tmp_path / "ocr", index_name="train_list.txt")
    (tmp_path / "ocr" / "README.txt").write_text("no tabs here\n", encoding="utf-8")
    assert find_index_file(tmp_path / "ocr") == index
    assert len(load_samples(tmp_path / "ocr")) == 2
    assert len(load_samples(index)) == 2  # the index file itself is also a valid path


def test_format_b_ambiguous_or_missing_index(tmp_path):
    make_ocr_folder(tmp_path / "two", index_name="train.txt")
    (tmp_path / "two" / "test.txt").write_text("img_0.png\tx\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"several index files \(test.txt, train.txt\)"):
        load_samples(tmp_path / "two")
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match="no index file found"):
        load_samples(tmp_path / "none")


def test_format_b_malformed_lines(tmp_path):
    make_ocr_folder(tmp_path / "ocr")
    index = tmp_path / "ocr" / "labels.txt"
    index.write_text("img_0.png\tok\nimg_0.png no tab\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{index}:2: malformed line"):
        load_samples(index)
    index.write_text("img_0.png\tok\nimg_0.png\t  \n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{index}:2: missing text label"):
        load_samples(index)


# --------------------------------------------------------------------------------------------
# (c) ms-swift {"messages" | "query", "images", "solution"}


def test_format_c_messages_query_and_content_parts(tmp_path):
    write_png(tmp_path / "p.png", seed=3)
    write_png(tmp_path / "q.png", seed=4)
    data = write_jsonl(
        tmp_path / "c.jsonl",
        [
            {
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "first question"},
                    {"role": "assistant", "content": "first answer"},
                    {"role": "user", "content": "<image><image>Which is larger?"},
                ],
                "images": ["p.png", "q.png"],
                "solution": "the left one",
                "difficulty": "easy",
            },
            {  # no "solution": the assistant message is the answer
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "How many?"}]},
                    {"role": "assistant", "content": "3"},
                ],
                "images": "p.png",
            },
            {"query": "<image>Count them.", "images": ["q.png"], "solution": 5},
        ],
    )
    first, second, third = load_samples(data)
    assert (first.query, first.solution, len(first.images)) == (
        "Which is larger?",
        "the left one",
        2,
    )
    assert first.columns == {"difficulty": "easy"}
    assert [r.path.name for r in first.images] == ["p.png", "q.png"]
    assert (second.query, second.solution, len(second.images)) == ("How many?", "3", 1)
    assert (third.query, third.solution) == ("Count them.", "5")  # numbers are stringified


def test_format_c_without_user_or_solution(tmp_path):
    data = write_jsonl(
        tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"}], "images": []}]
    )
    with pytest.raises(DataError, match=rf"^{data}:1: missing field 'solution'"):
        load_samples(data)
    write_jsonl(data, [{"messages": [{"role": "assistant", "content": "x"}], "solution": "y"}])
    with pytest.raises(DataError, match=rf"^{data}:1: .*no message with role 'user'"):
        load_samples(data)


# --------------------------------------------------------------------------------------------
# (d) LLaVA / VLM-R1 {"image", "conversations"}


def test_format_d_jsonl_image_string_and_list(tmp_path):
    write_png(tmp_path / "img" / "1.png", seed=5)
    write_png(tmp_path / "img" / "2.png", seed=6)
    data = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {
                "id": "x1",
                "image": "img/1.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat colour is the box?"},
                    {"from": "gpt", "value": "red"},
                ],
            },
            {
                "image": ["img/1.png", "img/2.png"],
                "conversations": [
                    {"from": "human", "value": "<image><image>Same picture?"},
                    {"from": "gpt", "value": "no"},
                ],
            },
            {"conversations": [{"from": "human", "value": "2+3?"}, {"from": "gpt", "value": "5"}]},
        ],
    )
    samples = load_samples(data)
    assert [(s.query, s.solution, len(s.images)) for s in samples] == [
        ("What colour is the box?", "red", 1),
        ("Same picture?", "no", 2),
        ("2+3?", "5", 0),
    ]
    assert samples[0].columns == {"id": "x1"}


def test_format_d_json_array_reports_line_numbers(tmp_path):
    write_png(tmp_path / "1.png")
    records = [
        {
            "image": "1.png",
            "conversations": [
                {"from": "human", "value": "<image>a"},
                {"from": "gpt", "value": "b"},
            ],
        },
        {
            "image": "missing.png",
            "conversations": [
                {"from": "human", "value": "<image>c"},
                {"from": "gpt", "value": "d"},
            ],
        },
    ]
    data = tmp_path / "llava.json"
    data.write_text(json.dumps(records, indent=2), encoding="utf-8")
    second_line = data.read_text().splitlines().index("  {", 2) + 1  # where record 2 starts
    assert load_samples(data, limit=1)[0].where == f"{data}:2"
    with pytest.raises(DataError, match=rf"^{data}:{second_line}: image file not found"):
        load_samples(data)


def test_format_d_missing_gpt_turn(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"conversations": [{"from": "human", "value": "q"}]}])
    with pytest.raises(DataError, match=rf"^{data}:1: .*no 'gpt' turn"):
        load_samples(data)


# --------------------------------------------------------------------------------------------
# (e) Parquet with image bytes


def write_parquet(path: Path, columns: dict[str, list]) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def test_format_e_hf_image_structs_and_text_only_rows(tmp_path):
    image_a, image_b = png_bytes(7, (16, 9)), png_bytes(8, (5, 4))
    data = write_parquet(
        tmp_path / "train-00000.parquet",
        {
            "image": [{"bytes": image_a, "path": None}, None, {"bytes": image_b, "path": "b.png"}],
            "problem": ["<image>How many cubes?", "What is 2+2?", "Count."],
            "solution": ["<answer> 3 </answer>", "4", "1"],
            "source": ["clevr", "text", "clevr"],
        },
    )
    samples = load_samples(data)
    assert [s.query for s in samples] == ["How many cubes?", "What is 2+2?", "Count."]
    assert [s.solution for s in samples] == ["<answer> 3 </answer>", "4", "1"]
    assert [len(s.images) for s in samples] == [1, 0, 1]
    assert image_size(samples[0]) == (16, 9) and image_size(samples[2]) == (5, 4)
    assert [s.where for s in samples] == [f"{data}:row {i}" for i in range(3)]
    assert samples[1].columns == {"source": "text"}


def test_format_e_raw_bytes_lists_and_question_answer_columns(tmp_path):
    data = write_parquet(
        tmp_path / "x.parquet",
        {
            "images": [[png_bytes(1), png_bytes(2)], [png_bytes(3)]],
            "question": ["<image><image>same?", "ok?"],
            "answer": ["no", "yes"],
        },
    )
    samples = load_samples(data)
    assert [len(s.images) for s in samples] == [2, 1]
    assert samples[0].images[0].data == png_bytes(1)


def test_format_e_missing_column_and_corrupt_bytes(tmp_path):
    data = write_parquet(tmp_path / "bad.parquet", {"problem": ["q"], "label": ["a"]})
    with pytest.raises(DataError, match=rf"^{data}: missing column 'solution' or 'answer'"):
        load_samples(data)
    good = png_bytes(1)
    data = write_parquet(
        tmp_path / "corrupt.parquet",
        {"image": [good, good[: len(good) // 2]], "problem": ["a", "b"], "solution": ["1", "2"]},
    )
    with pytest.raises(DataError, match=rf"^{data}:row 1: cannot read image"):
        load_samples(data)


def test_format_e_not_a_parquet_file(tmp_path):
    data = tmp_path / "fake.parquet"
    data.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=rf"^{data}: cannot read Parquet file"):
        load_samples(data)


# --------------------------------------------------------------------------------------------
# bad input: reported with file and line, the run stops


@pytest.fixture
def one_good(tmp_path) -> dict:
    write_png(tmp_path / "good.png")
    return {"query": "<image>q", "response": "r", "image_path": "good.png"}


def test_missing_image(tmp_path, one_good):
    data = write_jsonl(tmp_path / "t.jsonl", [one_good, {**one_good, "image_path": "nope.png"}])
    with pytest.raises(DataError, match=rf"^{data}:2: image file not found: .*nope.png"):
        load_samples(data)


def test_corrupt_image_truncated_png(tmp_path, one_good):
    good = png_bytes(9, (30, 20))
    (tmp_path / "cut.png").write_bytes(good[: len(good) // 2])
    data = write_jsonl(tmp_path / "t.jsonl", [one_good, {**one_good, "image_path": "cut.png"}])
    with pytest.raises(DataError, match=rf"^{data}:2: cannot read image .*cut.png"):
        load_samples(data)


def test_not_an_image(tmp_path, one_good):
    (tmp_path / "text.png").write_text("hello", encoding="utf-8")
    data = write_jsonl(tmp_path / "t.jsonl", [{**one_good, "image_path": "text.png"}])
    with pytest.raises(DataError, match=rf"^{data}:1: cannot read image"):
        load_samples(data)


def test_malformed_json_line(tmp_path, one_good):
    data = write_jsonl(tmp_path / "t.jsonl", [one_good, one_good, '{"query": "x", "response": '])
    with pytest.raises(DataError, match=rf"^{data}:3: malformed JSON"):
        load_samples(data)
    write_jsonl(data, [one_good, "[1, 2]"])
    with pytest.raises(DataError, match=rf"^{data}:2: expected a JSON object, got list"):
        load_samples(data)


@pytest.mark.parametrize(
    ("drop", "message"),
    [("response", "missing field 'solution'"), ("query", "missing field 'query'")],
)
def test_missing_field(tmp_path, one_good, drop, message):
    broken = {k: v for k, v in one_good.items() if k != drop}
    data = write_jsonl(tmp_path / "t.jsonl", [one_good, one_good, broken])
    with pytest.raises(DataError, match=rf"^{data}:3: {message}"):
        load_samples(data)


def test_wrong_field_types(tmp_path, one_good):
    data = write_jsonl(tmp_path / "t.jsonl", [{**one_good, "response": ["a", "b"]}])
    with pytest.raises(DataError, match=rf"^{data}:1: field 'response' must be a string"):
        load_samples(data)
    write_jsonl(data, [{**one_good, "query": 3}])
    with pytest.raises(DataError, match=rf"^{data}:1: field 'query' must be a string"):
        load_samples(data)


def test_image_tag_count_must_match_images(tmp_path, one_good):
    data = write_jsonl(tmp_path / "t.jsonl", [{**one_good, "query": "<image><image>q"}])
    with pytest.raises(DataError, match=rf"^{data}:1: the query has 2 <image> tag\(s\) but 1"):
        load_samples(data)


def test_nothing_to_ask(tmp_path):
    data = write_jsonl(tmp_path / "t.jsonl", [{"query": "", "response": "r"}])
    with pytest.raises(DataError, match=rf"^{data}:1: empty query and no image"):
        load_samples(data)


def test_remote_image_url_is_rejected(tmp_path, one_good):
    data = write_jsonl(tmp_path / "t.jsonl", [{**one_good, "image_path": "https://x.org/a.png"}])
    with pytest.raises(DataError, match=rf"^{data}:1: remote/inline image"):
        load_samples(data)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, content):
    data = tmp_path / "empty.jsonl"
    data.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{data}: no samples: the file is empty"):
        load_samples(data)


def test_empty_index_and_parquet(tmp_path):
    index = tmp_path / "labels.txt"
    index.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="the file is empty"):
        load_samples(index)
    data = write_parquet(
        tmp_path / "e.parquet",
        {"problem": pa.array([], pa.string()), "solution": pa.array([], pa.string())},
    )
    with pytest.raises(DataError, match="the file is empty"):
        load_samples(data)


def test_missing_path_and_unknown_extension(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        load_samples(tmp_path / "nope.jsonl")
    (tmp_path / "data.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"unknown data format '\.csv'"):
        load_samples(tmp_path / "data.csv")


def test_invalid_utf8_line(tmp_path, one_good):
    data = tmp_path / "t.jsonl"
    data.write_bytes(json.dumps(one_good).encode() + b"\n" + b'{"query": "\xff"}\n')
    with pytest.raises(DataError, match=rf"^{data}:2: not valid UTF-8"):
        load_samples(data)


# --------------------------------------------------------------------------------------------
# skip_bad and limit


def test_skip_bad_reports_count_and_first_examples(tmp_path, one_good, caplog):
    lines = [
        one_good,
        {**one_good, "image_path": "nope.png"},  # line 2
        "{broken",  # line 3
        one_good,
        {"query": "q"},  # line 5
        one_good,
    ]
    data = write_jsonl(tmp_path / "t.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="data.readers"):
        samples = load_samples(data, skip_bad=True)
    assert [s.where for s in samples] == [f"{data}:1", f"{data}:4", f"{data}:6"]
    (record,) = caplog.records
    message = record.getMessage()
    assert "skipped 3 bad sample(s) of 6" in message
    for line in (2, 3, 5):
        assert f"{data}:{line}:" in message


def test_skip_bad_quotes_at_most_five(tmp_path, one_good, caplog):
    bad = [{**one_good, "image_path": f"missing{i}.png"} for i in range(8)]
    data = write_jsonl(tmp_path / "t.jsonl", [one_good, *bad])
    with caplog.at_level(logging.WARNING, logger="data.readers"):
        assert len(load_samples(data, skip_bad=True)) == 1
    message = caplog.records[0].getMessage()
    assert "skipped 8 bad sample(s) of 9" in message
    assert "missing4.png" in message and "missing5.png" not in message


def test_skip_bad_with_nothing_left(tmp_path):
    data = write_jsonl(tmp_path / "t.jsonl", ["{oops", {"query": "q"}])
    with pytest.raises(DataError, match=rf"^{data}: no valid samples, all 2 are bad"):
        load_samples(data, skip_bad=True)


def test_file_level_errors_are_not_skipped(tmp_path):
    data = write_parquet(tmp_path / "bad.parquet", {"text": ["q"]})
    with pytest.raises(DataError, match="missing column"):
        load_samples(data, skip_bad=True)


def test_limit_stops_reading(tmp_path, one_good):
    data = write_jsonl(tmp_path / "t.jsonl", [one_good, one_good, "{not read"])
    assert len(load_samples(data, limit=2)) == 2
    with pytest.raises(ValueError, match="limit"):
        load_samples(data, limit=0)


def test_json_file_with_jsonl_content_and_broken_array(tmp_path, one_good):
    data = write_jsonl(tmp_path / "lines.json", [one_good, one_good])
    assert [s.where for s in load_samples(data)] == [f"{data}:1", f"{data}:2"]
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"query": "q", "response": "r"},\n  {"query": }\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{broken}:3: malformed JSON"):
        load_samples(broken)
    unterminated = tmp_path / "open.json"
    unterminated.write_text('[{"query": "q", "response": "r"},\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{unterminated}:2: malformed JSON: unterminated array"):
        load_samples(unterminated)
