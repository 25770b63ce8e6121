"""Prefix-shared log-prob passes: each prompt through the model once per group, not G times.

The G completions of a group continue one prompt, and under causal attention no prompt
position sees a completion token, so the prompt's hidden states and key/value tensors are the
same in all G rows of the padded batch (models/batch.py). This pass computes them once:

    prefill   the U distinct prompts of the batch, [U, Lp'], with use_cache (and with grad
              when the caller records one): last hidden state h_u [U, H], KV cache, and the
              next position q_u = (largest prompt position) + 1          [U]
    expand    row i takes its prompt u(i)'s cache (Cache.batch_select_indices: an index into
              the batch dimension, differentiable, so gradients from all G rows sum into the
              prompt's activations, as the padded batch's would)
    continue  the completion tokens y[i, 0 .. Tg - 2] over that cache, at positions
              q_u(i) + t (all three rotary axes for Qwen2.5-VL, as the sampler's decode steps
              and get_rope_index for text after the last image), Tg = the batch's longest
              completion (up to its stop): no column past it is computed

The hidden state predicting completion token 0 is h_u(i); token t > 0 is predicted by the
continuation's output at t - 1. Those [N, Tg, H] states go through the chunked vocabulary
projection of models.logprobs (`token_logprobs`): logits only at completion positions,
entropy from the same pass. Row i attends to exactly the tokens it attends to in the padded
batch (its real prompt tokens, then its own completion) at the same positions, so the
log-probs, entropies and gradients equal the padded pass's up to float summation order
(tests/test_prefix.py). Each image goes through the vision tower once per prompt.

Compared with the padded pass over N rows of Lp + T columns, this one runs U rows of Lp' and
N rows of Tg - 1: the prompt, usually most of a row, is computed once per group, and a batch
of whole groups with short completions is trimmed to them. Micro-batches of whole groups
(the trainer's `logprob_group_batch`) trim each to its own longest completion.

Packed continuations (the default where exact: sdpa attention on llama, qwen2, qwen2_5_vl).
Trimming to the longest completion still computes padding when a group's lengths are ragged
(GRPO's usually are: on SmolLM2 completions average ~30 of 64 columns). So the continuations
of one prompt go back to back into bins of at most BIN_ROWS x (Tg - 1) tokens
(`bin_continuations`), each bin over its prompt's cache, with a custom 4-D mask: a token sees
its prompt's real tokens and the earlier tokens of its own completion, nothing else, at the
positions above. The attention of a bin costs C^2 where rows cost Tg^2 each, which the bin
limit keeps within a few times the padded one, while projections and MLPs see no padding.
Elsewhere (flash-attention, whose kernels take no custom mask; other model types) the
continuations stay trimmed rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from grpo.types import TokenLogProbs
from models.batch import PromptBatch, RolloutBatch, repeat_images, text_positions
from models.logprobs import (
    DEFAULT_CHUNK_TOKENS,
    image_inputs,
    is_text_backbone,
    token_logprobs,
    unwrap,
)
from models.packing import BIN_ROWS, PACKABLE_TYPES, assign_bins, attention_of, packing_refusal


def distinct_prompts(prompt_of_row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the prompts the rows continue, ascending [U]; for each row its index among them [N])."""
    used, slot = torch.unique(prompt_of_row, sorted=True, return_inverse=True)
    return used, slot


def select_prompts(prompts: PromptBatch, used: torch.Tensor) -> PromptBatch:
    """The prompt batch of prompts `used` [U], without the left-padding columns they all
    have (a column no row attends to changes nothing but the work)."""
    mask = prompts.attention_mask[used]  # [U, Lp]
    first = int((mask.sum(0) > 0).long().argmax()) if mask.numel() else 0
    pixels, grids = repeat_images(prompts, used.tolist())
    if grids is not None and grids.shape[0] == 0:  # none of these prompts has an image
        pixels = grids = None
    return PromptBatch(
        input_ids=prompts.input_ids[used, first:],
        attention_mask=mask[:, first:],
        mm_token_type_ids=prompts.mm_token_type_ids[used, first:],
        pixel_values=pixels,
        image_grid_thw=grids,
        images_per_prompt=[prompts.images_per_prompt[j] for j in used.tolist()],
    )


def prefill(
    model: Any,
    batch: RolloutBatch,
    used: torch.Tensor,
    image_features: list[torch.Tensor] | None,
) -> tuple[torch.Tensor, Any, torch.Tensor]:
    """The prompts `used` [U] once each: (last hidden state [U, H], KV cache, next position
    [U]). Positions are those of the padded batch: 1-D from 0 at the first real token for a
    text LM, get_rope_index's 3-D ones for Qwen2.5-VL."""
    inner = unwrap(model).model
    prompts = select_prompts(batch.prompts, used)
    common = {"input_ids": prompts.input_ids, "attention_mask": prompts.attention_mask}
    if is_text_backbone(inner):
        positions = text_positions(prompts.attention_mask)  # [U, Lp']
        out = inner(**common, position_ids=positions, use_cache=True)
        return out.last_hidden_state[:, -1], out.past_key_values, positions.amax(1) + 1
    positions, _ = inner.get_rope_index(
        prompts.input_ids,
        mm_token_type_ids=prompts.mm_token_type_ids,
        image_grid_thw=prompts.image_grid_thw,
        attention_mask=prompts.attention_mask,
    )  # [3, U, Lp']
    vision = {}
    if prompts.image_grid_thw is not None:
        vision = image_inputs(batch.prompts, used, prompts.pixel_values, image_features)
    out = inner(
        **common,
        position_ids=positions,
        mm_token_type_ids=prompts.mm_token_type_ids,
        image_grid_thw=prompts.image_grid_thw,
        use_cache=True,
        **vision,
    )
    return out.last_hidden_state[:, -1], out.past_key_values, positions.amax(dim=(0, 2)) + 1


def continuation_hidden(
    model: Any,
    tokens: torch.Tensor,
    prompt_mask: torch.Tensor,
    start: torch.Tensor,
    cache: Any,
) -> torch.Tensor:
    """Hidden states [N, C, H] of completion tokens [N, C] fed over a per-row prompt cache.

    prompt_mask [N, Lp'] (the rows' prompt attention masks), start [N] (the position of each
    row's first completion token). Completion columns are all attended: a column past a row's
    end is only ever seen by later columns of that row, which are not scored.
    """
    inner = unwrap(model).model
    n, c = tokens.shape
    mask = torch.cat([prompt_mask, prompt_mask.new_ones(n, c)], dim=1)  # [N, Lp' + C]
    positions = start[:, None] + torch.arange(c, device=tokens.device)  # [N, C]
    if not is_text_backbone(inner):
        positions = positions[None].expand(3, n, c)  # [3, N, C] all axes equal after the prompt
    out = inner(
        input_ids=tokens,
        attention_mask=mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
    )
    return out.last_hidden_state


def packs_continuations(model: Any) -> bool:
    """Whether continuations can be packed exactly: where `--packing` is (models.packing's
    model types, no sliding window) and the attention is sdpa, which takes a custom 4-D
    boolean mask as is."""
    return packing_refusal(unwrap(model)) is None and attention_of(unwrap(model)) == "sdpa"


@dataclass
class ContinuationBins:
    """The fed completion tokens of N rows, packed per prompt into B bins of C tokens."""

    tokens: torch.Tensor  # [B, C] long, 0 in a bin's unused tail
    offsets: torch.Tensor  # [B, C] long: t for row i's t-th token (its position - start)
    sees: torch.Tensor  # [B, C, C] bool: same row and not later (a tail slot: itself)
    prompt: torch.Tensor  # [B] long: the distinct prompt (index into U) of each bin
    index: torch.Tensor  # [N, W] long: flat slot in B * C of row i's t-th token (0 past it)


def bin_continuations(
    tokens: torch.Tensor, fed: list[int], slot: list[int], capacity: int
) -> ContinuationBins:
    """Pack tokens[i, :fed[i]] (tokens [N, W]) of the rows of each prompt slot[i] into bins
    of `capacity` tokens, first-fit-decreasing (models.packing.assign_bins)."""
    n, w = tokens.shape
    place: list[tuple[int, int]] = [(0, 0)] * n  # (bin, offset in it) of each row
    bin_prompt: list[int] = []
    for u in sorted(set(slot)):
        rows = [i for i in range(n) if slot[i] == u and fed[i] > 0]
        bins, offsets, _ = assign_bins([fed[i] for i in rows], capacity)
        first = len(bin_prompt)
        bin_prompt += [u] * (max(bins, default=-1) + 1)
        for i, b, o in zip(rows, bins, offsets, strict=True):
            place[i] = (first + b, o)
    b = len(bin_prompt)
    packed = tokens.new_zeros(b, capacity)  # [B, C]
    offsets = torch.arange(capacity, device=tokens.device).repeat(b, 1)  # [B, C] tails too
    row_of = torch.full((b, capacity), -1, dtype=torch.long, device=tokens.device)  # [B, C]
    index = tokens.new_zeros(n, w)  # [N, W]
    for i in range(n):
        (bi, o), length = place[i], fed[i]
        packed[bi, o : o + length] = tokens[i, :length]
        offsets[bi, o : o + length] = torch.arange(length, device=tokens.device)
        row_of[bi, o : o + length] = i
        index[i, :length] = bi * capacity + o + torch.arange(length, device=tokens.device)
    causal = torch.ones(capacity, capacity, dtype=torch.bool, device=tokens.device).tril()
    same_row = (row_of[:, :, None] == row_of[:, None, :]) & (row_of[:, :, None] >= 0)
    tail = torch.eye(capacity, dtype=torch.bool, device=tokens.device) & (row_of < 0)[:, :, None]
    sees = (same_row & causal) | tail  # [B, C, C]
    prompt = torch.tensor(bin_prompt, dtype=torch.long, device=tokens.device)  # [B]
    return ContinuationBins(packed, offsets, sees, prompt, index)


def packed_continuation_hidden(
    model: Any,
    bins: ContinuationBins,
    prompt_mask: torch.Tensor,
    start: torch.Tensor,
    cache: Any,
) -> torch.Tensor:
    """Hidden states [N, W, H] of each row's packed tokens (bins.index; 0-slot past a row's
    end, never scored) over its prompt's cache (U rows: prompt_mask [U, Lp'], start [U]).

    Bin b attends to [its prompt's real tokens | bins.sees[b]] through a [B, 1, C, Lp' + C]
    boolean mask, at positions start[prompt] + offset (all three axes for Qwen2.5-VL)."""
    inner = unwrap(model).model
    b, c = bins.tokens.shape
    cache.batch_select_indices(bins.prompt)  # each bin gets its prompt's keys and values
    prompt_part = prompt_mask[bins.prompt].bool()[:, None, :].expand(b, c, -1)  # [B, C, Lp']
    mask = torch.cat([prompt_part, bins.sees], dim=2)[:, None]  # [B, 1, C, Lp' + C]
    positions = start[bins.prompt][:, None] + bins.offsets  # [B, C]
    if not is_text_backbone(inner):
        positions = positions[None].expand(3, b, c)  # [3, B, C]
    out = inner(
        input_ids=bins.tokens,
        attention_mask=mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
    )
    flat = out.last_hidden_state.reshape(b * c, -1)  # [B * C, H]
    return flat[bins.index]  # [N, W, H]


def completion_hidden(
    model: Any,
    batch: RolloutBatch,
    used: torch.Tensor,
    slot: torch.Tensor,
    width: int,
    packed: bool,
    image_features: list[torch.Tensor] | None,
) -> torch.Tensor:
    """The hidden states [N, Tg, H] predicting completion tokens 0 .. Tg - 1 of every row:
    its prompt's last state, then its continuation's (packed or as trimmed rows)."""
    last, cache, start = prefill(model, batch, used, image_features)  # [U, H], cache, [U]
    predicting = last[slot][:, None]  # [N, 1, H]: predicts completion token 0
    if width == 1:
        return predicting
    prompt_mask = select_prompts(batch.prompts, used).attention_mask  # [U, Lp']
    tokens = batch.completion_ids[:, : width - 1]  # [N, Tg - 1]
    if packed:
        fed = (batch.completion_mask.sum(1).long() - 1).clamp(min=0).tolist()  # [N]
        capacity = min(sum(fed), BIN_ROWS * (width - 1))
        bins = bin_continuations(tokens, fed, slot.tolist(), capacity)
        later = packed_continuation_hidden(model, bins, prompt_mask, start, cache)
    else:
        cache.batch_select_indices(slot)  # row i gets its prompt's keys and values
        later = continuation_hidden(model, tokens, prompt_mask[slot], start[slot], cache)
    return torch.cat([predicting, later], dim=1)  # [N, Tg, H]


def prefix_shared_logprobs(
    model: Any,
    batch: RolloutBatch,
    temperature: float = 1.0,
    with_entropy: bool = False,
    image_features: list[torch.Tensor] | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    suppressed: torch.Tensor | None = None,
    packed: bool | None = None,
) -> TokenLogProbs:
    """Float32 log-probs [N, T] of the completion tokens (0 off the mask), each prompt run
    once; equal to models.logprobs.completion_logprobs (see the module docstring).
    packed: continuations packed (None: where `packs_continuations`; True elsewhere raises)."""
    n, t = batch.completion_ids.shape
    width = int(batch.completion_mask.sum(1).max()) if n else 0  # Tg
    logp = batch.completion_mask.new_zeros(n, t)  # [N, T]
    if width == 0:  # nothing to score
        return TokenLogProbs(logp, logp.clone() if with_entropy else None)
    exact = packs_continuations(model)
    if packed and not exact:
        raise ValueError("packed continuations need sdpa attention on " + str(PACKABLE_TYPES))
    used, slot = distinct_prompts(batch.prompt_of_row)  # [U], [N]
    hidden = completion_hidden(
        model, batch, used, slot, width, exact if packed is None else packed, image_features
    )  # [N, Tg, H]
    out = token_logprobs(
        hidden,
        unwrap(model).lm_head.weight,
        batch.completion_ids[:, :width],
        batch.completion_mask[:, :width],
        temperature,
        with_entropy,
        chunk_tokens,
        suppressed,
    )
    pad = (0, t - width)
    entropy = None if out.entropy is None else torch.nn.functional.pad(out.entropy, pad)
    return TokenLogProbs(torch.nn.functional.pad(out.logp, pad), entropy)  # [N, T]


def prefix_shared_reference_logprobs(
    model: Any,
    batch: RolloutBatch,
    temperature: float = 1.0,
    image_features: list[torch.Tensor] | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    suppressed: torch.Tensor | None = None,
    packed: bool | None = None,
) -> torch.Tensor:
    """Log-probs [N, T] under the frozen reference (the adapter disabled), no grad."""
    with torch.no_grad(), model.disable_adapter():
        return prefix_shared_logprobs(
            model, batch, temperature, False, image_features, chunk_tokens, suppressed, packed
        ).logp
