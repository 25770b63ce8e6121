"""The unit of data: one prompt's query, images and gold answer, wherever it was read from."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from data.images import ImageProblem, decode_image

logger = logging.getLogger(__name__)
_said: set[str] = set()  # notes already logged by this process: one warning, not one per epoch


class DataError(ValueError):
    """Bad input data. The message always starts with where it is: 'file:line: ...'."""


@dataclass(frozen=True)
class ParquetCell:
    """Where an embedded image lives in a Parquet file; its bytes are read when opened.

    row is counted within `row_group`; item is the index in a list column (None for a column
    holding one image per row).
    """

    file: Path
    row_group: int
    row: int
    column: str
    item: int | None = None


class ImageRef:
    """An image as the data file names it: a file on disk, encoded bytes, or a Parquet cell.

    `where` locates the reference in the data ("train.jsonl:12", "x.parquet:row 3") so that
    an unreadable image is reported against the line that asked for it. A Parquet cell keeps
    only its coordinates, so a large set is not held in memory; `data` reads its bytes.
    """

    __slots__ = ("_data", "cell", "path", "where")

    def __init__(
        self,
        where: str,
        path: Path | None = None,
        data: bytes | None = None,
        cell: ParquetCell | None = None,
    ) -> None:
        self.where = where
        self.path = path
        self._data = data
        self.cell = cell

    @property
    def data(self) -> bytes | None:
        """The encoded bytes for an embedded image (read from the Parquet file if lazy)."""
        if self._data is None and self.cell is not None:
            return read_parquet_cell(self.cell)
        return self._data

    def size(self) -> tuple[int, int]:
        """(width, height) from the image's header, without decoding its pixels."""
        import io

        source = self.path if self.path is not None else io.BytesIO(self.data or b"")
        with Image.open(source) as image:
            return image.size

    def decode(self) -> tuple[Image.Image, list[str]]:
        """(RGB image, notes) via data.images.decode_image; DataError naming the line."""
        if self.path is not None:
            if not self.path.is_file():
                raise DataError(f"{self.where}: image file not found: {self.path}")
            source: Path | bytes = self.path
        elif self._data is not None or self.cell is not None:
            try:
                source = self.data  # type: ignore[assignment]
            except (OSError, ValueError, KeyError, IndexError) as e:
                raise DataError(f"{self.where}: cannot read embedded image bytes: {e}") from e
            if source is None:
                raise DataError(f"{self.where}: the image cell is empty (null bytes)")
        else:
            raise DataError(f"{self.where}: image reference has neither a path nor bytes")
        what = str(self.path) if self.path is not None else "embedded image bytes"
        try:
            return decode_image(source, what)
        except ImageProblem as e:
            raise DataError(f"{self.where}: {e}") from e

    def open(self) -> Image.Image:
        """Decode fully into an RGB PIL image; DataError naming the file and line otherwise.
        Notes (e.g. "using the first of 3 frames") are logged once per process."""
        image, notes = self.decode()
        for note in notes:
            note_once(f"{self.where}: {note}")
        return image

    def _key(self) -> tuple[Any, ...]:
        return (self.where, self.path, self._data, self.cell)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ImageRef) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        source = f"path={self.path!r}" if self.path is not None else f"cell={self.cell!r}"
        return f"ImageRef(where={self.where!r}, {source})"


def note_once(message: str) -> None:
    """Log a warning about the data once per process (validation and training share it)."""
    if message not in _said:
        _said.add(message)
        logger.warning("%s", message)


def read_parquet_cell(cell: ParquetCell) -> bytes | None:
    """The encoded bytes of one cell: {"bytes", "path"} struct or plain binary."""
    stat = cell.file.stat()  # in the key: a rewritten file must not be served from memory
    column = _row_group_column(
        cell.file, stat.st_mtime_ns, stat.st_size, cell.row_group, cell.column
    )
    value = column[cell.row]
    if cell.item is not None:
        value = value[cell.item]
    if isinstance(value, dict):
        value = value.get("bytes")
    return value


@functools.lru_cache(maxsize=2)
def _row_group_column(
    file: Path, mtime_ns: int, size: int, row_group: int, column: str
) -> list[Any]:
    """One row group's image column. Parquet cannot read less than this; keeping the last two
    makes reading a row group's images in order cost one read, and bounds memory."""
    import pyarrow.parquet as pq  # only Parquet users pay for the import

    table = pq.ParquetFile(file).read_row_group(row_group, columns=[column])
    return table.column(0).to_pylist()


@dataclass
class Sample:
    """One prompt before templating.

    query:    the user's question, image placeholders removed (the task template adds them).
    solution: the gold answer that rewards compare against ("" only when loaded with
              allow_empty_solution, for evaluation).
    images:   zero or more images, in the order they appear in the prompt.
    columns:  every other field of the record; passed to reward functions by name.
    where:    "file:line" of the record, for error messages.
    """

    query: str
    solution: str
    images: list[ImageRef]
    columns: dict[str, Any]
    where: str
