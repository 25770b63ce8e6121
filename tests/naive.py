"""The straightforward computations the lean ones must equal: for tests and bench/step.py --naive.

`NaivePolicy` is models.policy.Policy computing the same numbers the obvious way:
- sampling with transformers' `generate`: every prompt repeated G times before the prefill
  (each image through the vision tower G times), a logits-processor chain over the whole
  vocabulary and `torch.multinomial`;
- log-probs from the model's logits at every position (prompt included), a float32
  log_softmax over the whole vocabulary, images encoded once per row;
- no image features shared between forwards.
Both score the distribution the sampler draws from: the vision special tokens suppressed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from grpo.types import (
    ModelBackend,
    PolicySettings,
    PromptInput,
    Rollout,
    Sampler,
    SamplerSettings,
    SamplingSettings,
    TokenLogProbs,
)
from models import BACKEND, make_sampler
from models.batch import (
    PromptBatch,
    RolloutBatch,
    encode_prompts,
    encode_text_prompts,
    repeat_images,
)
from models.generation import Completions, cut_at_stop, stop_token_ids, vision_token_ids
from models.loading import is_vision_language, resolve_model_path
from models.logprobs import is_text_backbone, unwrap
from models.policy import Policy, TextPolicy


def naive_completion_logprobs(
    model: Any,
    batch: RolloutBatch,
    temperature: float = 1.0,
    with_entropy: bool = False,
    suppressed: torch.Tensor | None = None,
) -> TokenLogProbs:
    """The straightforward computation, for tests and `bench --naive`: the model's logits for
    every position, a float32 log_softmax over the whole vocabulary, the images encoded once
    per row, then the completion positions picked out. [N, T] (entropy detached).
    A text-only LM gets input_ids and the mask only (its own default positions)."""
    vision = {}
    if not is_text_backbone(unwrap(model).model):
        vision = {
            "mm_token_type_ids": batch.mm_token_type_ids,
            "pixel_values": batch.pixel_values,
            "image_grid_thw": batch.image_grid_thw,
        }
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        use_cache=False,
        **vision,
    )
    logits = out.logits.float() / temperature  # [N, Lp + T, V]
    if suppressed is not None:
        logits = logits.index_fill(-1, suppressed, float("-inf"))
    logp_all = F.log_softmax(logits, dim=-1)  # [N, Lp + T, V]
    lp, t = batch.prompt_length, batch.completion_ids.shape[1]
    logp_completion = logp_all[:, lp - 1 : lp - 1 + t]  # [N, T, V]
    logp = logp_completion.gather(-1, batch.completion_ids[..., None]).squeeze(-1)  # [N, T]
    entropy = None
    if with_entropy:
        with torch.no_grad():
            finite = logp_completion.clamp(min=torch.finfo(logp_completion.dtype).min)
            entropy = -(finite.exp() * finite).sum(-1) * batch.completion_mask  # [N, T]
    return TokenLogProbs(logp * batch.completion_mask, entropy)


def naive_reference_logprobs(
    model: Any,
    batch: RolloutBatch,
    temperature: float = 1.0,
    suppressed: torch.Tensor | None = None,
) -> torch.Tensor:
    """`naive_completion_logprobs` with the adapter disabled: [N, T]."""
    with torch.no_grad(), model.disable_adapter():
        return naive_completion_logprobs(model, batch, temperature, False, suppressed).logp


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
    `processor` may be a text-only model's tokenizer: then no vision inputs, nothing suppressed.
    """
    text_only = not hasattr(processor, "image_processor")
    tokenizer = processor if text_only else processor.tokenizer
    if text_only:
        batch = encode_text_prompts(tokenizer, prompts, device)
    else:
        batch = encode_prompts(processor, prompts, device)
    rows = [j for j in range(batch.num_prompts) for _ in range(n)]
    index = torch.tensor(rows, device=device)  # [N]
    pixels, grids = repeat_images(batch, rows)
    extra = {} if pixels is None else {"pixel_values": pixels, "image_grid_thw": grids}
    if not text_only:
        extra["mm_token_type_ids"] = batch.mm_token_type_ids[index]
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
        "max_new_tokens": settings.max_new_tokens,
        "eos_token_id": sorted(stop_token_ids(tokenizer)),
        "pad_token_id": tokenizer.pad_token_id,
        "suppress_tokens": [] if text_only else sorted(vision_token_ids(tokenizer)),
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
    tokenizer = getattr(processor, "tokenizer", processor)
    kwargs = generate_kwargs(processor, prompts, n, settings, device)
    out = model.generate(**kwargs)  # [N, Lp + new]
    new_tokens = out[:, kwargs["input_ids"].shape[1] :].tolist()
    stop = stop_token_ids(tokenizer)
    return [cut_at_stop(tokens, stop, tokenizer.pad_token_id) for tokens in new_tokens]


class NaivePolicy(Policy):
    """Policy with every operation done the straightforward way (module docstring)."""

    def sample(
        self,
        prompts: PromptBatch,
        n: int,
        settings: SamplingSettings,
        image_features: list[torch.Tensor] | None = None,
    ) -> Completions:
        raise NotImplementedError("NaivePolicy samples from PromptInputs: use NaiveSampler")

    def image_features(self, prompts: PromptBatch) -> None:
        return None

    def logprobs(
        self,
        batch: RolloutBatch,
        temperature: float,
        with_entropy: bool = False,
        image_features: Any = None,
    ) -> TokenLogProbs:
        return naive_completion_logprobs(
            self.model, batch, temperature, with_entropy, self.suppressed
        )

    def reference_logprobs(
        self, batch: RolloutBatch, temperature: float, image_features: Any = None
    ) -> torch.Tensor:
        if self.full:  # the frozen copy of the base: no adapter to disable
            with torch.no_grad():
                reference = self.frozen_reference()
                return naive_completion_logprobs(
                    reference, batch, temperature, False, self.suppressed
                ).logp
        return naive_reference_logprobs(self.model, batch, temperature, self.suppressed)


class NaiveSampler:
    """transformers' `generate` on the policy's weights; it reports no log-probs of its own
    (NaN), as a sampler that throws them away would."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    def generate(self, prompts: list[PromptInput], n: int, settings: SamplingSettings) -> Rollout:
        policy = self.policy
        processor = policy.processor or policy.tokenizer  # a text-only LM has no processor
        ids = hf_generate(policy.model, processor, prompts, n, settings, policy.device)
        return Rollout(ids, [[float("nan")] * len(row) for row in ids])

    def sync_weights(self, policy: Policy) -> None:
        return None

    def close(self) -> None:
        return None


class NaiveTextPolicy(NaivePolicy, TextPolicy):
    """NaivePolicy for a text-only causal LM: TextPolicy's prompts, NaivePolicy's maths."""


def load_naive_policy(settings: PolicySettings, device: torch.device) -> NaivePolicy:
    """NaivePolicy for a Qwen2.5-VL checkpoint, NaiveTextPolicy for any other causal LM."""
    vision = is_vision_language(resolve_model_path(settings.model))
    return (NaivePolicy if vision else NaiveTextPolicy)(settings, device)


def naive_view(policy: Policy) -> NaivePolicy:
    """`policy` (the same model object, the same weights) computing the straightforward way."""
    view = NaivePolicy.__new__(NaivePolicy)
    view.__dict__.update(policy.__dict__)
    return view


def _naive_sampler(settings: SamplerSettings, policy: Policy) -> Sampler:
    """transformers' generate for "hf"; vLLM is vLLM either way."""
    return NaiveSampler(policy) if settings.backend == "hf" else make_sampler(settings, policy)


NAIVE_BACKEND = ModelBackend(
    load_policy=load_naive_policy,
    make_sampler=_naive_sampler,
    load_trained=BACKEND.load_trained,
    check_same_base=BACKEND.check_same_base,
)
