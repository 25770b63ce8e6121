"""Sampling with the policy's own weights: a lean decoding loop.

It draws N = P * n completions (group-major) from

    p(v) = softmax(z / temperature)[v],   z = lm_head(h_last),   z[s] = -inf for vision ids s,

then top-k / top-p when asked for, the distribution transformers' `generate` samples from (the
straightforward sampler, in tests/naive.py). `generate` repeats every prompt n times before the
prefill, so each image goes through the vision tower n times; and per step it runs a
logits-processor chain over the whole [N, V] vocabulary and `torch.multinomial`, which draws V
exponential variates per row. `sample_completions` computes only what the draw needs:
- the prefill runs once per prompt (P rows, each image encoded once); its KV cache is then
  repeated n times (`Cache.batch_repeat_interleave`) and only the last position's logits exist;
- suppression writes -inf into the S vision columns in place;
- a token is drawn by inverting the CDF: one uniform per row and a float64 cumulative sum,
  instead of V exponentials per row. The sorting of top-k / top-p runs only when they are on;
- rows that have produced a stop token leave the batch (and its cache) at once;
- it reports the log-prob of each drawn token under the distribution it was drawn from.
Decode positions are passed explicitly: the 3-D rotary position of generated token t of a row is
(largest position of its prompt) + 1 + t on all three axes, as in the model's training forward.
A text-only LM gets 1-D positions the same way (models.batch.text_positions): no vision inputs,
and the suppressed set is empty.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from grpo.types import SamplingSettings
from models.batch import PromptBatch, text_positions
from models.logprobs import image_inputs, is_text_backbone, unwrap

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


def stop_token_ids(tokenizer: Any, generation_config: Any = None) -> set[int]:
    """The tokenizer's eos, the generation config's eos ids, and <|im_end|> (ends an assistant
    turn) and <|endoftext|> (ends a document) when the vocabulary has them."""
    vocab = tokenizer.get_vocab()
    ids = {vocab[t] for t in ("<|im_end|>", "<|endoftext|>") if t in vocab}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    configured = getattr(generation_config, "eos_token_id", None)
    if configured is not None:
        ids.update([configured] if isinstance(configured, int) else configured)
    return ids


def cut_at_stop(tokens: list[int], stop_ids: set[int], pad_id: int) -> list[int]:
    """Tokens up to and including the first stop token; trailing padding removed."""
    for t, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[: t + 1]
    while tokens and tokens[-1] == pad_id:
        tokens = tokens[:-1]
    return tokens


# --------------------------------------------------------------------------------------------
# One draw from [N, V] logits
# --------------------------------------------------------------------------------------------


def processed_scores(
    logits: torch.Tensor, settings: SamplingSettings, suppressed: torch.Tensor
) -> torch.Tensor:
    """The scores a token is drawn from: [N, V] float32, `logits` overwritten when it is
    float32 already. Suppressed ids -inf, divided by the temperature (not when greedy), then
    transformers' own top-k and top-p warpers, only when they are on (they sort the row)."""
    scores = logits.float()  # [N, V]
    scores.index_fill_(1, suppressed, float("-inf"))
    if settings.greedy:
        return scores
    if settings.temperature != 1.0:
        scores.div_(settings.temperature)
    if settings.top_k > 0:
        from transformers.generation.logits_process import TopKLogitsWarper

        scores = TopKLogitsWarper(settings.top_k)(None, scores)
    if settings.top_p < 1.0:
        from transformers.generation.logits_process import TopPLogitsWarper

        scores = TopPLogitsWarper(settings.top_p)(None, scores)
    return scores


def draw_tokens(
    scores: torch.Tensor, uniform: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row from softmax(scores), by inverting the CDF; and its log-prob.

    scores [N, V] (-inf = impossible; overwritten); uniform [N] in [0, 1) (default: torch.rand).
    With w = exp(scores - max) and c its float64 cumulative sum, the token is the first v with
    c[v] > u * c[V-1]: token v is drawn with probability w[v] / sum(w), and a zero-weight token
    never (its interval is empty). Returns (tokens [N] long, log p(token) [N] float32).
    """
    n = scores.shape[0]
    if uniform is None:
        uniform = torch.rand(n, dtype=torch.float64, device=scores.device)
    shifted = scores.sub_(scores.amax(-1, keepdim=True))  # [N, V], max 0
    weights = shifted.exp()  # [N, V]
    cdf = weights.cumsum(-1, dtype=torch.float64)  # [N, V]
    total = cdf[:, -1:]  # [N, 1]
    # u * total strictly below total, so the search always lands on a token of weight > 0
    below_total = torch.nextafter(total, torch.zeros_like(total))  # [N, 1]
    target = torch.minimum(uniform.to(cdf)[:, None] * total, below_total)  # [N, 1]
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(-1)  # [N]
    logp = shifted.gather(-1, tokens[:, None]).squeeze(-1) - total.squeeze(-1).log().float()
    return tokens, logp


def next_tokens(
    logits: torch.Tensor, settings: SamplingSettings, suppressed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [N] for logits [N, V], and their log-probs [N] under the processed distribution
    (greedy: the untempered one, as vLLM reports it)."""
    scores = processed_scores(logits, settings, suppressed)  # [N, V]
    if not settings.greedy:
        return draw_tokens(scores)
    tokens = scores.argmax(-1)  # [N]
    logp = scores.gather(-1, tokens[:, None]).squeeze(-1) - torch.logsumexp(scores, -1)
    return tokens, logp


# --------------------------------------------------------------------------------------------
# The lean decoding loop
# --------------------------------------------------------------------------------------------


@dataclass
class Completions:
    """N = P * n sampled completions, group-major, each ending at its first stop token."""

    tokens: list[list[int]]
    logprobs: list[list[float]]  # per token, under the distribution it was drawn from


def prompt_positions(inner: Any, prompts: PromptBatch) -> torch.Tensor:
    """Rotary positions [3, P, Lp] of the left-padded prompts (0 on padding); a text-only LM's
    1-D ones as [1, P, Lp]."""
    if is_text_backbone(inner):
        return text_positions(prompts.attention_mask)[None]  # [1, P, Lp]
    positions, _ = inner.get_rope_index(
        prompts.input_ids,
        mm_token_type_ids=prompts.mm_token_type_ids,
        image_grid_thw=prompts.image_grid_thw,
        attention_mask=prompts.attention_mask,
    )
    return positions


def _prefill(
    model: Any, prompts: PromptBatch, image_features: list[torch.Tensor] | None
) -> tuple[torch.Tensor, Any, torch.Tensor]:
    """One forward over the P prompts: (last hidden state [P, H], KV cache, next position [P])."""
    inner = unwrap(model).model
    positions = prompt_positions(inner, prompts)  # [3, P, Lp]
    next_position = positions.amax(dim=(0, 2)) + 1  # [P]
    if is_text_backbone(inner):
        out = inner(
            input_ids=prompts.input_ids,
            attention_mask=prompts.attention_mask,
            position_ids=positions[0],  # [P, Lp]
            use_cache=True,
        )
        return out.last_hidden_state[:, -1], out.past_key_values, next_position
    own_rows = torch.arange(prompts.num_prompts, device=prompts.input_ids.device)  # [P]
    out = inner(
        input_ids=prompts.input_ids,
        attention_mask=prompts.attention_mask,
        position_ids=positions,
        mm_token_type_ids=prompts.mm_token_type_ids,
        image_grid_thw=prompts.image_grid_thw,
        use_cache=True,
        **image_inputs(prompts, own_rows, prompts.pixel_values, image_features),
    )
    return out.last_hidden_state[:, -1], out.past_key_values, next_position


def _decode_step(
    model: Any, token: torch.Tensor, mask: torch.Tensor, position: torch.Tensor, cache: Any
) -> torch.Tensor:
    """Feed one token per row [A] at position `position` [A] (3-D for Qwen2.5-VL, all axes
    equal for text); next logits [A, V]."""
    inner = unwrap(model).model
    if is_text_backbone(inner):
        positions = position.view(-1, 1)  # [A, 1]
    else:
        positions = position.view(1, -1, 1).expand(3, -1, 1)  # [3, A, 1]
    out = inner(
        input_ids=token[:, None],
        attention_mask=mask,  # [A, cached + 1]
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
    )
    return unwrap(model).lm_head(out.last_hidden_state[:, -1])


def _start_groups(
    model: Any, prompts: PromptBatch, n: int, image_features: list[torch.Tensor] | None
) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor]:
    """Prefill each prompt once and hand it to its n rows: first logits [N, V], the KV cache
    repeated n times, next positions [N], attention mask [N, Lp]."""
    hidden, cache, position = _prefill(model, prompts, image_features)  # [P, H], cache, [P]
    logits = unwrap(model).lm_head(hidden).repeat_interleave(n, dim=0)  # [N, V]
    cache.batch_repeat_interleave(n)
    position = position.repeat_interleave(n)  # [N]
    mask = prompts.attention_mask.repeat_interleave(n, dim=0)  # [N, Lp]
    return logits, cache, position, mask


def _cut(tokens: torch.Tensor, logps: torch.Tensor, lengths: torch.Tensor) -> Completions:
    """Rows of tokens [N, W] and logps [N, W] cut at their lengths [N]."""
    ends = lengths.long().tolist()
    return Completions(
        [row[:end] for row, end in zip(tokens.tolist(), ends, strict=True)],
        [row[:end] for row, end in zip(logps.tolist(), ends, strict=True)],
    )


@torch.no_grad()
def sample_completions(
    model: Any,
    prompts: PromptBatch,
    n: int,
    settings: SamplingSettings,
    stop_ids: set[int],
    suppressed: torch.Tensor,
    image_features: list[torch.Tensor] | None = None,
    synced: bool = False,
) -> Completions:
    """n completions per prompt (rows group-major) with a KV cache shared across each group.

    `image_features` (per prompt image, from models.logprobs.encode_images) skip the vision
    tower; without them each image is encoded once here, not n times.
    synced: the model is sharded (FSDP2), and every forward is a collective, so each rank runs
    as many decode steps as the rank that decodes longest (`synced_sample`).
    """
    if synced:
        return synced_sample(model, prompts, n, settings, stop_ids, suppressed, image_features)
    device, width = prompts.input_ids.device, settings.max_new_tokens
    logits, cache, position, mask = _start_groups(model, prompts, n, image_features)
    active = torch.arange(mask.shape[0], device=device)  # [A] output row of each active row

    stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    tokens = torch.zeros(mask.shape[0], width, dtype=torch.long, device=device)  # [N, W]
    logps = torch.zeros(mask.shape[0], width, device=device)  # [N, W]
    lengths = torch.full((mask.shape[0],), width, device=device)  # [N]
    for t in range(width):
        token, logp = next_tokens(logits, settings, suppressed)  # [A], [A]
        tokens[active, t], logps[active, t] = token, logp
        stopped = torch.isin(token, stops)  # [A]
        if stopped.any():  # finished rows leave the batch and the cache
            lengths[active[stopped]] = t + 1
            going = (~stopped).nonzero().squeeze(-1)  # [A']
            if going.numel() == 0:
                break
            active, token, position, mask = (x[going] for x in (active, token, position, mask))
            cache.batch_select_indices(going)
        if t + 1 < width:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)  # [A, Lp + t + 1]
            logits = _decode_step(model, token, mask, position + t, cache)  # [A, V]
    return _cut(tokens, logps, lengths)


def _anyone_decoding(going: bool, device: torch.device) -> bool:
    """Whether some rank still has rows decoding (a collective)."""
    import torch.distributed as dist

    flag = torch.tensor([float(going)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


@torch.no_grad()
def synced_sample(
    model: Any,
    prompts: PromptBatch,
    n: int,
    settings: SamplingSettings,
    stop_ids: set[int],
    suppressed: torch.Tensor,
    image_features: list[torch.Tensor] | None = None,
) -> Completions:
    """`sample_completions` for a sharded model: the same distribution, in lock-step across
    ranks (not the same random numbers: stopped rows still draw).

    Rows that stop stay in the batch (their later tokens are discarded by `lengths`), and the
    loop ends only when no rank has a row decoding: then every rank has run the same number
    of forwards, so the blocks' all-gathers pair up.
    """
    device, width = prompts.input_ids.device, settings.max_new_tokens
    logits, cache, position, mask = _start_groups(model, prompts, n, image_features)
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    tokens = torch.zeros(mask.shape[0], width, dtype=torch.long, device=device)  # [N, W]
    logps = torch.zeros(mask.shape[0], width, device=device)  # [N, W]
    lengths = torch.full((mask.shape[0],), width, device=device)  # [N]
    for t in range(width):
        token, logp = next_tokens(logits, settings, suppressed)  # [N], [N]
        decoding = lengths == width  # [N] not stopped before step t
        tokens[decoding, t], logps[decoding, t] = token[decoding], logp[decoding]
        lengths[decoding & torch.isin(token, stops)] = t + 1
        going = bool((lengths == width).any())
        if t + 1 == width or not _anyone_decoding(going, device):
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)  # [N, Lp + t + 1]
        logits = _decode_step(model, token, mask, position + t, cache)  # [N, V]
    return _cut(tokens, logps, lengths)
