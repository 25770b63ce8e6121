"""The unit of data: one prompt's query, images and gold answer, wherever it was read from."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError


class DataError(ValueError):
    """Bad input data. The message always starts with where it is: 'file:line: ...'."""


@dataclass(frozen=True)
class ImageRef:
    """An image as the data file names it: a file on disk, or encoded bytes (Parquet).

    `where` locates the reference in the data ("train.jsonl:12", "x.parquet:row 3") so that
    an unreadable image is reported against the line that asked for it.
    """

    where: str
    path: Path | None = None
    data: bytes | None = field(default=None, repr=False)

    def open(self) -> Image.Image:
        """Decode fully into an RGB PIL image; DataError naming the file and line otherwise."""
        what = str(self.path) if self.path is not None else "embedded image bytes"
        try:
            if self.path is not None:
                if not self.path.is_file():
                    raise DataError(f"{self.where}: image file not found: {self.path}")
                image = Image.open(self.path)
            elif self.data is not None:
                image = Image.open(io.BytesIO(self.data))
            else:
                raise DataError(f"{self.where}: image reference has neither a path nor bytes")
            image.load()  # decode now: a truncated file must fail here, not inside a forward
            return image.convert("RGB")
        except DataError:
            raise
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"{self.where}: cannot read image {what}: {e}") from e


@dataclass
class Sample:
    """One prompt before templating.

    query:    the user's question, image placeholders removed (the task template adds them).
    solution: the gold answer that rewards compare against ("" when there is none).
    images:   zero or more images, in the order they appear in the prompt.
    columns:  every other field of the record; passed to reward functions by name.
    where:    "file:line" of the record, for error messages.
    """

    query: str
    solution: str
    images: list[ImageRef]
    columns: dict[str, Any]
    where: str
