"""Tensor batches for Qwen2.5-VL and text-only LMs: prompts alone, and prompts + completions.

Layout of a rollout batch (N = P * G rows, group-major; Lp prompt length, T completion length):

    input_ids      [N, Lp + T]   pad..pad prompt | completion pad..pad
    attention_mask [N, Lp + T]   0 on both paddings
    completion_mask [N, T]       1 up to and including the first EOS, 0 after

Prompts are left-padded so that every completion starts at column Lp, and the token at
column Lp + t is predicted by the hidden state at column Lp + t - 1. A text-only prompt batch
has the same layout with mm_token_type_ids all 0 and no pixels; its model never sees them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from grpo.types import PromptInput


@dataclass
class PromptBatch:
    """P prompts, tokenised and left-padded, with their images turned into patches.

    pixel_values holds the patches of all images back to back; image i owns
    image_grid_thw[i].prod() rows of it. images_per_prompt says which images are whose.
    """

    input_ids: torch.Tensor  # [P, Lp]
    attention_mask: torch.Tensor  # [P, Lp]
    mm_token_type_ids: torch.Tensor  # [P, Lp]  0 text, 1 image
    pixel_values: torch.Tensor | None  # [patches, 3 * 2 * 14 * 14]
    image_grid_thw: torch.Tensor | None  # [images, 3]
    images_per_prompt: list[int]

    @property
    def num_prompts(self) -> int:
        return self.input_ids.shape[0]


@dataclass
class RolloutBatch:
    """Prompts + completions for one forward; see the module docstring for the layout."""

    input_ids: torch.Tensor  # [N, Lp + T]
    attention_mask: torch.Tensor  # [N, Lp + T]
    mm_token_type_ids: torch.Tensor  # [N, Lp + T]
    completion_ids: torch.Tensor  # [N, T]
    completion_mask: torch.Tensor  # [N, T] float 0/1
    truncated: torch.Tensor  # [N] bool: no EOS within the sampled tokens
    prompt_of_row: torch.Tensor  # [N] long: index of the prompt each row continues
    prompts: PromptBatch
    pixel_values: torch.Tensor | None  # [patches of all N rows' images, D]
    image_grid_thw: torch.Tensor | None  # [images of all N rows, 3]

    @property
    def prompt_length(self) -> int:
        return self.prompts.input_ids.shape[1]

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: list[int]) -> RolloutBatch:
        return select_rows(self, rows)


def encode_prompts(processor: Any, prompts: list[PromptInput], device: torch.device) -> PromptBatch:
    """Tokenise rendered prompts (left-padded) and preprocess their images."""
    images = [image for prompt in prompts for image in prompt.images]
    encoded = processor(
        text=[prompt.text for prompt in prompts],
        images=images or None,
        padding=True,
        padding_side="left",
        return_tensors="pt",
    )
    counts = [len(prompt.images) for prompt in prompts]
    image_token = processor.image_token_id
    for j, (ids, count) in enumerate(zip(encoded["input_ids"], counts, strict=True)):
        if count and not (ids == image_token).any():
            raise ValueError(f"prompt {j} has {count} image(s) but no image placeholder")
    pixel_values = encoded.get("pixel_values")
    grid = encoded.get("image_grid_thw")
    return PromptBatch(
        input_ids=encoded["input_ids"].to(device),
        attention_mask=encoded["attention_mask"].to(device),
        mm_token_type_ids=encoded["mm_token_type_ids"].to(device),
        pixel_values=None if pixel_values is None else pixel_values.to(device),
        image_grid_thw=None if grid is None else grid.to(device),
        images_per_prompt=counts,
    )


def encode_text_prompts(
    tokenizer: Any, prompts: list[PromptInput], device: torch.device
) -> PromptBatch:
    """Tokenise rendered text-only prompts (left-padded): a PromptBatch without pixels."""
    if any(prompt.images for prompt in prompts):
        raise ValueError("a text-only model was given a prompt with images")
    encoded = tokenizer(
        [prompt.text for prompt in prompts],
        padding=True,
        padding_side="left",
        add_special_tokens=False,  # the chat template already wrote every special token
        return_tensors="pt",
    )
    ids = encoded["input_ids"].to(device)  # [P, Lp]
    return PromptBatch(
        input_ids=ids,
        attention_mask=encoded["attention_mask"].to(device),
        mm_token_type_ids=torch.zeros_like(ids),  # [P, Lp] all text
        pixel_values=None,
        image_grid_thw=None,
        images_per_prompt=[0] * len(prompts),
    )


def text_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """1-D positions [N, L] of left-padded rows: p = (number of real tokens before) , 0 on
    padding, so a row's first real token is at 0 whatever its padding (as vLLM numbers it)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [N, L]


def split_pixels(prompts: PromptBatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per prompt: (its patches [patches_j, D], its grids [images_j, 3])."""
    if prompts.pixel_values is None or prompts.image_grid_thw is None:
        return []
    patches_per_image = prompts.image_grid_thw.prod(-1).tolist()  # [images]
    per_image = torch.split(prompts.pixel_values, patches_per_image)
    out, first = [], 0
    for count in prompts.images_per_prompt:
        grids = prompts.image_grid_thw[first : first + count]  # [count, 3]
        pixels = prompts.pixel_values.new_zeros((0, prompts.pixel_values.shape[1]))
        if count:
            pixels = torch.cat(per_image[first : first + count])  # [patches_j, D]
        out.append((pixels, grids))
        first += count
    return out


def repeat_images(
    prompts: PromptBatch, prompt_of_row: list[int]
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """pixel_values and image_grid_thw for rows that continue prompts `prompt_of_row`."""
    per_prompt = split_pixels(prompts)
    if not per_prompt:
        return None, None
    if not prompt_of_row:  # no row kept (e.g. every group without signal): empty, not an error
        return per_prompt[0][0][:0], per_prompt[0][1][:0]
    pixels = torch.cat([per_prompt[j][0] for j in prompt_of_row])  # [patches of all rows, D]
    grids = torch.cat([per_prompt[j][1] for j in prompt_of_row])  # [images of all rows, 3]
    return pixels, grids


def pad_completions(
    completions: list[list[int]], pad_id: int, eos_ids: set[int], width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad token lists to [N, T]; mask up to and including the first EOS.

    Returns (ids [N, T] long, mask [N, T] float, truncated [N] bool). Tokens after the first
    EOS are dropped (masked) whatever the sampler returned.
    """
    width = width or max(1, max(len(c) for c in completions))
    ids = torch.full((len(completions), width), pad_id, dtype=torch.long)  # [N, T]
    mask = torch.zeros((len(completions), width), dtype=torch.float32)  # [N, T]
    truncated = torch.ones(len(completions), dtype=torch.bool)  # [N]
    for i, tokens in enumerate(completions):
        tokens = tokens[:width]
        ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        end = len(tokens)
        for t, token in enumerate(tokens):
            if token in eos_ids:
                end, truncated[i] = t + 1, False
                break
        mask[i, :end] = 1.0
    return ids, mask, truncated


def build_rollout_batch(
    prompts: PromptBatch,
    completions: list[list[int]],
    group_size: int,
    pad_id: int,
    eos_ids: set[int],
    forbidden_ids: set[int],
) -> RolloutBatch:
    """Join P prompts with their N = P * G completions (group-major) into one batch."""
    if len(completions) != prompts.num_prompts * group_size:
        raise ValueError(
            f"{len(completions)} completions for {prompts.num_prompts} prompts "
            f"x group size {group_size}"
        )
    for i, tokens in enumerate(completions):
        if bad := forbidden_ids.intersection(tokens):
            raise ValueError(
                f"completion {i} contains vision special token(s) {sorted(bad)}: "
                "the sampler must suppress them"
            )
    device = prompts.input_ids.device
    prompt_of_row = [j for j in range(prompts.num_prompts) for _ in range(group_size)]
    rows = torch.tensor(prompt_of_row, device=device)  # [N]
    ids, mask, truncated = pad_completions(completions, pad_id, eos_ids)  # [N, T] x2, [N]
    ids, mask = ids.to(device), mask.to(device)
    pixels, grids = repeat_images(prompts, prompt_of_row)
    return RolloutBatch(
        input_ids=torch.cat([prompts.input_ids[rows], ids], dim=1),  # [N, Lp + T]
        attention_mask=torch.cat([prompts.attention_mask[rows], mask.long()], dim=1),
        mm_token_type_ids=torch.cat(
            [prompts.mm_token_type_ids[rows], torch.zeros_like(ids)], dim=1
        ),  # completions: text
        completion_ids=ids,
        completion_mask=mask,
        truncated=truncated.to(device),
        prompt_of_row=rows,
        prompts=prompts,
        pixel_values=pixels,
        image_grid_thw=grids,
    )


def select_rows(batch: RolloutBatch, rows: list[int]) -> RolloutBatch:
    """The sub-batch of `rows` (e.g. without the groups that carry no signal)."""
    index = torch.tensor(rows, dtype=torch.long, device=batch.input_ids.device)  # [n]
    pixels, grids = repeat_images(batch.prompts, batch.prompt_of_row[index].tolist())
    return RolloutBatch(
        input_ids=batch.input_ids[index],
        attention_mask=batch.attention_mask[index],
        mm_token_type_ids=batch.mm_token_type_ids[index],
        completion_ids=batch.completion_ids[index],
        completion_mask=batch.completion_mask[index],
        truncated=batch.truncated[index],
        prompt_of_row=batch.prompt_of_row[index],
        prompts=batch.prompts,
        pixel_values=pixels,
        image_grid_thw=grids,
    )
