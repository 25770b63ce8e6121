"""The Qwen2.5-VL processor, chat template and image sizing.

Images are resized once, by us, to the size the vision tower will see: both sides multiples of
28 (patch 14 x merge 2) and the pixel count within [min_pixels, max_pixels]. The processor's
own resize is then the identity, so the transformers processor (training) and vLLM's
(sampling) produce the same patches for the same image.
"""

from __future__ import annotations

import math
from typing import Any

from PIL import Image

import models.cpu_compat  # noqa: F401  (must precede transformers' image code)
from data.images import image_size_problem  # the one size rule, shared with data validation
from models.tokenizer_cache import load_auto_processor

PATCH_FACTOR = 28  # patch_size 14 x spatial_merge_size 2
DEFAULT_MIN_PIXELS = 4 * 28 * 28
DEFAULT_MAX_PIXELS = 1280 * 28 * 28  # the ms-swift OCR recipe trains with 256*28*28..1280*28*28


def fitted_size(height: int, width: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) rounded to multiples of 28 with min_pixels <= h*w <= max_pixels.

    Aspect ratio is kept as closely as rounding allows. Uses qwen-vl-utils' smart_resize
    when it imports (the rule Qwen's own tooling applies), our equivalent otherwise.
    Raises ValueError for a size that rule rejects (data.images.image_size_problem).
    """
    if (problem := image_size_problem(width, height)) is not None:
        raise ValueError(problem)
    try:
        from qwen_vl_utils import smart_resize
    except Exception:  # qwen-vl-utils needs torchvision; the rule itself does not
        smart_resize = None
    if smart_resize is not None:
        h, w = smart_resize(height, width, PATCH_FACTOR, min_pixels, max_pixels)
    else:
        h, w = _smart_resize(height, width, min_pixels, max_pixels)
    if min(h, w) < PATCH_FACTOR:
        # a long thin image under a small max_pixels: flooring the short side gave 0. Keep
        # one row of patches and as many along the long side as max_pixels allows.
        long_side = max(PATCH_FACTOR, max_pixels // PATCH_FACTOR // PATCH_FACTOR * PATCH_FACTOR)
        h, w = (PATCH_FACTOR, long_side) if h < w else (long_side, PATCH_FACTOR)
    return h, w


def _smart_resize(height: int, width: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """qwen-vl-utils' smart_resize rule, for when that package cannot be imported."""
    if (problem := image_size_problem(width, height)) is not None:
        raise ValueError(problem)
    h = max(PATCH_FACTOR, round(height / PATCH_FACTOR) * PATCH_FACTOR)
    w = max(PATCH_FACTOR, round(width / PATCH_FACTOR) * PATCH_FACTOR)
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        h = math.floor(height / scale / PATCH_FACTOR) * PATCH_FACTOR
        w = math.floor(width / scale / PATCH_FACTOR) * PATCH_FACTOR
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * scale / PATCH_FACTOR) * PATCH_FACTOR
        w = math.ceil(width * scale / PATCH_FACTOR) * PATCH_FACTOR
    return h, w


def fit_image(image: Image.Image, min_pixels: int, max_pixels: int) -> Image.Image:
    """RGB copy of `image` resized (bicubic) to `fitted_size`."""
    h, w = fitted_size(image.height, image.width, min_pixels, max_pixels)
    image = image.convert("RGB")
    return image if (image.height, image.width) == (h, w) else image.resize((w, h), Image.BICUBIC)


def build_processor(
    tokenizer: Any, min_pixels: int = DEFAULT_MIN_PIXELS, max_pixels: int = DEFAULT_MAX_PIXELS
):  # -> Qwen2_5_VLProcessor
    """A Qwen2.5-VL processor around `tokenizer`, with the given pixel bounds."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=tokenizer.chat_template,
    )


def load_processor(path: str, min_pixels: int | None = None, max_pixels: int | None = None):
    """The checkpoint's processor, left-padding, with pixel bounds overridden when given."""
    processor = load_auto_processor(path)
    size = dict(processor.image_processor.size)
    if min_pixels is not None:
        size["shortest_edge"] = min_pixels
    if max_pixels is not None:
        size["longest_edge"] = max_pixels
    processor.image_processor.size = size
    processor.tokenizer.padding_side = "left"
    return processor


def pixel_bounds(processor: Any) -> tuple[int, int]:
    """(min_pixels, max_pixels) the processor resizes to."""
    size = processor.image_processor.size
    return int(size["shortest_edge"]), int(size["longest_edge"])


def render_prompt(processor: Any, messages: list[dict]) -> str:
    """Chat messages -> the prompt text ending with the assistant header."""
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
