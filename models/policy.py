"""The policy as the trainer sees it: a LoRA-wrapped Qwen2.5-VL plus its processor.

This is the one object through which grpo/ touches the model, so grpo/ never names Qwen.

`PolicySettings.lean` chooses how the numbers are computed, never which numbers: lean (the
default) samples with models.generation.sample_completions, scores completion positions only
in chunks (models.logprobs.completion_logprobs) and encodes each prompt's images once per step;
`lean=False` runs the straightforward versions (transformers' generate, a full-sequence,
full-vocabulary log_softmax, images encoded per row), for tests and `bench/step.py --naive`.
Both score the distribution the sampler draws from: the vision special tokens suppressed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from grpo.rollout import PromptInput, SamplingSettings
from models.batch import PromptBatch, RolloutBatch, build_rollout_batch, encode_prompts
from models.generation import hf_generate, sample_completions, stop_token_ids, vision_token_ids
from models.loading import LoraSettings, add_lora, load_base_model, resolve_model_path
from models.logprobs import (
    TokenLogProbs,
    completion_logprobs,
    encode_images,
    naive_completion_logprobs,
    naive_reference_logprobs,
    reference_logprobs,
)
from models.processor import fit_image, load_processor, pixel_bounds, render_prompt


@dataclass(frozen=True)
class PolicySettings:
    model: str = "tiny"
    lora: LoraSettings | None = field(default_factory=LoraSettings)  # None: no adapter
    dtype: str | None = None  # "bfloat16" | "float32" | None (bf16 on CUDA, fp32 on CPU)
    attn_implementation: str | None = None  # None/"auto" | "sdpa" | "flash_attention_2" | "eager"
    gradient_checkpointing: bool = False
    min_pixels: int | None = None  # None: the checkpoint's processor setting
    max_pixels: int | None = None
    chunk_tokens: int = 1024  # tokens per vocabulary-projection chunk in log-prob passes
    lean: bool = True  # False: the straightforward sampler and log-probs (see module docstring)


class Policy:
    """Model + processor, with the handful of operations a GRPO step needs."""

    def __init__(self, settings: PolicySettings, device: torch.device) -> None:
        dtype = getattr(torch, settings.dtype) if settings.dtype else None
        self.settings = settings
        self.device = device
        self.path = resolve_model_path(settings.model)
        model = load_base_model(self.path, device, dtype, settings.attn_implementation)
        model.requires_grad_(False)
        self.model = (
            add_lora(model, settings.lora, settings.gradient_checkpointing)
            if settings.lora
            else model
        )
        self.processor = load_processor(self.path, settings.min_pixels, settings.max_pixels)
        self.min_pixels, self.max_pixels = pixel_bounds(self.processor)
        tokenizer = self.processor.tokenizer
        self.pad_id: int = tokenizer.pad_token_id
        self.stop_ids = stop_token_ids(tokenizer)
        self.vision_ids = vision_token_ids(tokenizer)
        # never sampled, so never scored: their logits are -inf in every log-prob pass
        self.suppressed = torch.tensor(sorted(self.vision_ids), dtype=torch.long, device=device)

    # --- prompts -------------------------------------------------------------------------
    def prompt_input(self, messages: list[dict], images: list[Any]) -> PromptInput:
        """Render chat messages and size their images for the vision tower."""
        fitted = [fit_image(image, self.min_pixels, self.max_pixels) for image in images]
        return PromptInput(render_prompt(self.processor, messages), fitted)

    def encode(self, prompts: list[PromptInput]) -> PromptBatch:
        return encode_prompts(self.processor, prompts, self.device)

    def decode(self, completions: list[list[int]]) -> list[str]:
        return self.processor.tokenizer.batch_decode(completions, skip_special_tokens=True)

    # --- sampling and batches -------------------------------------------------------------
    def generate(
        self, prompts: list[PromptInput], n: int, settings: SamplingSettings
    ) -> list[list[int]]:
        was_training = self.model.training
        self.model.eval()  # no LoRA dropout while sampling
        try:
            if not self.settings.lean:
                return hf_generate(self.model, self.processor, prompts, n, settings, self.device)
            completions = sample_completions(
                self.model, self.encode(prompts), n, settings, self.stop_ids, self.suppressed
            )
            return completions.tokens
        finally:
            self.model.train(was_training)

    def rollout_batch(
        self, prompts: PromptBatch, completions: list[list[int]], group_size: int
    ) -> RolloutBatch:
        return build_rollout_batch(
            prompts, completions, group_size, self.pad_id, self.stop_ids, self.vision_ids
        )

    # --- log-probs ------------------------------------------------------------------------
    @property
    def vision_trainable(self) -> bool:
        return any(p.requires_grad for n, p in self.model.named_parameters() if ".visual." in n)

    def image_features(self, prompts: PromptBatch) -> list[torch.Tensor] | None:
        """Per-image features computed once, or None when the vision tower is trained (then
        every forward must run it with gradients) or the policy is not lean."""
        if not self.settings.lean or self.vision_trainable or prompts.pixel_values is None:
            return None
        with torch.no_grad():
            return encode_images(self.model, prompts)

    def logprobs(
        self,
        batch: RolloutBatch,
        temperature: float,
        with_entropy: bool = False,
        image_features: list[torch.Tensor] | None = None,
    ) -> TokenLogProbs:
        """Log-probs [N, T] (and entropy) of the completions under the policy, with grad."""
        if not self.settings.lean:
            return naive_completion_logprobs(
                self.model, batch, temperature, with_entropy, self.suppressed
            )
        return completion_logprobs(
            self.model,
            batch,
            temperature,
            with_entropy,
            image_features,
            self.settings.chunk_tokens,
            self.suppressed,
        )

    def reference_logprobs(
        self,
        batch: RolloutBatch,
        temperature: float,
        image_features: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Log-probs [N, T] under the frozen reference (adapter disabled), no grad."""
        if not self.settings.lean:
            return naive_reference_logprobs(self.model, batch, temperature, self.suppressed)
        return reference_logprobs(
            self.model,
            batch,
            temperature,
            image_features,
            self.settings.chunk_tokens,
            self.suppressed,
        )

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]
