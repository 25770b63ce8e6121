"""Padding-free (packed) log-prob passes (`--packing`) for text LMs and Qwen2.5-VL.

A rollout batch (models/batch.py) holds N rows of width Lp + T, most of it padding when prompt
and completion lengths are ragged. Packing moves each row's real tokens (its prompt without
left padding, its completion up to and including the first EOS: attention_mask == 1) into
bins of C tokens, back to back, with positions restarting at 0 for every row:

    row i, k-th real token  ->  flat slot  bin_i * C + offset_i + k,   position k

Bins are filled first-fit-decreasing; a bin's unused tail holds pad tokens numbered 0, 1, ...
so they form a sequence of their own. No attention mask goes in: transformers then reads the
sequence boundaries from the position ids (a position that does not follow its left
neighbour by 1 starts a new sequence), and
- sdpa / eager build an exact block-diagonal causal mask per bin (masking_utils'
  find_packed_sequence_indices) but compute all C^2 scores of a bin, so bins hold
  C = BIN_ROWS x the longest row: attention costs about BIN_ROWS x the padded batch's
  (a few % of a step at these lengths) while the projections and MLPs see no padding;
- flash-attention takes its varlen kernel (cu_seq_lens from the position ids, passed
  explicitly here), so everything goes in one bin of all real tokens. This path is written
  for the GPU and is not exercised on the CPU-only machine the tests run on.
Each row attends to exactly its own tokens at the positions the padded pass gives them
(models.batch.text_positions: first real token at 0), so packed log-probs equal padded ones
up to float summation order.

Qwen2.5-VL's rotary positions are 3-D (temporal, height, width over each image's grid). They
are computed per padded row by the model's own get_rope_index, as the padded pass computes
them, and moved to the row's packed slots. The backbone gets transformers' 4-row form,
position_ids [4, B, C]:
    row 0      the 1-D position k above: only the mask (sequence boundaries) and
               flash-attention's varlen kwargs read it;
    rows 1..3  the padded pass's 3-D rotary positions, which the rotary embedding uses.
(In the 3-row form the model builds one causal mask over the whole bin: rows would see each
other.) The image features go in the order their placeholder tokens appear in the packed
bins, since the model scatters features into image tokens in flat order; mm_token_type_ids
are packed like input_ids.

Refused, with the reason, where exactness is not verified: other model types (Qwen2-VL
included), other attention implementations, sliding-window attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# model types whose transformers backbones build their masks through masking_utils (which
# detects packed position ids) and whose packed log-probs are tested equal to the padded ones
PACKABLE_TYPES = ("llama", "qwen2", "qwen2_5_vl")
FLASH = ("flash_attention_2", "flash_attention_3")
PACKABLE_ATTENTION = ("sdpa", "eager", *FLASH)
BIN_ROWS = 4  # sdpa / eager bins: this many times the longest row


class PackingError(ValueError):
    """Packing was asked for a model where it would not be exact."""


def attention_of(model: Any) -> str:
    """The language model's attention implementation (a VLM's text config holds it)."""
    config = getattr(model.config, "text_config", None) or model.config
    return getattr(config, "_attn_implementation", None) or "eager"


def packing_refusal(model: Any) -> str | None:
    """Why packed passes would not be exact for `model` (a backbone-holding LM), or None."""
    config = model.config
    if config.model_type not in PACKABLE_TYPES:
        return f"packing is verified for model types {PACKABLE_TYPES}, not {config.model_type!r}"
    attention = attention_of(model)
    if attention not in PACKABLE_ATTENTION:
        return f"packing needs attention in {PACKABLE_ATTENTION}, the model uses {attention!r}"
    text = getattr(config, "text_config", None) or config
    if getattr(text, "use_sliding_window", False):
        return "packing is not verified with sliding-window attention (use_sliding_window)"
    return None


@dataclass
class PackedBatch:
    """Real tokens of N rows in B bins of C tokens; see the module docstring."""

    input_ids: torch.Tensor  # [B, C]
    position_ids: torch.Tensor  # [B, C]  restart at 0 per row (and per bin tail)
    slot: torch.Tensor  # [N, L] long: flat index into B * C of each real token, -1 on padding
    lengths: list[int]  # [B] real tokens per bin (the rest is its tail)

    def gather(self, values: torch.Tensor, fill: int = 0) -> torch.Tensor:
        """Per-token values [..., N, L] of the padded rows moved to their slots: [..., B, C]
        (`fill` in the tails)."""
        real = self.slot >= 0  # [N, L]
        flat = values.new_full((*values.shape[:-2], self.input_ids.numel()), fill)  # [..., B*C]
        flat[..., self.slot[real]] = values[..., real]
        return flat.view(*values.shape[:-2], *self.input_ids.shape)


def assign_bins(lengths: list[int], capacity: int) -> tuple[list[int], list[int], list[int]]:
    """First-fit-decreasing: (bin of each row, its offset in the bin, tokens used per bin)."""
    bins, offset, used = [0] * len(lengths), [0] * len(lengths), []
    for i in sorted(range(len(lengths)), key=lambda r: -lengths[r]):
        b = next((b for b, u in enumerate(used) if u + lengths[i] <= capacity), len(used))
        if b == len(used):
            used.append(0)
        bins[i], offset[i] = b, used[b]
        used[b] += lengths[i]
    return bins, offset, used


def pack_rows(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, capacity: int | None = None
) -> PackedBatch:
    """Pack the real tokens of input_ids [N, L] (attention_mask [N, L] 0/1) into bins of
    `capacity` tokens (None: the longest row's length). Tails hold token 0: being a sequence
    of their own, their ids never reach a real token."""
    real = attention_mask.bool()  # [N, L]
    lengths = real.sum(1).tolist()  # [N]
    capacity = max(capacity or 0, max(lengths, default=1), 1)
    bins, offset, used = assign_bins(lengths, capacity)
    device = input_ids.device
    start = torch.tensor(bins, device=device) * capacity + torch.tensor(offset, device=device)
    rank = real.long().cumsum(1) - 1  # [N, L]: k, the k-th real token of its row
    slot = torch.where(real, start[:, None] + rank, torch.full_like(rank, -1))  # [N, L]
    flat_ids = input_ids.new_zeros(len(used) * capacity)  # [B * C]
    flat_ids[slot[real]] = input_ids[real]
    positions = torch.arange(capacity, device=device).repeat(len(used))  # [B * C] tails
    positions[slot[real]] = rank[real]
    tails = [torch.arange(capacity - u, device=device) for u in used]  # tails count from 0
    positions = positions.view(len(used), capacity)
    for b, tail in enumerate(tails):
        positions[b, used[b] :] = tail
    return PackedBatch(flat_ids.view(len(used), capacity), positions, slot, used)


def varlen_kwargs(text_positions: torch.Tensor) -> dict[str, Any]:
    """flash-attention's varlen arguments for one packed row text_positions [1, S]: the
    cumulative sequence starts (where the position restarts at 0) and the longest sequence."""
    starts = (text_positions[0] == 0).nonzero().squeeze(-1)  # [sequences]
    bounds = torch.cat([starts, starts.new_tensor([text_positions.shape[1]])]).int()
    longest = int(bounds.diff().max())
    return {
        "cu_seq_lens_q": bounds,
        "cu_seq_lens_k": bounds,
        "max_length_q": longest,
        "max_length_k": longest,
    }


def packed_hidden(
    model: Any,
    packed: PackedBatch,
    batch: Any = None,
    image_features: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Last hidden states [B * C, H] of the backbone over the packed bins (no mask: the
    position ids carry the boundaries; flash-attention also gets cu_seq_lens).
    A Qwen2.5-VL backbone also needs the rollout batch (models.batch.RolloutBatch) the bins
    were packed from, and takes `image_features` (per prompt image) to skip its vision tower."""
    inner = model.model
    if hasattr(inner, "get_rope_index"):
        return packed_vision_hidden(model, packed, batch, image_features)
    ids, positions = packed.input_ids, packed.position_ids  # [B, C]
    extra: dict[str, Any] = {}
    if attention_of(model) in FLASH:
        ids, positions = ids.reshape(1, -1), positions.reshape(1, -1)  # [1, B * C] varlen
        extra = varlen_kwargs(positions)
    out = inner(input_ids=ids, position_ids=positions, use_cache=False, **extra)
    return out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])  # [B * C, H]


# --------------------------------------------------------------------------------------------
# Qwen2.5-VL: 3-D rotary positions and image features in packed order
# --------------------------------------------------------------------------------------------


def packed_rope_positions(inner: Any, batch: Any, packed: PackedBatch) -> torch.Tensor:
    """position_ids [4, B, C]: the 1-D positions (row 0) over the padded pass's 3-D rotary
    positions (rows 1..3, get_rope_index on the padded rows with their mask)."""
    rope, _ = inner.get_rope_index(
        batch.input_ids,
        batch.mm_token_type_ids,
        image_grid_thw=batch.image_grid_thw,
        attention_mask=batch.attention_mask,
    )  # [3, N, L]
    spatial = packed.gather(rope)  # [3, B, C]; tails 0 (overwritten below)
    tails = packed.slot.new_ones(packed.input_ids.numel(), dtype=torch.bool)  # [B * C]
    tails[packed.slot[packed.slot >= 0]] = False
    tails = tails.view_as(packed.position_ids)  # [B, C]
    spatial = torch.where(tails, packed.position_ids, spatial)  # tails count 0, 1, ... too
    return torch.cat([packed.position_ids[None], spatial])  # [4, B, C]


def row_image_features(
    inner: Any, batch: Any, image_features: list[torch.Tensor] | None
) -> list[list[torch.Tensor]]:
    """Per row, its images' features ([tokens_k, H] each): from `image_features` (one per
    prompt image) through prompt_of_row, or from the vision tower over the rows' patches."""
    counts = [batch.prompts.images_per_prompt[j] for j in batch.prompt_of_row.tolist()]  # [N]
    if image_features is not None:
        first = [0]
        for count in batch.prompts.images_per_prompt:
            first.append(first[-1] + count)
        return [image_features[first[j] : first[j + 1]] for j in batch.prompt_of_row.tolist()]
    out = inner.get_image_features(batch.pixel_values, batch.image_grid_thw, return_dict=True)
    per_image, rows, at = list(out.pooler_output), [], 0  # per image of all rows, row order
    for count in counts:
        rows.append(per_image[at : at + count])
        at += count
    return rows


def packed_image_features(
    inner: Any, batch: Any, packed: PackedBatch, image_features: list[torch.Tensor] | None
) -> torch.Tensor:
    """Every row's image features [tokens, H] in the flat order of the packed bins: rows by
    their first slot, each row's images in its own order."""
    per_row = row_image_features(inner, batch, image_features)
    first_slot = packed.slot.masked_fill(packed.slot < 0, packed.slot.numel()).amin(1)  # [N]
    order = first_slot.argsort().tolist()
    return torch.cat([f for i in order for f in per_row[i]])


def packed_vision_hidden(
    model: Any, packed: PackedBatch, batch: Any, image_features: list[torch.Tensor] | None
) -> torch.Tensor:
    """`packed_hidden` of a Qwen2.5-VL backbone: [B * C, H]."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    if batch is None:
        raise ValueError("packing a Qwen2.5-VL batch needs the rollout batch (3-D positions)")
    inner = model.model
    ids = packed.input_ids  # [B, C]
    positions = packed_rope_positions(inner, batch, packed)  # [4, B, C]
    token_types = packed.gather(batch.mm_token_type_ids)  # [B, C]
    extra: dict[str, Any] = {}
    if batch.image_grid_thw is not None and batch.image_grid_thw.shape[0]:
        features = packed_image_features(inner, batch, packed, image_features)  # [tokens, H]
        extra["mm_encoder_outputs"] = {
            "image": BaseModelOutputWithPooling(pooler_output=(features,))
        }
    if attention_of(model) in FLASH:
        ids, token_types = ids.reshape(1, -1), token_types.reshape(1, -1)  # [1, B * C]
        positions = positions.reshape(4, 1, -1)  # [4, 1, B * C] varlen
        extra |= varlen_kwargs(positions[0])
    out = inner(
        input_ids=ids,
        position_ids=positions,
        mm_token_type_ids=token_types,
        use_cache=False,
        **extra,
    )
    return out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])  # [B * C, H]


def bin_capacity(model: Any, attention_mask: torch.Tensor) -> int:
    """All real tokens in one bin for flash-attention's varlen kernel; BIN_ROWS x the longest
    row otherwise (a dense block-diagonal mask costs C^2 per bin, so bins stay short)."""
    total = int(attention_mask.sum())
    if attention_of(model) in FLASH:
        return total
    return min(total, BIN_ROWS * int(attention_mask.sum(1).max()))
