"""Padding-free (packed) log-prob passes for text-only LMs (`--packing`).

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
  explicitly here), so everything goes in one bin of all real tokens.
Each row attends to exactly its own tokens at the positions the padded pass gives them
(models.batch.text_positions: first real token at 0), so packed log-probs equal padded ones
up to float summation order.

Qwen2.5-VL is refused: its rotary positions are 3-D (get_rope_index per row over the image
grid), which this 1-D packing would not reproduce. So is any model type whose attention masks
are not verified here to honour packed position ids: packing is exact or it is not used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# model types whose transformers backbones build their masks through masking_utils (which
# detects packed position ids) and whose packed log-probs are tested equal to the padded ones
PACKABLE_TYPES = ("llama", "qwen2")
FLASH = ("flash_attention_2", "flash_attention_3")
PACKABLE_ATTENTION = ("sdpa", "eager", *FLASH)
BIN_ROWS = 4  # sdpa / eager bins: this many times the longest row


class PackingError(ValueError):
    """Packing was asked for a model where it would not be exact."""


def packing_refusal(model: Any) -> str | None:
    """Why packed passes would not be exact for `model` (a backbone-holding LM), or None."""
    config = model.config
    if hasattr(model.model, "get_rope_index"):
        return (
            f"{config.model_type} uses 3-D rotary positions (get_rope_index per row); packing "
            "keeps 1-D positions only, so it is refused for vision-language models"
        )
    if config.model_type not in PACKABLE_TYPES:
        return f"packing is verified for model types {PACKABLE_TYPES}, not {config.model_type!r}"
    attention = getattr(config, "_attn_implementation", None) or "eager"
    if attention not in PACKABLE_ATTENTION:
        return f"packing needs attention in {PACKABLE_ATTENTION}, the model uses {attention!r}"
    return None


@dataclass
class PackedBatch:
    """Real tokens of N rows in B bins of C tokens; see the module docstring."""

    input_ids: torch.Tensor  # [B, C]
    position_ids: torch.Tensor  # [B, C]  restart at 0 per row (and per bin tail)
    slot: torch.Tensor  # [N, L] long: flat index into B * C of each real token, -1 on padding
    lengths: list[int]  # [B] real tokens per bin (the rest is its tail)


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


def packed_hidden(model: Any, packed: PackedBatch) -> torch.Tensor:
    """Last hidden states [B * C, H] of the backbone over the packed bins (no mask: the
    position ids carry the boundaries; flash-attention also gets cu_seq_lens)."""
    inner = model.model
    ids, positions = packed.input_ids, packed.position_ids  # [B, C]
    extra: dict[str, Any] = {}
    if getattr(model.config, "_attn_implementation", None) in FLASH:
        ids, positions = ids.reshape(1, -1), positions.reshape(1, -1)  # [1, B * C] varlen
        starts = (positions[0] == 0).nonzero().squeeze(-1)  # [sequences]
        bounds = torch.cat([starts, starts.new_tensor([positions.shape[1]])]).int()
        longest = int(bounds.diff().max())
        extra = {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds}
        extra |= {"max_length_q": longest, "max_length_k": longest}
    out = inner(input_ids=ids, position_ids=positions, use_cache=False, **extra)
    return out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])  # [B * C, H]


def bin_capacity(model: Any, attention_mask: torch.Tensor) -> int:
    """All real tokens in one bin for flash-attention's varlen kernel; BIN_ROWS x the longest
    row otherwise (a dense block-diagonal mask costs C^2 per bin, so bins stay short)."""
    total = int(attention_mask.sum())
    if getattr(model.config, "_attn_implementation", None) in FLASH:
        return total
    return min(total, BIN_ROWS * int(attention_mask.sum(1).max()))
