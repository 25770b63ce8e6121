"""Decoding an image into the exact RGB pixels that training and evaluation use, and the size
rule the vision tower's resize enforces.

One function, `decode_image`, turns encoded bytes or a file into 8-bit RGB; `ImageRef.open`
(data/sample.py) and up-front validation both call it, so what was checked is what trains.

What it does to images that a plain `convert("RGB")` gets wrong:

- transparency (RGBA, LA, P with a transparent index, ...): composited on white. Dropping the
  alpha channel instead turns text drawn only in alpha (RGB all black) into a black image.
- 16-bit and 32-bit greyscale: scaled to 8 bits by the range of their storage, not clipped
  (clipping turns a full-range 16-bit scan white). 'I;16*' modes are divided by 257 (65535 ->
  255). Mode 'I' (and 'F') does not say its depth, so its values decide: all within 0..255 ->
  kept, within 0..65535 -> divided by 257 like 16-bit, otherwise stretched from min..max
  (an 'F' image within 0..1 is taken as 0..1 and multiplied by 255).
- several frames (animated GIF/WebP/PNG, multi-page TIFF): the first frame is used, and a note
  says so (the caller logs it against the data line).

The size rule (`image_size_problem`) is qwen-vl-utils' / transformers' smart_resize: it raises
for an aspect ratio over 200. It sets no minimum size (anything smaller than one 28x28 patch is
scaled up), so neither do we beyond "at least 1x1".
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

MAX_ASPECT_RATIO = 200  # qwen_vl_utils.vision_process.MAX_RATIO; transformers hard-codes 200
# MPO (phone JPEGs) carries a preview or a second eye as extra frames: not worth a warning
SILENT_MULTI_FRAME_FORMATS = ("MPO",)
_WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class ImageProblem(ValueError):
    """An image that cannot be used; the message says why, without the data line."""


def image_size_problem(width: int, height: int) -> str | None:
    """Why the Qwen2.5-VL resize rule rejects a `width` x `height` image, or None if it is fine.

    The one place the rule lives: validation (data/) reports it against the data line, and
    models/processor.py's fitted_size raises it before resizing.
    """
    if width < 1 or height < 1:
        return f"image is {width}x{height}: it has no pixels"
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        return (
            f"image is {width}x{height}: aspect ratio {ratio:.1f} exceeds {MAX_ASPECT_RATIO}, "
            "the limit of the Qwen2.5-VL resize (crop or pad it)"
        )
    return None


def decode_image(source: Path | bytes, what: str) -> tuple[Image.Image, list[str]]:
    """Decode `source` fully into 8-bit RGB; returns (image, notes) where notes are warnings
    worth logging against the data line. Raises ImageProblem naming `what` when unusable."""
    notes: list[str] = []
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        frames = getattr(image, "n_frames", 1)
        if frames > 1 and image.format not in SILENT_MULTI_FRAME_FORMATS:
            notes.append(f"image {what} has {frames} frames ({image.format}); using the first")
            image.seek(0)
        image.load()  # decode now: a truncated file must fail here, not inside a forward
        rgb = to_rgb(image)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        raise ImageProblem(f"cannot read image {what}: {e}") from e
    problem = image_size_problem(rgb.width, rgb.height)
    if problem is not None:
        raise ImageProblem(f"{what}: {problem}")
    return rgb, notes


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB with transparency composited on white and wide greyscale scaled down."""
    if image.mode in _WIDE_GREY_MODES or image.mode in ("I", "F"):
        return _wide_grey_to_8bit(image).convert("RGB")
    if image.has_transparency_data:  # also RGB and L with a tRNS colour key
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _wide_grey_to_8bit(image: Image.Image) -> Image.Image:
    """An 'L' image from a 16/32-bit integer or float greyscale one (see the module doc)."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode in _WIDE_GREY_MODES:
        scaled = values / 257.0
    else:
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if image.mode == "F" and low >= 0 and high <= 1:
            scaled = values * 255.0  # float images usually mean 0..1
        elif low >= 0 and high <= 255:
            scaled = values
        elif low >= 0 and high <= 65535:
            scaled = values / 257.0
        else:  # a depth we cannot tell: stretch what is there over 0..255
            scaled = (values - low) * (255.0 / (high - low)) if high > low else values * 0
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))
