"""Batch layout: completion padding and masks, group-major rollout rows, per-image pixel splits,
and the image sizing rule.

Most tests build PromptBatch tensors by hand (no model): pixel rows are numbered so that every
patch can be traced to its image, and the expected layouts are written out or rebuilt with
plain loops.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from grpo.types import PromptInput
from models.batch import (
    PromptBatch,
    build_rollout_batch,
    encode_prompts,
    pad_completions,
    repeat_images,
    split_pixels,
)
from models.processor import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    _smart_resize,
    fit_image,
    fitted_size,
    load_processor,
    render_prompt,
)

PAD, EOS_A, EOS_B, IMAGE_PAD = 0, 9, 10, 151655


# --- pad_completions ----------------------------------------------------------------------
def test_pad_completions_masks_through_first_eos() -> None:
    completions = [[5, 6, 9, 7, 8], [5], [10], [1, 2, 3, 4, 5, 6], [], [3, 9, 9]]
    ids, mask, truncated = pad_completions(completions, PAD, {EOS_A, EOS_B})
    assert ids.tolist() == [
        [5, 6, 9, 7, 8, 0],
        [5, 0, 0, 0, 0, 0],
        [10, 0, 0, 0, 0, 0],
        [1, 2, 3, 4, 5, 6],
        [0, 0, 0, 0, 0, 0],
        [3, 9, 9, 0, 0, 0],
    ]
    assert mask.tolist() == [
        [1, 1, 1, 0, 0, 0],  # EOS included, the tokens after it are not
        [1, 0, 0, 0, 0, 0],
        [1, 0, 0, 0, 0, 0],  # the other stop id counts as EOS too
        [1, 1, 1, 1, 1, 1],
        [0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],  # only the first EOS
    ]
    assert mask.dtype == torch.float32 and ids.dtype == torch.long
    assert truncated.tolist() == [False, True, False, True, True, False]


def test_pad_completions_to_a_fixed_width() -> None:
    ids, mask, truncated = pad_completions([[5, 6, 9], [9, 1]], PAD, {EOS_A}, width=2)
    assert ids.tolist() == [[5, 6], [9, 1]]
    assert mask.tolist() == [[1, 1], [1, 0]]
    assert truncated.tolist() == [True, False]  # its EOS lies beyond the width


# --- hand-made prompt batches ---------------------------------------------------------------
def _prompt_batch(images_per_prompt: list[int], grids: list[list[int]]) -> PromptBatch:
    """P prompts (left-padded ids 100+), pixel row k = [k, k, k, k] so patches are traceable."""
    p = len(images_per_prompt)
    lengths = [3 + j for j in range(p)]
    width = max(lengths)
    ids = torch.full((p, width), PAD, dtype=torch.long)
    attention = torch.zeros((p, width), dtype=torch.long)
    for j, length in enumerate(lengths):
        ids[j, width - length :] = torch.arange(100 + 10 * j, 100 + 10 * j + length)
        attention[j, width - length :] = 1
    types = (ids == 105).long()  # stands in for image positions
    patches = sum(t * h * w for t, h, w in grids)
    return PromptBatch(
        input_ids=ids,
        attention_mask=attention,
        mm_token_type_ids=types,
        pixel_values=torch.arange(patches, dtype=torch.float32)[:, None].repeat(1, 4)
        if grids
        else None,
        image_grid_thw=torch.tensor(grids, dtype=torch.long) if grids else None,
        images_per_prompt=images_per_prompt,
    )


def _manual_patch_rows(
    images_per_prompt: list[int], grids: list[list[int]], rows: list[int]
) -> tuple[list[int], list[int]]:
    """Indices of pixel rows and grid rows for `rows`, by walking images one by one."""
    first_image = [sum(images_per_prompt[:j]) for j in range(len(images_per_prompt))]
    first_patch = [sum(t * h * w for t, h, w in grids[:i]) for i in range(len(grids))]
    patch_rows, grid_rows = [], []
    for j in rows:
        for i in range(first_image[j], first_image[j] + images_per_prompt[j]):
            t, h, w = grids[i]
            patch_rows.extend(range(first_patch[i], first_patch[i] + t * h * w))
            grid_rows.append(i)
    return patch_rows, grid_rows


LAYOUTS = [
    ([2, 0, 1], [[1, 2, 4], [1, 4, 2], [1, 2, 2]]),
    ([1, 1], [[1, 2, 2], [1, 6, 4]]),
    ([0, 3], [[1, 2, 2], [2, 2, 2], [1, 4, 4]]),
]


@pytest.mark.parametrize(("counts", "grids"), LAYOUTS)
def test_split_pixels_against_manual_walk(counts: list[int], grids: list[list[int]]) -> None:
    prompts = _prompt_batch(counts, grids)
    per_prompt = split_pixels(prompts)
    assert len(per_prompt) == len(counts)
    for j, (pixels, grid) in enumerate(per_prompt):
        patch_rows, grid_rows = _manual_patch_rows(counts, grids, [j])
        assert torch.equal(pixels, prompts.pixel_values[patch_rows])
        assert grid.tolist() == [grids[i] for i in grid_rows]
        assert pixels.shape == (int(grid.prod(-1).sum()), 4)


@pytest.mark.parametrize(("counts", "grids"), LAYOUTS)
def test_repeat_images_against_manual_walk(counts: list[int], grids: list[list[int]]) -> None:
    prompts = _prompt_batch(counts, grids)
    rows = [0, 0, 1, 1, len(counts) - 1, 0]  # any order, repeats included
    pixels, grid = repeat_images(prompts, rows)
    patch_rows, grid_rows = _manual_patch_rows(counts, grids, rows)
    assert torch.equal(pixels, prompts.pixel_values[patch_rows])
    assert grid.tolist() == [grids[i] for i in grid_rows]


def test_text_only_prompts_have_no_pixels() -> None:
    prompts = _prompt_batch([0, 0], [])
    assert split_pixels(prompts) == []
    assert repeat_images(prompts, [0, 0, 1, 1]) == (None, None)


def test_build_rollout_batch_layout() -> None:
    counts, grids = LAYOUTS[0]
    prompts = _prompt_batch(counts, grids)
    group = 2
    completions = [[5, 9], [6, 7, 8], [9], [1, 2, 3, 9, 4], [2], [3, 3]]
    batch = build_rollout_batch(prompts, completions, group, PAD, {EOS_A}, {IMAGE_PAD})
    ids, mask, truncated = pad_completions(completions, PAD, {EOS_A})
    lp, t = prompts.input_ids.shape[1], ids.shape[1]

    assert batch.prompt_of_row.tolist() == [0, 0, 1, 1, 2, 2]  # group-major
    assert batch.num_rows == 6 and batch.prompt_length == lp
    assert batch.input_ids.shape == batch.attention_mask.shape == (6, lp + t)
    for r, j in enumerate(batch.prompt_of_row.tolist()):
        assert torch.equal(batch.input_ids[r, :lp], prompts.input_ids[j])
        assert torch.equal(batch.attention_mask[r, :lp], prompts.attention_mask[j])
        assert torch.equal(batch.mm_token_type_ids[r, :lp], prompts.mm_token_type_ids[j])
    assert torch.equal(batch.input_ids[:, lp:], ids)
    assert torch.equal(batch.completion_ids, ids)
    assert torch.equal(batch.completion_mask, mask)
    # the completion is text, and nothing after the first EOS is attended to
    assert not batch.mm_token_type_ids[:, lp:].any()
    assert torch.equal(batch.attention_mask[:, lp:], mask.long())
    assert batch.attention_mask[3, lp:].tolist() == [1, 1, 1, 1, 0]
    assert torch.equal(batch.truncated, truncated)

    patch_rows, grid_rows = _manual_patch_rows(counts, grids, [0, 0, 1, 1, 2, 2])
    assert torch.equal(batch.pixel_values, prompts.pixel_values[patch_rows])
    assert batch.image_grid_thw.tolist() == [grids[i] for i in grid_rows]
    assert batch.image_grid_thw.tolist() == [grids[0], grids[1]] * 2 + [grids[2]] * 2


def test_build_rollout_batch_rejects_vision_tokens_and_wrong_counts() -> None:
    prompts = _prompt_batch([1, 0], [[1, 2, 2]])
    bad = [[1, 2], [3], [4, IMAGE_PAD, 9], [5]]
    with pytest.raises(ValueError, match=r"completion 2 contains vision special token.*151655"):
        build_rollout_batch(prompts, bad, 2, PAD, {EOS_A}, {IMAGE_PAD})
    with pytest.raises(ValueError, match=r"3 completions for 2 prompts x group size 2"):
        build_rollout_batch(prompts, [[1], [2], [3]], 2, PAD, {EOS_A}, {IMAGE_PAD})


# --- with the real processor ------------------------------------------------------------------
@pytest.fixture(scope="module")
def processor(tiny_model_dir: Path) -> Any:
    return load_processor(str(tiny_model_dir))


def _prompt(processor: Any, text: str, images: list[Image.Image]) -> PromptInput:
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    messages = [{"role": "user", "content": content}]
    fitted = [fit_image(image, DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS) for image in images]
    return PromptInput(render_prompt(processor, messages), fitted)


def test_encode_prompts_left_pads_and_splits_like_single_prompts(
    processor: Any, images: list[Image.Image]
) -> None:
    prompts = [
        _prompt(processor, "a much longer question than the others, 好吗?", images[:1]),
        _prompt(processor, "no image", []),
        _prompt(processor, "two", images[1:]),
    ]
    batch = encode_prompts(processor, prompts, torch.device("cpu"))
    assert batch.images_per_prompt == [1, 0, 2]
    width = batch.input_ids.shape[1]
    pad = processor.tokenizer.pad_token_id
    for j, (prompt, (pixels, grid)) in enumerate(zip(prompts, split_pixels(batch), strict=True)):
        alone = processor(text=[prompt.text], images=prompt.images or None, return_tensors="pt")
        n = alone["input_ids"].shape[1]
        assert torch.equal(batch.input_ids[j, width - n :], alone["input_ids"][0])
        assert (batch.input_ids[j, : width - n] == pad).all()  # padding on the left
        assert batch.attention_mask[j].tolist() == [0] * (width - n) + [1] * n
        assert torch.equal(batch.mm_token_type_ids[j, width - n :], alone["mm_token_type_ids"][0])
        if prompt.images:
            assert torch.equal(pixels, alone["pixel_values"])
            assert torch.equal(grid, alone["image_grid_thw"])
        else:
            assert pixels.shape[0] == 0 and grid.shape[0] == 0


def test_encode_prompts_rejects_images_without_placeholder(
    processor: Any, images: list[Image.Image]
) -> None:
    with_image = _prompt(processor, "look", images[:1])
    no_placeholder = PromptInput(render_prompt(processor, [{"role": "user", "content": "x"}]), [])
    stray = PromptInput(no_placeholder.text, with_image.images)
    with pytest.raises(ValueError, match=r"prompt 1 has 1 image\(s\) but no image placeholder"):
        encode_prompts(processor, [no_placeholder, stray, with_image], torch.device("cpu"))


# --- image sizing -------------------------------------------------------------------------------
SIDES = [1, 13, 14, 27, 28, 29, 41, 42, 55, 56, 100, 223, 500, 1000, 1999, 4000]
BOUNDS = [
    (DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS),
    (256 * 28 * 28, 1280 * 28 * 28),
    (4 * 28 * 28, 16 * 28 * 28),
    (28 * 28, 28 * 28 * 2),
]
CASES = [
    (h, w, lo, hi)
    for (h, w), (lo, hi) in itertools.product(itertools.product(SIDES, SIDES), BOUNDS)
    if max(h, w) / min(h, w) <= 200
]


def test_fallback_rule_agrees_with_qwen_vl_utils() -> None:
    from qwen_vl_utils import smart_resize  # importable thanks to conftest's torchvision shim

    for h, w, lo, hi in CASES:
        assert _smart_resize(h, w, lo, hi) == smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)
    for h, w in [(1, 201), (4000, 13), (10, 2500)]:
        with pytest.raises(ValueError, match="aspect ratio"):
            _smart_resize(h, w, DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS)
        with pytest.raises(ValueError, match="aspect ratio"):
            smart_resize(h, w, 28, DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS)


def test_fitted_size_without_qwen_vl_utils(monkeypatch: pytest.MonkeyPatch) -> None:
    expected = [fitted_size(h, w, lo, hi) for h, w, lo, hi in CASES]
    monkeypatch.setitem(sys.modules, "qwen_vl_utils", None)  # makes its import fail
    assert [fitted_size(h, w, lo, hi) for h, w, lo, hi in CASES] == expected


def test_fitted_size_is_a_fixed_point_of_the_processor_resize() -> None:
    """Multiples of 28, at least one patch row, within the bounds, and left alone by the
    transformers processor's own resize (so training and vLLM see the same patches)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    for h, w, lo, hi in CASES:
        fh, fw = fitted_size(h, w, lo, hi)
        assert fh % 28 == 0 and fw % 28 == 0 and fh >= 28 and fw >= 28, (h, w, lo, hi)
        assert fh * fw <= hi, (h, w, lo, hi)
        if hi >= 4 * lo:  # with narrow bounds the ceil of the min rule can overshoot max
            assert fh * fw >= lo, (h, w, lo, hi)
        assert smart_resize(fh, fw, 28, lo, hi) == (fh, fw), (h, w, lo, hi)
        assert fitted_size(fh, fw, lo, hi) == (fh, fw)


def test_long_thin_image_under_small_max_pixels() -> None:
    """smart_resize floors the short side of a 30x600 image to 0 under 16 * 28 * 28 pixels."""
    assert fitted_size(30, 600, 4 * 784, 16 * 784) == (28, 448)
    assert fitted_size(600, 30, 4 * 784, 16 * 784) == (448, 28)
    image = fit_image(Image.new("L", (600, 30)), 4 * 784, 16 * 784)
    assert image.size == (448, 28) and image.mode == "RGB"


def test_fit_image_resizes_only_when_needed() -> None:
    image = Image.new("RGBA", (120, 60))
    fitted = fit_image(image, DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS)
    assert fitted.size == (112, 56) and fitted.mode == "RGB"  # PIL sizes are (w, h)
    again = fit_image(fitted, DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS)
    assert again.size == (112, 56)
