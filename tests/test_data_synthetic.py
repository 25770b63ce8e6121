"""data.synthetic_ocr / data.synthetic_count: deterministic, well-formed, labels that render."""

from __future__ import annotations

import json
import random
import re
from collections import deque
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data import generate_count_dataset, generate_ocr_dataset, load_samples
from data.fonts import has_glyph, load_cjk_font
from data.synthetic_ocr import MAX_WIDTH, LineStyle, render_line


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*.png")}


def labels(jsonl: Path, key: str) -> list[str]:
    return [json.loads(line)[key] for line in jsonl.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def ocr_sets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ocr")
    return {
        "a": generate_ocr_dataset(root / "a", n=24, seed=5),
        "a_again": generate_ocr_dataset(root / "a_again", n=24, seed=5),
        "b": generate_ocr_dataset(root / "b", n=24, seed=6, split_name="eval"),
    }


def test_ocr_same_seed_gives_identical_files(ocr_sets):
    a, again = ocr_sets["a"], ocr_sets["a_again"]
    assert a.read_bytes() == again.read_bytes()
    assert folder_bytes(a.parent) == folder_bytes(again.parent)
    assert len(folder_bytes(a.parent)) == 24


def test_ocr_different_seed_gives_different_data(ocr_sets):
    a, b = ocr_sets["a"], ocr_sets["b"]
    assert labels(a, "response") != labels(b, "response")
    assert b.name == "eval.jsonl"
    assert all(p.startswith("images/eval_") for p in labels(b, "image_path"))


def test_ocr_output_is_format_a_with_relative_paths(ocr_sets):
    jsonl = ocr_sets["a"]
    records = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    assert all(set(r) == {"query", "response", "image_path"} for r in records)
    assert all(not Path(r["image_path"]).is_absolute() for r in records)
    samples = load_samples(jsonl)
    assert [s.solution for s in samples] == [r["response"] for r in records]
    assert all(s.query == "请识别图片中的文字" for s in samples)


def test_ocr_image_sizes_and_label_mix(ocr_sets):
    samples = load_samples(ocr_sets["a"]) + load_samples(ocr_sets["b"])
    for sample in samples:
        width, height = sample.images[0].open().size
        assert 32 <= height <= 48 and width <= MAX_WIDTH
    text = "".join(s.solution for s in samples)
    assert any("\u4e00" <= c <= "\u9fff" for c in text)  # Chinese
    assert any(c.isdigit() for c in text)
    assert any(c.isascii() and c.isalpha() for c in text)  # Latin
    assert re.search(r"¥\d+\.\d", text) and re.search(r"\d%", text)  # prices, percentages


def test_ocr_labels_render_as_glyphs(ocr_sets):
    """Every character of every label has a real glyph in the font used for rendering."""
    text = "".join(s.solution for s in load_samples(ocr_sets["a"]))
    font = load_cjk_font(24)
    assert [c for c in set(text) if not has_glyph(font, c)] == []


def test_rendered_line_has_ink_where_the_text_is():
    style = LineStyle(
        font_size=24,
        spacing=0,
        text_rgb=(0, 0, 0),
        left_rgb=(255, 255, 255),
        right_rgb=(255, 255, 255),
        noise_std=0.0,
        blur_radius=0.0,
    )
    pixels = np.asarray(
        render_line("字¥4%", style, random.Random(0), np.random.default_rng(0)).convert("L")
    )
    assert (pixels < 128).sum() > 50
    blank = np.asarray(
        render_line(" ", style, random.Random(0), np.random.default_rng(0)).convert("L")
    )
    assert (blank < 128).sum() == 0  # so the ink above comes from the glyphs


def count_blobs(image: Image.Image) -> int:
    """Connected components (4-neighbour) of pixels that differ from the corner colour."""
    pixels = np.asarray(image).astype(int)  # [H, W, 3]
    ink = np.abs(pixels - pixels[0, 0]).sum(axis=-1) > 30  # [H, W]
    seen = np.zeros_like(ink)
    height, width = ink.shape
    blobs = 0
    for y0, x0 in zip(*np.nonzero(ink), strict=True):
        if seen[y0, x0]:
            continue
        blobs += 1
        seen[y0, x0] = True
        queue = deque([(y0, x0)])
        while queue:
            y, x = queue.popleft()
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < height and 0 <= nx < width and ink[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
    return blobs


def test_count_images_show_exactly_the_labelled_number_of_shapes(tmp_path):
    samples = load_samples(generate_count_dataset(tmp_path, n=12, seed=3))
    counts = [int(s.solution) for s in samples]
    assert all(1 <= c <= 9 for c in counts) and len(set(counts)) > 3
    assert [count_blobs(s.images[0].open()) for s in samples] == counts
    assert samples[0].query == "How many shapes are in the image?"


def test_count_is_deterministic(tmp_path):
    a = generate_count_dataset(tmp_path / "a", n=10, seed=1)
    again = generate_count_dataset(tmp_path / "again", n=10, seed=1)
    b = generate_count_dataset(tmp_path / "b", n=10, seed=2)
    assert a.read_bytes() == again.read_bytes()
    assert folder_bytes(a.parent) == folder_bytes(again.parent)
    assert folder_bytes(a.parent) != folder_bytes(b.parent)


def test_generators_reject_empty_sets(tmp_path):
    with pytest.raises(ValueError, match="n must be >= 1"):
        generate_ocr_dataset(tmp_path, n=0, seed=0)
    with pytest.raises(ValueError, match="n must be >= 1"):
        generate_count_dataset(tmp_path, n=0, seed=0)


def test_docs_example_is_the_start_of_the_builtin_training_set(tmp_path):
    """docs/examples/ocr must stay what the generator makes (the first records of seed 1)."""
    docs = Path(__file__).resolve().parents[1] / "docs" / "examples" / "ocr" / "train.jsonl"
    shown = load_samples(docs)
    fresh = load_samples(generate_ocr_dataset(tmp_path, n=len(shown), seed=1))
    assert [s.solution for s in shown] == [s.solution for s in fresh]
    assert [s.images[0].open().size for s in shown] == [s.images[0].open().size for s in fresh]
