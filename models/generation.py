"""Sampling with transformers' `generate` (the sampler that needs no extra engine)."""

from __future__ import annotations

from typing import Any

import torch

from grpo.rollout import PromptInput, SamplingSettings
from models.batch import encode_prompts, repeat_images

VISION_SPECIAL_TOKENS = (
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


def vision_token_ids(tokenizer: Any) -> set[int]:
    """Ids a completion must never contain: an <|image_pad|> in a completion breaks the next
    forward ("Image features and image tokens do not match")."""
    return {tokenizer.convert_tokens_to_ids(t) for t in VISION_SPECIAL_TOKENS}


def stop_token_ids(tokenizer: Any) -> set[int]:
    """<|im_end|> ends an assistant turn; <|endoftext|> ends a document (base models)."""
    return {
        tokenizer.convert_tokens_to_ids("<|im_end|>"),
        tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    }


def cut_at_stop(tokens: list[int], stop_ids: set[int], pad_id: int) -> list[int]:
    """Tokens up to and including the first stop token; trailing padding removed."""
    for t, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[: t + 1]
    while tokens and tokens[-1] == pad_id:
        tokens = tokens[:-1]
    return tokens


def generate_kwargs(
    processor: Any,
    prompts: list[PromptInput],
    n: int,
    settings: SamplingSettings,
    device: torch.device,
) -> dict[str, Any]:
    """Keyword arguments for `model.generate` drawing n completions per prompt (group-major).

    input_ids [N, Lp] is the left-padded prompt batch with each prompt repeated n times; the
    vision special tokens are suppressed, and sampling is plain sampling at the temperature.
    """
    tokenizer = processor.tokenizer
    batch = encode_prompts(processor, prompts, device)
    rows = [j for j in range(batch.num_prompts) for _ in range(n)]
    index = torch.tensor(rows, device=device)  # [N]
    pixels, grids = repeat_images(batch, rows)
    extra = {} if pixels is None else {"pixel_values": pixels, "image_grid_thw": grids}
    sampling = (
        {"do_sample": False}
        if settings.greedy
        # top_k=0: transformers would otherwise truncate to its default top-50
        else {
            "do_sample": True,
            "temperature": settings.temperature,
            "top_p": settings.top_p,
            "top_k": settings.top_k,
        }
    )
    return {
        "input_ids": batch.input_ids[index],  # [N, Lp]
        "attention_mask": batch.attention_mask[index],
        "mm_token_type_ids": batch.mm_token_type_ids[index],
        "max_new_tokens": settings.max_new_tokens,
        "eos_token_id": sorted(stop_token_ids(tokenizer)),
        "pad_token_id": tokenizer.pad_token_id,
        "suppress_tokens": sorted(vision_token_ids(tokenizer)),
        "use_cache": True,
        **sampling,
        **extra,
    }


@torch.no_grad()
def hf_generate(
    model: Any,
    processor: Any,
    prompts: list[PromptInput],
    n: int,
    settings: SamplingSettings,
    device: torch.device,
) -> list[list[int]]:
    """N = P * n completions (group-major) as token-id lists ending at the first stop token."""
    tokenizer = processor.tokenizer
    kwargs = generate_kwargs(processor, prompts, n, settings, device)
    out = model.generate(**kwargs)  # [N, Lp + new]
    new_tokens = out[:, kwargs["input_ids"].shape[1] :].tolist()
    stop = stop_token_ids(tokenizer)
    return [cut_at_stop(tokens, stop, tokenizer.pad_token_id) for tokens in new_tokens]
