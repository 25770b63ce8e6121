"""Bad inputs that used to pass validation and then fail or mislead later, the image-check
cache, parallel checking and lazy Parquet reading."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import data.readers as readers
import data.sample as sample_module
import data.validation as validation
from data import DataError, ImageRef, load_samples
from data.images import MAX_ASPECT_RATIO, image_size_problem


def write_png(path: Path, image: Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def record(image: str, answer: str = "ok") -> dict:
    return {"query": "<image>read it", "response": answer, "image_path": image}


def tree_state(folder: Path) -> dict[str, tuple[str, int]]:
    """Content hash and mtime of every file below `folder`: evidence that nothing changed."""
    state = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            digest = hashlib.sha256(p.read_bytes()).hexdigest()
            state[str(p.relative_to(folder))] = (digest, p.stat().st_mtime_ns)
    return state


@pytest.fixture(autouse=True)
def fresh_notes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sees its own once-per-process warnings."""
    monkeypatch.setattr(sample_module, "_said", set())


# --------------------------------------------------------------------------------------------
# 1. images that passed the check and failed or misled later


def test_extreme_aspect_ratio_fails_up_front_with_file_and_line(tmp_path: Path) -> None:
    write_png(tmp_path / "ok.png", noise((40, 20)))
    write_png(tmp_path / "strip.png", noise((3000, 10)))
    data = write_jsonl(tmp_path / "t.jsonl", [record("ok.png"), record("strip.png")])
    before = tree_state(tmp_path)
    with pytest.raises(DataError) as error:
        load_samples(data, cache=False)
    message = str(error.value)
    assert message.startswith(f"{data}:2: ")
    assert str(tmp_path / "strip.png") in message and "aspect ratio 300.0 exceeds 200" in message
    assert tree_state(tmp_path) == before


def test_the_training_resize_applies_the_same_rule() -> None:
    from models.processor import fit_image, fitted_size

    assert image_size_problem(3000, 10) is not None
    assert image_size_problem(MAX_ASPECT_RATIO * 10, 10) is None  # exactly 200 passes
    with pytest.raises(ValueError, match=r"3000x10: aspect ratio 300\.0 exceeds 200"):
        fitted_size(10, 3000, 4 * 784, 1280 * 784)
    with pytest.raises(ValueError, match="aspect ratio"):
        fit_image(Image.new("RGB", (10, 3000)), 4 * 784, 1280 * 784)


def test_extreme_aspect_ratio_is_skippable_and_counted(tmp_path: Path, caplog) -> None:
    write_png(tmp_path / "ok.png", noise((40, 20)))
    write_png(tmp_path / "strip.png", noise((10, 3000)))
    data = write_jsonl(tmp_path / "t.jsonl", [record("strip.png"), record("ok.png")])
    with caplog.at_level(logging.WARNING, logger="data.readers"):
        samples = load_samples(data, skip_bad=True, cache=False)
    assert [s.where for s in samples] == [f"{data}:2"]
    assert "skipped 1 bad sample(s) of 2" in caplog.text and f"{data}:1: " in caplog.text


def test_text_drawn_in_alpha_is_composited_on_white(tmp_path: Path) -> None:
    pixels = np.zeros((20, 30, 4), dtype=np.uint8)  # RGB all black everywhere
    pixels[5:15, 10:20, 3] = 255  # the "text": opaque only here
    pixels[0:5, 0:5, 3] = 128  # half transparent black -> mid grey
    path = write_png(tmp_path / "alpha.png", Image.fromarray(pixels, "RGBA"))
    image = np.asarray(ImageRef(where="t.jsonl:1", path=path).open())
    assert image.shape == (20, 30, 3)
    assert (image[5:15, 10:20] == 0).all()  # text stays black
    assert (image[16:, :] == 255).all() and (image[:, 21:] == 255).all()  # background white
    assert abs(int(image[2, 2, 0]) - 127) <= 1


def transparent_pngs() -> dict[str, bytes]:
    """An 8x8 image, black and opaque at (1, 1), transparent elsewhere, in three encodings."""
    la = Image.new("LA", (8, 8), (0, 0))
    la.putpixel((1, 1), (0, 255))
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0, 0, 0, 0])  # index 0 transparent black, index 1 black
    palette.putpixel((1, 1), 1)
    rgb_key = Image.new("RGB", (8, 8), (0, 0, 1))  # tRNS colour key: (0, 0, 1) is transparent
    rgb_key.putpixel((1, 1), (0, 0, 0))
    out = {}
    for name, image, options in [
        ("LA", la, {}),
        ("P", palette, {"transparency": 0}),
        ("RGB+tRNS", rgb_key, {"transparency": (0, 0, 1)}),
    ]:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", **options)
        out[name] = buffer.getvalue()
    return out


@pytest.mark.parametrize("name", ["LA", "P", "RGB+tRNS"])
def test_other_transparent_modes_are_composited_on_white(name: str) -> None:
    encoded = transparent_pngs()[name]
    pixels = np.asarray(ImageRef(where="x:row 0", data=encoded).open())
    assert (pixels[1, 1] == 0).all() and (pixels[0, 0] == 255).all()


def test_full_range_16_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257 * 128, 65535], [257, 257 * 200, 65535 // 2]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    pixels = np.asarray(ImageRef(where="t.jsonl:4", path=path).open())
    assert pixels[..., 0].tolist() == [[0, 128, 255], [1, 200, 127]]
    assert (pixels[..., 0] == pixels[..., 1]).all()  # grey stays grey


def test_32_bit_integer_images_by_their_value_range(tmp_path: Path) -> None:
    cases = {
        "small": (np.array([[0, 100, 255]]), [0, 100, 255]),  # 8-bit values in an I image
        "wide": (np.array([[0, 257 * 64, 65535]]), [0, 64, 255]),  # 16-bit values
        "huge": (np.array([[-1000, 0, 99000]]), [0, 3, 255]),  # stretched min..max
    }
    for name, (values, expected) in cases.items():
        path = tmp_path / f"{name}.tif"
        Image.fromarray(values.astype(np.int32), "I").save(path)
        assert Image.open(path).mode == "I"
        pixels = np.asarray(ImageRef(where="t.jsonl:1", path=path).open())
        assert pixels[0, :, 0].tolist() == expected, name


def test_animated_gif_warns_with_file_and_line_and_uses_frame_one(tmp_path: Path, caplog) -> None:
    frames = [Image.new("RGB", (16, 16), color) for color in ("red", "lime", "blue")]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    data = write_jsonl(tmp_path / "t.jsonl", [record("anim.gif")])
    with caplog.at_level(logging.WARNING):
        (sample,) = load_samples(data, cache=False)
        pixels = np.asarray(sample.images[0].open())
        sample.images[0].open()  # training opens it again: no second warning
    assert pixels[8, 8].tolist() == [255, 0, 0]
    warnings = [r.getMessage() for r in caplog.records if "frames" in r.getMessage()]
    assert warnings == [f"{data}:1: image {path} has 3 frames (GIF); using the first"]


# --------------------------------------------------------------------------------------------
# 2. empty solutions


@pytest.mark.parametrize("answer", ["", "   \t "])
def test_empty_solution_is_a_bad_record_naming_line_and_field(tmp_path: Path, answer: str) -> None:
    write_png(tmp_path / "a.png", noise((20, 20)))
    data = write_jsonl(tmp_path / "t.jsonl", [record("a.png"), record("a.png", answer)])
    with pytest.raises(DataError, match=rf"^{data}:2: field 'response' is empty"):
        load_samples(data, cache=False)


def test_empty_solution_skipped_and_counted_or_allowed_for_evaluation(tmp_path, caplog) -> None:
    write_png(tmp_path / "a.png", noise((20, 20)))
    lines = [record("a.png"), record("a.png", ""), {"query": "q", "solution": " "}]
    data = write_jsonl(tmp_path / "t.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="data.readers"):
        kept = load_samples(data, skip_bad=True, cache=False)
    assert [s.where for s in kept] == [f"{data}:1"]
    assert "skipped 2 bad sample(s) of 3" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="data.readers"):
        loaded = load_samples(data, allow_empty_solution=True, cache=False)
    assert [s.solution for s in loaded] == ["ok", "", " "]
    assert "loaded 2 sample(s) with an empty solution" in caplog.text
    assert f"{data}:2, {data}:3" in caplog.text


def test_empty_label_in_an_ocr_folder(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png", noise((20, 20)))
    index = tmp_path / "labels.txt"
    index.write_text("a.png\tgood\na.png\t   \n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{index}:2: missing text label"):
        load_samples(tmp_path, cache=False)
    assert [s.solution for s in load_samples(tmp_path, allow_empty_solution=True)] == ["good", ""]


# --------------------------------------------------------------------------------------------
# 3. the image-check cache and parallel checking


def image_set(folder: Path, n: int = 6) -> Path:
    """n images, one of them unreadable (line 3) and one animated (line 5)."""
    for i in range(n):
        write_png(folder / f"{i}.png", noise((24, 16), seed=i))
    (folder / "2.png").write_bytes(b"not a png")
    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "blue")]
    frames[0].save(folder / "4.gif", save_all=True, append_images=frames[1:])
    names = [f"{i}.png" if i != 4 else "4.gif" for i in range(n)]
    return write_jsonl(folder / "t.jsonl", [record(name) for name in names])


@pytest.fixture
def count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every ImageRef.decode in this process, by line; caching on for any size."""
    calls: list[str] = []
    original = ImageRef.decode

    def counted(self: ImageRef):
        calls.append(self.where)
        return original(self)

    monkeypatch.setattr(ImageRef, "decode", counted)
    monkeypatch.setattr(readers, "CACHE_MIN_IMAGES", 0)
    return calls


def test_restart_reads_the_cache_instead_of_decoding(tmp_path, count_decodes, caplog) -> None:
    data = image_set(tmp_path / "set")
    cache = tmp_path / "cache"
    before = tree_state(tmp_path / "set")
    with caplog.at_level(logging.WARNING):
        first = load_samples(data, skip_bad=True, workers=1, cache=cache)
    assert len(count_decodes) == 6 and len(list(cache.glob("*.json"))) == 1
    first_log = caplog.text
    caplog.clear()
    sample_module._said.clear()  # a restart is a new process
    with caplog.at_level(logging.WARNING):
        again = load_samples(data, skip_bad=True, workers=1, cache=cache)
    assert len(count_decodes) == 6  # nothing decoded the second time
    assert [s.where for s in again] == [s.where for s in first]
    assert f"{data}:3: cannot read image" in caplog.text  # the cached error, same line
    assert f"{data}:5: image" in caplog.text and "2 frames" in caplog.text  # cached warning
    assert caplog.text.count("\n") == first_log.count("\n")
    assert tree_state(tmp_path / "set") == before  # the cache lives elsewhere


@pytest.mark.parametrize("change", ["data file", "image file"])
def test_a_changed_file_misses_the_cache(tmp_path, count_decodes, change: str) -> None:
    data = image_set(tmp_path / "set")
    cache = tmp_path / "cache"
    load_samples(data, skip_bad=True, workers=1, cache=cache)
    if change == "data file":
        data.write_text(data.read_text(encoding="utf-8") + json.dumps(record("0.png")) + "\n")
    else:
        write_png(tmp_path / "set" / "1.png", noise((30, 30), seed=9))
        stat = (tmp_path / "set" / "1.png").stat()
        os.utime(tmp_path / "set" / "1.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    count_decodes.clear()
    samples = load_samples(data, skip_bad=True, workers=1, cache=cache)
    assert len(count_decodes) == (7 if change == "data file" else 6)
    assert len(samples) == (6 if change == "data file" else 5)


def test_same_size_and_mtime_but_other_content_misses(tmp_path, count_decodes) -> None:
    data = image_set(tmp_path / "set")
    cache = tmp_path / "cache"
    load_samples(data, skip_bad=True, workers=1, cache=cache)
    stat = data.stat()
    text = data.read_text(encoding="utf-8")
    data.write_text(text.replace('"ok"', '"OK"'), encoding="utf-8")  # same length
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    count_decodes.clear()
    assert {s.solution for s in load_samples(data, skip_bad=True, workers=1, cache=cache)} == {"OK"}
    assert len(count_decodes) == 6


def test_parallel_checks_keep_the_order_of_results_and_errors(tmp_path, monkeypatch) -> None:
    data = image_set(tmp_path / "set", n=9)
    monkeypatch.setattr(validation, "PARALLEL_MIN_IMAGES", 0)
    monkeypatch.setattr(validation, "CHUNK", 2)  # several chunks over two workers
    refs = [s.images[0] for s in load_samples(data, skip_bad=True, workers=1, cache=False)]
    refs.insert(1, ImageRef(where=f"{data}:3", path=tmp_path / "set" / "2.png"))
    serial = validation.check_images(refs, workers=1)
    parallel = validation.check_images(refs, workers=2)
    assert parallel == serial
    assert serial[1][0] is not None and serial[1][0].startswith("cannot read image")
    with pytest.raises(DataError, match=rf"^{data}:3: cannot read image"):
        load_samples(data, workers=2, cache=False)


def test_limit_still_reads_no_further(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png", noise((20, 20)))
    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps(record("a.png")) * 1 + "\n" + "{not json\n", encoding="utf-8")
    assert len(load_samples(data, limit=1)) == 1


# --------------------------------------------------------------------------------------------
# Parquet: lazy by row group, same samples as reading the whole table


def png_bytes(seed: int, size: tuple[int, int] = (20, 12)) -> bytes:
    buffer = io.BytesIO()
    noise(size, seed).save(buffer, format="PNG")
    return buffer.getvalue()


def test_parquet_lazy_reading_matches_eager(tmp_path: Path) -> None:
    n = 10
    table = pa.table(
        {
            "image": [{"bytes": png_bytes(i), "path": f"{i}.png"} for i in range(n)],
            "images": [[png_bytes(100 + i), png_bytes(200 + i)] for i in range(n)],
            "problem": [f"<image>q{i}" for i in range(n)],
            "solution": [str(i) for i in range(n)],
            "extra": list(range(n)),
        }
    )
    path = tmp_path / "set.parquet"
    pq.write_table(table, path, row_group_size=3)  # four row groups
    assert pq.ParquetFile(path).num_row_groups == 4
    samples = load_samples(path, cache=False)
    eager = pq.read_table(path).to_pylist()
    assert [s.where for s in samples] == [f"{path}:row {i}" for i in range(n)]
    assert [s.solution for s in samples] == [r["solution"] for r in eager]
    assert [s.columns["extra"] for s in samples] == list(range(n))
    for sample, row in zip(samples, eager, strict=True):
        assert len(sample.images) == 1  # "image" wins over "images", as before
        ref = sample.images[0]
        assert ref.cell is not None and ref._data is None  # no bytes held
        assert ref.data == row["image"]["bytes"]
        expected = np.asarray(Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB"))
        assert (np.asarray(ref.open()) == expected).all()


def test_parquet_list_column_cells_and_a_bad_cell(tmp_path: Path) -> None:
    good, bad = png_bytes(1), png_bytes(2)[:30]
    table = pa.table(
        {
            "images": [[good, good], [good, bad], [good]],
            "question": ["<image><image>a", "<image><image>b", "c"],
            "answer": ["1", "2", "3"],
        }
    )
    path = tmp_path / "l.parquet"
    pq.write_table(table, path, row_group_size=2)
    with pytest.raises(DataError, match=rf"^{path}:row 1: cannot read image embedded"):
        load_samples(path, cache=False)
    samples = load_samples(path, skip_bad=True, cache=False)
    assert [len(s.images) for s in samples] == [2, 1]
    assert [s.images[-1].cell.row_group for s in samples] == [0, 1]
    assert samples[0].images[1].data == good


def test_an_unusable_cache_directory_costs_only_the_cache(tmp_path, count_decodes, caplog) -> None:
    data = image_set(tmp_path / "set")
    not_a_dir = tmp_path / "cache"
    not_a_dir.write_text("a file where the cache directory should be")
    with caplog.at_level(logging.WARNING, logger="data.validation"):
        samples = load_samples(data, skip_bad=True, workers=1, cache=not_a_dir)
    assert len(samples) == 5 and len(count_decodes) == 6
    assert "checking without it" in caplog.text


def test_a_rewritten_parquet_file_is_not_served_from_memory(tmp_path: Path) -> None:
    path = tmp_path / "r.parquet"
    pq.write_table(pa.table({"image": [png_bytes(1)], "problem": ["q"], "solution": ["a"]}), path)
    (sample,) = load_samples(path, cache=False)
    assert sample.images[0].data == png_bytes(1)
    pq.write_table(pa.table({"image": [png_bytes(2)], "problem": ["q"], "solution": ["a"]}), path)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert sample.images[0].data == png_bytes(2)
