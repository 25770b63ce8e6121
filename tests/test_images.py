"""ImageRef.open: unreadable images fail with a DataError naming the file and the data line."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from data.sample import DataError, ImageRef


def _png_bytes(size: tuple[int, int] = (40, 30), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, 128).save(buffer, format="PNG")
    return buffer.getvalue()


def test_missing_file_names_path_and_line(tmp_path: Path) -> None:
    path = tmp_path / "images" / "nope.png"
    with pytest.raises(DataError) as error:
        ImageRef(where="train.jsonl:12", path=path).open()
    message = str(error.value)
    assert message.startswith("train.jsonl:12: ")
    assert str(path) in message
    assert "not found" in message


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"^train\.jsonl:3: image file not found"):
        ImageRef(where="train.jsonl:3", path=tmp_path).open()


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("text.png", b"this is not an image at all\n"),
        ("empty.jpg", b""),
        ("truncated.png", _png_bytes((200, 200))[:-60]),  # header fine, pixel data cut short
    ],
)
def test_corrupt_file_names_path_and_line(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as error:
        ImageRef(where="val.csv:7", path=path).open()
    message = str(error.value)
    assert message.startswith("val.csv:7: cannot read image ")
    assert str(path) in message


def test_corrupt_embedded_bytes_names_the_row() -> None:
    with pytest.raises(DataError) as error:
        ImageRef(where="x.parquet:row 3", data=b"\x89PNG garbage").open()
    assert str(error.value).startswith("x.parquet:row 3: cannot read image embedded image bytes")


def test_reference_without_path_or_bytes() -> None:
    with pytest.raises(DataError, match=r"^a\.jsonl:1: image reference has neither"):
        ImageRef(where="a.jsonl:1").open()


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_valid_images_open_as_rgb(tmp_path: Path, mode: str) -> None:
    path = tmp_path / f"ok_{mode}.png"
    path.write_bytes(_png_bytes((40, 30), mode))
    from_file = ImageRef(where="t.jsonl:1", path=path).open()
    from_bytes = ImageRef(where="t.parquet:row 0", data=_png_bytes((40, 30), mode)).open()
    for image in (from_file, from_bytes):
        assert image.mode == "RGB"
        assert image.size == (40, 30)
