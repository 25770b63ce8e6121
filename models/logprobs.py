"""Per-token log-probabilities of sampled completions, computed only where the maths needs them.

For a rollout batch (models/batch.py) the log-prob of completion token t of row i is

    z        = lm_head(h[i, Lp - 1 + t]) / temperature              (h: backbone last hidden state)
    z[s]     = -inf  for every suppressed id s                        (the vision special tokens)
    logp[i, t] = z[y] - logsumexp(z),   y = y[i, t]

The samplers never emit the vision special tokens: transformers' `suppress_tokens` and vLLM's
`bad_words` set their logits to -inf before sampling. So the distribution actually sampled from
is the model's softmax renormalised over the other tokens, and that is the distribution scored
here: passing the same ids as `suppressed` removes a constant -log(1 - p_vision) gap between the
sampler's and the trainer's log-probs (p_vision: the mass the model puts on those tokens).

The lean path (`completion_logprobs`):
- only the hidden states that predict completion tokens, and only rows/steps inside the
  completion mask, go through the vocabulary projection;
- they do so in chunks of `chunk_tokens` tokens through `ChunkLogProb`, an autograd function
  that keeps no logits: forward saves the chunk's hidden states and log Z; backward recomputes
  the chunk's logits and turns them, in place, into the gradient
      d logp / d z = onehot(y) - softmax(z),
  so one float32 [chunk_tokens, vocab] tensor is alive at a time, forward and backward;
- entropy, when asked for, is a no-grad by-product of the same forward pass;
- image features can be computed once per prompt and shared by the G rows that continue it
  (`encode_images`), which is exact while the vision tower is not being trained.

The straightforward computation the lean one must equal (the full model forward with logits
for every position, a float32 log_softmax over the whole vocabulary, images encoded once per
row) lives in tests/naive.py, for the tests and `bench/step.py --naive`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import FunctionCtx, once_differentiable

from grpo.types import TokenLogProbs
from models.batch import PromptBatch, RolloutBatch, text_positions
from models.cpu_half import matmul_weight, matmul_weight_t
from models.packing import PackingError, bin_capacity, pack_rows, packed_hidden, packing_refusal

DEFAULT_CHUNK_TOKENS = 1024


def unwrap(model: Any) -> Any:
    """The Qwen2_5_VLForConditionalGeneration inside peft / DDP wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_text_backbone(inner: Any) -> bool:
    """A text-only LM's backbone (LlamaModel, Qwen2Model, ...): no vision inputs, 1-D positions.
    Qwen2.5-VL's is recognised by its 3-D rotary index."""
    return not hasattr(inner, "get_rope_index")


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


def image_inputs(
    prompts: PromptBatch,
    prompt_of_row: torch.Tensor,
    pixel_values: torch.Tensor | None,
    image_features: list[torch.Tensor] | None,
) -> dict[str, Any]:
    """The vision keyword arguments of a forward: the rows' patches, or (with `image_features`,
    one entry per prompt image) the finished features, which skips the vision tower."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    if prompts.image_grid_thw is None:
        return {}
    if image_features is None:
        return {"pixel_values": pixel_values}
    rows = features_for_rows(image_features, prompts, prompt_of_row)  # [tokens, H]
    return {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=(rows,))}}


def backbone_hidden(
    model: Any, batch: RolloutBatch, image_features: list[torch.Tensor] | None = None
) -> torch.Tensor:
    """Last hidden states [N, Lp + T, H] of the backbone (no vocabulary projection).

    input_ids, mm_token_type_ids and image_grid_thw go in on every call so the 3-D rotary
    positions are recomputed (generate() leaves stale `rope_deltas` on the model).
    With `image_features` (per prompt image, from `encode_images`) the vision tower is skipped.
    A text-only LM gets input_ids, the mask and explicit 1-D positions only.
    """
    inner = unwrap(model).model
    if is_text_backbone(inner):
        positions = text_positions(batch.attention_mask)  # [N, Lp + T]
        out = inner(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=positions,
            use_cache=False,
        )
        return out.last_hidden_state
    vision = image_inputs(batch.prompts, batch.prompt_of_row, batch.pixel_values, image_features)
    out = inner(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        mm_token_type_ids=batch.mm_token_type_ids,
        image_grid_thw=batch.image_grid_thw,
        use_cache=False,
        **vision,
    )
    return out.last_hidden_state


# --------------------------------------------------------------------------------------------
# One chunk: logits -> log p(target), entropy; gradient by recomputation
# --------------------------------------------------------------------------------------------


def _logit_dtype(hidden: torch.Tensor) -> torch.dtype:
    """float32, or float64 when the inputs are float64."""
    return torch.promote_types(hidden.dtype, torch.float32)


def chunk_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    temperature: float,
    suppressed: torch.Tensor | None,
) -> torch.Tensor:
    """z = hidden @ weight^T / temperature with the suppressed ids at -inf: [C, V], float32+.

    hidden [C, H], weight [V, H], suppressed [S] long. The matmul runs in the inputs' dtype
    (a bf16 weight is not copied to float32; on a CPU without bf16 kernels it is upcast a
    block at a time, models/cpu_half.py); its result is float32 at least, because bf16
    logits are too coarse for probability ratios.
    """
    logits = matmul_weight_t(hidden, weight).to(_logit_dtype(hidden))  # [C, V], a fresh tensor
    if temperature != 1.0:
        logits.div_(temperature)
    if suppressed is not None and suppressed.numel():
        logits.index_fill_(1, suppressed, float("-inf"))
    return logits


def log_partition(
    logits: torch.Tensor, suppressed: torch.Tensor | None, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log Z [C], entropy [C] or None) of logits [C, V], which are overwritten.

    With m the row max, y = z - m and e = exp(y), S = sum(e):
        log Z = m + log S,    H = -sum p log p = log S - sum(e * y) / S.
    In place where possible: without entropy the only [C, V] tensor is `logits` itself (a
    fresh large tensor costs page faults on a CPU, and torch.logsumexp makes one).
    """
    top = logits.amax(-1)  # [C]
    shifted = logits.sub_(top[:, None])  # [C, V] y = z - m (suppressed stay -inf)
    if not with_entropy:
        total = shifted.exp_().sum(-1)  # [C] S
        return top + total.log(), None
    weights = shifted.exp()  # [C, V] e
    total = weights.sum(-1)  # [C] S
    if suppressed is not None and suppressed.numel():
        shifted.index_fill_(1, suppressed, 0.0)  # e = 0 there; 0 * -inf would be NaN
    spread = weights.mul_(shifted).sum(-1)  # [C] sum(e * y)
    return top + total.log(), total.log() - spread / total


class ChunkLogProb(torch.autograd.Function):
    """log p(targets) [C] of one chunk, and its entropy [C] (no gradient) when asked for.

    Saves hidden [C, H], weight [V, H], targets [C] and log Z [C]; never the [C, V] logits.
    Backward, with g = d loss / d logp [C]:
        G = (softmax(z) - onehot(y)) * (-g / temperature)[:, None]    [C, V], built in place
        d hidden = G @ weight,   d weight = G^T @ hidden (only when the weight is trained)
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        temperature: float,
        suppressed: torch.Tensor | None,
        with_entropy: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = chunk_logits(hidden, weight, temperature, suppressed)  # [C, V]
        picked = logits.gather(-1, targets[:, None]).squeeze(-1)  # [C] z[y]
        log_z, entropy = log_partition(logits, suppressed, with_entropy)  # logits consumed
        logp = picked - log_z  # [C]
        entropy = entropy if entropy is not None else torch.zeros_like(logp)
        ctx.save_for_backward(hidden, weight, targets, log_z, suppressed)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad_logp: torch.Tensor, grad_entropy: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, targets, log_z, suppressed = ctx.saved_tensors
        grad = chunk_logits(hidden, weight, ctx.temperature, suppressed)  # [C, V]: z
        grad.sub_(log_z[:, None]).exp_()  # softmax(z); the suppressed ids come out 0
        rows = torch.arange(targets.shape[0], device=targets.device)  # [C]
        grad[rows, targets] -= 1.0  # softmax - onehot
        grad.mul_((-grad_logp.to(grad.dtype) / ctx.temperature)[:, None])  # [C, V]: G
        grad = grad.to(weight.dtype)
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden = matmul_weight(grad, weight).to(hidden.dtype) if need_hidden else None
        grad_weight = matmul_weight(grad.T, hidden.to(weight.dtype)) if need_weight else None
        return grad_hidden, grad_weight, None, None, None, None


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    suppressed: torch.Tensor | None = None,
) -> TokenLogProbs:
    """Log-probs of `targets` from `hidden` through `weight`, only where `mask` is set.

    hidden [N, T, H] (position t predicts targets[:, t]); weight [V, H]; targets, mask [N, T];
    suppressed [S]: ids whose logits are -inf (the tokens the sampler never emits).
    """
    n, t = targets.shape
    where = mask.reshape(-1).nonzero().squeeze(-1)  # [M] flat indices of scored tokens
    h = hidden.reshape(n * t, -1)[where]  # [M, H]
    return scored_logprobs(
        h, weight, targets, where, temperature, with_entropy, chunk_tokens, suppressed
    )


def scored_logprobs(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    where: torch.Tensor,
    temperature: float,
    with_entropy: bool,
    chunk_tokens: int,
    suppressed: torch.Tensor | None,
) -> TokenLogProbs:
    """Log-probs [N, T] (0 off `where`) from h [M, H], the hidden states predicting the M
    scored tokens targets.view(-1)[where] (where [M]: flat indices into [N, T])."""
    n, t = targets.shape
    y = targets.reshape(-1)[where]  # [M]
    logp = h.new_zeros(n * t, dtype=_logit_dtype(h))  # [N*T]
    entropy = h.new_zeros(n * t, dtype=_logit_dtype(h))  # [N*T]
    pieces, entropies = [], []
    for start in range(0, where.numel(), chunk_tokens):
        chunk = slice(start, start + chunk_tokens)
        lp, ent = ChunkLogProb.apply(
            h[chunk], weight, y[chunk], temperature, suppressed, with_entropy
        )
        pieces.append(lp)
        entropies.append(ent)
    if pieces:
        logp = logp.index_put((where,), torch.cat(pieces))  # out of place: keeps the graph
        entropy = entropy.index_put((where,), torch.cat(entropies))
    return TokenLogProbs(logp.view(n, t), entropy.view(n, t) if with_entropy else None)


# --------------------------------------------------------------------------------------------
# Whole batches
# --------------------------------------------------------------------------------------------


def completion_logprobs(
    model: Any,
    batch: RolloutBatch,
    temperature: float = 1.0,
    with_entropy: bool = False,
    image_features: list[torch.Tensor] | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    suppressed: torch.Tensor | None = None,
    packing: bool = False,
) -> TokenLogProbs:
    """Float32 log-probs [N, T] of the completion tokens under `model` (LoRA as it is set).
    packing: one padding-free pass over the rows' real tokens (models/packing.py)."""
    if packing:
        return packed_completion_logprobs(
            model, batch, temperature, with_entropy, chunk_tokens, suppressed, image_features
        )
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
        suppressed,
    )


def packed_completion_logprobs(
    model: Any,
    batch: RolloutBatch,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    suppressed: torch.Tensor | None = None,
    image_features: list[torch.Tensor] | None = None,
) -> TokenLogProbs:
    """`completion_logprobs` through packed bins (PackingError where packing is not exact).

    Completion token t of row i sits at column Lp + t; the hidden state predicting it is the
    one of column Lp + t - 1, found in the packed output through PackedBatch.slot.
    """
    inner = unwrap(model)
    if reason := packing_refusal(inner):
        raise PackingError(reason)
    capacity = bin_capacity(inner, batch.attention_mask)
    packed = pack_rows(batch.input_ids, batch.attention_mask, capacity)  # [B, C]
    hidden = packed_hidden(inner, packed, batch, image_features)  # [B * C, H]
    lp, t = batch.prompt_length, batch.completion_ids.shape[1]
    where = batch.completion_mask.reshape(-1).nonzero().squeeze(-1)  # [M]
    predictor = packed.slot[:, lp - 1 : lp - 1 + t].reshape(-1)[where]  # [M] packed slots
    weight = inner.lm_head.weight  # [V, H]
    return scored_logprobs(
        hidden[predictor],  # [M, H]
        weight,
        batch.completion_ids,
        where,
        temperature,
        with_entropy,
        chunk_tokens,
        suppressed,
    )


def reference_logprobs(
    model: Any,
    batch: RolloutBatch,
    temperature: float = 1.0,
    image_features: list[torch.Tensor] | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    suppressed: torch.Tensor | None = None,
    packing: bool = False,
) -> torch.Tensor:
    """Log-probs [N, T] under the frozen reference: the same model with its adapter disabled."""
    with torch.no_grad(), model.disable_adapter():
        return completion_logprobs(
            model, batch, temperature, False, image_features, chunk_tokens, suppressed, packing
        ).logp
