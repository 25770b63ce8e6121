"""Per-token log-probabilities of sampled completions, computed only where the maths needs them.

For a rollout batch (models/batch.py) the log-prob of completion token t of row i is

    logp[i, t] = log softmax(z[i, t] / temperature)[y[i, t]],   z = lm_head(h[i, Lp - 1 + t])

where h is the backbone's last hidden state. Only the hidden states that predict completion
tokens, and only rows/steps inside the completion mask, go through the vocabulary projection;
they do so in chunks of `chunk_tokens` tokens, each chunk under activation checkpointing, so
the float32 logits that exist at any time are [chunk_tokens, vocab] — forward and backward —
instead of [N, Lp + T, vocab]. Entropy, when asked for, comes from the same logits.

The image features can be computed once per prompt and shared by the G rows that continue it
(`encode_images`), which is exact while the vision tower is not being trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from models.batch import PromptBatch, RolloutBatch

DEFAULT_CHUNK_TOKENS = 1024


@dataclass
class TokenLogProbs:
    logp: torch.Tensor  # [N, T] float32; 0 outside the completion mask
    entropy: torch.Tensor | None  # [N, T] float32, detached; None unless asked for


def unwrap(model: Any) -> Any:
    """The Qwen2_5_VLForConditionalGeneration inside peft / DDP wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def encode_images(model: Any, prompts: PromptBatch) -> list[torch.Tensor]:
    """Vision features per image: [tokens_i, hidden] each (tokens_i = grid_i.prod() / 4)."""
    if prompts.pixel_values is None:
        return []
    inner = unwrap(model).model
    out = inner.get_image_features(prompts.pixel_values, prompts.image_grid_thw, return_dict=True)
    return list(out.pooler_output)


def features_for_rows(
    features: list[torch.Tensor], prompts: PromptBatch, prompt_of_row: torch.Tensor
) -> torch.Tensor:
    """Image features of every row's images, concatenated in row order: [tokens, hidden]."""
    starts = [0]
    for count in prompts.images_per_prompt:
        starts.append(starts[-1] + count)
    per_row = [f for j in prompt_of_row.tolist() for f in features[starts[j] : starts[j + 1]]]
    return torch.cat(per_row)


def backbone_hidden(
    model: Any, batch: RolloutBatch, image_features: list[torch.Tensor] | None = None
) -> torch.Tensor:
    """Last hidden states [N, Lp + T, H] of the backbone (no vocabulary projection).

    input_ids, mm_token_type_ids and image_grid_thw go in on every call so the 3-D rotary
    positions are recomputed (generate() leaves stale `rope_deltas` on the model).
    With `image_features` (per prompt image, from `encode_images`) the vision tower is skipped.
    """
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    inner = unwrap(model).model
    kwargs: dict[str, Any] = {}
    if batch.image_grid_thw is not None:
        if image_features is None:
            kwargs["pixel_values"] = batch.pixel_values
        else:
            rows = features_for_rows(image_features, batch.prompts, batch.prompt_of_row)
            kwargs["mm_encoder_outputs"] = {
                "image": BaseModelOutputWithPooling(pooler_output=(rows,))
            }
    out = inner(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        mm_token_type_ids=batch.mm_token_type_ids,
        image_grid_thw=batch.image_grid_thw,
        use_cache=False,
        **kwargs,
    )
    return out.last_hidden_state


def _logit_dtype(hidden: torch.Tensor) -> torch.dtype:
    """float32, or float64 when the inputs are float64."""
    return torch.promote_types(hidden.dtype, torch.float32)


def _chunk_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) and entropy for one chunk. hidden [C, H], weight [V, H], targets [C]."""
    # float32 at least (bf16 logits are too coarse for ratios); float64 stays float64 (tests)
    logits = (hidden @ weight.T).to(_logit_dtype(hidden)) / temperature  # [C, V]
    log_z = torch.logsumexp(logits, dim=-1)  # [C]
    logp = logits.gather(-1, targets[:, None]).squeeze(-1) - log_z  # [C]
    entropy = torch.zeros_like(log_z)
    if with_entropy:
        with torch.no_grad():
            probs = torch.softmax(logits, dim=-1)  # [C, V]
            entropy = log_z - (probs * logits).sum(-1)  # H = log Z - E_p[z]
    return logp, entropy.detach()


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> TokenLogProbs:
    """Log-probs of `targets` from `hidden` through `weight`, only where `mask` is set.

    hidden [N, T, H] (position t predicts targets[:, t]); weight [V, H]; targets, mask [N, T].
    """
    n, t = targets.shape
    where = mask.reshape(-1).nonzero().squeeze(-1)  # [M] flat indices of scored tokens
    h = hidden.reshape(n * t, -1)[where]  # [M, H]
    y = targets.reshape(-1)[where]  # [M]
    logp = hidden.new_zeros(n * t, dtype=_logit_dtype(hidden))  # [N*T]
    entropy = hidden.new_zeros(n * t, dtype=_logit_dtype(hidden))  # [N*T]
    pieces, entropies = [], []
    for start in range(0, where.numel(), chunk_tokens):
        args = (h[start : start + chunk_tokens], weight, y[start : start + chunk_tokens])
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            # recompute the chunk's logits in backward instead of keeping them alive
            lp, ent = checkpoint(
                _chunk_logprobs, *args, temperature, with_entropy, use_reentrant=False
            )
        else:
            lp, ent = _chunk_logprobs(*args, temperature, with_entropy)
        pieces.append(lp)
        entropies.append(ent)
    if pieces:
        logp = logp.index_put((where,), torch.cat(pieces))  # out of place: keeps the graph
        entropy = entropy.index_put((where,), torch.cat(entropies))
    return TokenLogProbs(logp.view(n, t), entropy.view(n, t) if with_entropy else None)


def completion_logprobs(
    model: Any,
    batch: RolloutBatch,
    temperature: float = 1.0,
    with_entropy: bool = False,
    image_features: list[torch.Tensor] | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> TokenLogProbs:
    """Float32 log-probs [N, T] of the completion tokens under `model` (LoRA as it is set)."""
    hidden = backbone_hidden(model, batch, image_features)  # [N, Lp + T, H]
    lp, t = batch.prompt_length, batch.completion_ids.shape[1]
    predicting = hidden[:, lp - 1 : lp - 1 + t]  # [N, T, H]: position p predicts token p + 1
    weight = unwrap(model).lm_head.weight  # [V, H]
    return token_logprobs(
        predicting,
        weight,
        batch.completion_ids,
        batch.completion_mask,
        temperature,
        with_entropy,
        chunk_tokens,
    )


def reference_logprobs(
    model: Any,
    batch: RolloutBatch,
    temperature: float = 1.0,
    image_features: list[torch.Tensor] | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """Log-probs [N, T] under the frozen reference: the same model with its adapter disabled."""
    with torch.no_grad(), model.disable_adapter():
        return completion_logprobs(
            model, batch, temperature, False, image_features, chunk_tokens
        ).logp


def naive_completion_logprobs(
    model: Any, batch: RolloutBatch, temperature: float = 1.0
) -> torch.Tensor:
    """The straightforward computation, for tests and `bench --naive`: full-sequence,
    full-vocabulary float32 log_softmax, images encoded once per row. [N, T]."""
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        mm_token_type_ids=batch.mm_token_type_ids,
        pixel_values=batch.pixel_values,
        image_grid_thw=batch.image_grid_thw,
        use_cache=False,
    )
    logp_all = F.log_softmax(out.logits.float() / temperature, dim=-1)  # [N, Lp + T, V]
    lp, t = batch.prompt_length, batch.completion_ids.shape[1]
    logp = logp_all[:, lp - 1 : lp - 1 + t].gather(-1, batch.completion_ids[..., None]).squeeze(-1)
    return logp * batch.completion_mask  # [N, T]
