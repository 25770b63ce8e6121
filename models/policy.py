"""The policy as the trainer sees it: a LoRA-wrapped Qwen2.5-VL plus its processor, or
(TextPolicy) a LoRA-wrapped text-only causal LM plus its tokenizer. `make_policy` picks the
class from the checkpoint's config; the two differ only in how prompts are rendered and
encoded and in the (empty, for text) set of suppressed vision tokens. With settings.full the
model is not wrapped: its language-model weights train themselves, and the reference is a
frozen copy of the base (models/full.py).

It implements grpo.types.Policy, so grpo/ never names Qwen. Every operation is the lean one:
sampling prefills each prompt once (models.generation.sample_completions), log-probs are
computed for completion positions only, in chunks (models.logprobs.completion_logprobs), and
each prompt's images are encoded once per step. The straightforward versions, for tests and
`bench/step.py --naive`, live in tests/naive.py. Both score the distribution the sampler draws
from: the vision special tokens suppressed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from grpo.types import PolicySettings, PromptInput, SamplingSettings, ShardSettings, TokenLogProbs
from models.batch import (
    PromptBatch,
    RolloutBatch,
    build_rollout_batch,
    encode_prompts,
    encode_text_prompts,
)
from models.full import (
    checkpointing_active,
    frozen_copy,
    load_full_weights,
    make_fully_trainable,
    save_full,
)
from models.generation import Completions, sample_completions, stop_token_ids, vision_token_ids
from models.loading import (
    LoraSettings,
    ModelLoadError,
    add_lora,
    is_vision_language,
    load_base_model,
    resolve_model_path,
)
from models.logprobs import completion_logprobs, encode_images, unwrap
from models.merge import lora_linears, merged_weight
from models.packing import PackingError, packing_refusal
from models.prefix import prefix_shared_logprobs
from models.processor import fit_image, fitted_size, load_processor, pixel_bounds, render_prompt
from models.tokenizer_cache import load_tokenizer


def lora_settings(settings: PolicySettings) -> LoraSettings | None:
    """The adapter to add (None: full fine-tuning, or lora_r 0, a frozen model for evaluation).
    No dropout: the policy that is trained must be the one that was sampled (and that vLLM
    holds)."""
    if settings.full or settings.lora_r <= 0:
        return None
    return LoraSettings(settings.lora_r, settings.lora_alpha, 0.0, settings.lora_vision)


class Policy:
    """Model + processor, with the handful of operations a GRPO step needs."""

    has_vision = True

    def __init__(self, settings: PolicySettings, device: torch.device) -> None:
        dtype = getattr(torch, settings.dtype) if settings.dtype else None
        self.settings = settings
        self.device = device
        self.path = resolve_model_path(settings.model)
        model = load_base_model(self.path, device, dtype, settings.attn_implementation)
        lora = lora_settings(settings)
        model.requires_grad_(False)
        self.full = settings.full
        # full fine-tuning's reference: the base, copied before anything trains (beta > 0 only)
        self.reference = frozen_copy(model) if settings.full and settings.reference else None
        if lora:
            model = add_lora(model, lora, settings.gradient_checkpointing, self.has_vision)
        if settings.full:
            self.make_full(model, settings)
        self.model = model
        self.model.eval()  # dropout off for good (see lora_settings)
        if settings.packing and (reason := packing_refusal(unwrap(model))):
            raise PackingError(f"--packing refused for {self.path}: {reason}")
        self.tokenizer = self.load_inputs(settings)
        self.pad_id: int = self.tokenizer.pad_token_id
        self.stop_ids = stop_token_ids(self.tokenizer, getattr(model, "generation_config", None))
        self.vision_ids = vision_token_ids(self.tokenizer) if self.has_vision else set()
        # never sampled, so never scored: their logits are -inf in every log-prob pass
        self.suppressed = torch.tensor(sorted(self.vision_ids), dtype=torch.long, device=device)
        self.root: torch.nn.Module | None = None  # the FSDP2 root unit once sharded
        self.reference_root: torch.nn.Module | None = None  # the frozen copy's, when sharded

    def run(self, step: Callable[..., Any], *args: Any) -> Any:
        """step(model, *args): through the root FSDP unit when sharded (models/sharding.py),
        so the parameters outside the blocks are gathered for it."""
        if self.root is None:
            return step(self.model, *args)
        return self.root(step, *args)

    def make_full(self, model: Any, settings: PolicySettings) -> None:
        """Every language-model weight trainable (the vision tower's too with lora_vision)."""
        if settings.lora_vision and not self.has_vision:
            raise ModelLoadError("lora_vision was asked for, but the model has no vision tower")
        self.trained_names = set(make_fully_trainable(model, settings.lora_vision))
        if settings.gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )

    def load_inputs(self, settings: PolicySettings) -> Any:
        """Load what turns prompts into tensors (the processor); return its tokenizer."""
        self.processor = load_processor(self.path, settings.min_pixels, settings.max_pixels)
        self.min_pixels, self.max_pixels = pixel_bounds(self.processor)
        return self.processor.tokenizer

    # --- prompts -------------------------------------------------------------------------
    def prompt_input(self, messages: list[dict], images: list[Any]) -> PromptInput:
        """Render chat messages and size their images for the vision tower."""
        fitted = [fit_image(image, self.min_pixels, self.max_pixels) for image in images]
        return PromptInput(render_prompt(self.processor, messages), fitted)

    def encode(self, prompts: list[PromptInput]) -> PromptBatch:
        return encode_prompts(self.processor, prompts, self.device)

    def prompt_lengths(self, prompts: PromptBatch) -> list[int]:
        return prompts.attention_mask.sum(1).tolist()

    def decode(self, completions: list[list[int]]) -> list[str]:
        return self.tokenizer.batch_decode(completions, skip_special_tokens=True)

    # --- sampling and batches -------------------------------------------------------------
    def sample(
        self,
        prompts: PromptBatch,
        n: int,
        settings: SamplingSettings,
        image_features: list[torch.Tensor] | None = None,
    ) -> Completions:
        """n completions per encoded prompt with their log-probs, from the policy's weights
        (the adapter merged into them for the pass, see `merged_for_sampling`)."""
        with self.merged_for_sampling():
            return self.run(
                sample_completions,
                prompts,
                n,
                settings,
                self.stop_ids,
                self.suppressed,
                image_features,
                self.sharded,  # every rank decodes until all are done: the blocks' collectives
            )

    @contextmanager
    def merged_for_sampling(self) -> Iterator[None]:
        """Inside the block every LoRA linear computes with W' = W + s * B @ A as its base
        weight and the adapter off: the same function, one matmul per linear instead of
        three (models/merge.py's merged_weight). W is swapped out, never written, so leaving
        the block restores it bit for bit (a merge and unmerge in place would leave it off by
        rounding). Costs one copy of the adapted weights while sampling; settings
        merge_for_sampling False keeps the adapter as it is."""
        layers = list(lora_linears(self.model).values())
        # sharded (FSDP2): W is a shard that only the root unit gathers, so no merge here
        if not self.settings.merge_for_sampling or not layers or self.sharded:
            yield
            return
        merged = [merged_weight(layer) for layer in layers]  # before any W is swapped
        bases = [layer.get_base_layer() for layer in layers]
        originals = [base.weight.data for base in bases]
        try:
            for base, weight in zip(bases, merged, strict=True):
                base.weight.data = weight
            with self.model.disable_adapter():
                yield
        finally:
            for base, weight in zip(bases, originals, strict=True):
                base.weight.data = weight

    def rollout_batch(
        self, prompts: PromptBatch, completions: list[list[int]], group_size: int
    ) -> RolloutBatch:
        return build_rollout_batch(
            prompts, completions, group_size, self.pad_id, self.stop_ids, self.vision_ids
        )

    # --- log-probs ------------------------------------------------------------------------
    @property
    def prefix_shared(self) -> bool:
        """Log-prob passes run each group's prompt once (models/prefix.py): the default, unless
        --packing is asked for or --no-prefix-sharing keeps the padded batch for comparison.
        With gradient checkpointing the padded pass is kept: a checkpointed block recomputed
        in backward would append its keys to the shared cache a second time."""
        s = self.settings
        return s.prefix_sharing and not s.packing and not s.gradient_checkpointing

    @property
    def vision_trainable(self) -> bool:
        return any(p.requires_grad for n, p in self.model.named_parameters() if ".visual." in n)

    def visual_tokens(self, width: int, height: int) -> int:
        """One token per 28x28 patch of the fitted image (2x2 patches of 14 merged)."""
        h, w = fitted_size(height, width, self.min_pixels, self.max_pixels)
        return (h // 28) * (w // 28)

    def image_features(self, prompts: PromptBatch) -> list[torch.Tensor] | None:
        """Per-image features computed once, or None when there are no images or the vision
        tower is trained (then every forward must run it with gradients)."""
        if self.vision_trainable or prompts.pixel_values is None:
            return None
        with torch.no_grad():
            return self.run(encode_images, prompts)

    def logprobs(
        self,
        batch: RolloutBatch,
        temperature: float,
        with_entropy: bool = False,
        image_features: list[torch.Tensor] | None = None,
    ) -> TokenLogProbs:
        """Log-probs [N, T] (and entropy) of the completions under the policy, with grad."""
        checkpointing = self.settings.gradient_checkpointing and torch.is_grad_enabled()
        with checkpointing_active(self.model, checkpointing):
            logp, entropy = self.run(
                logprob_tensors, *self.pass_args(batch, temperature, with_entropy, image_features)
            )
        return TokenLogProbs(logp, entropy)

    def reference_logprobs(
        self,
        batch: RolloutBatch,
        temperature: float,
        image_features: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Log-probs [N, T] under the frozen reference, no grad: the adapter disabled (LoRA),
        or the frozen copy of the base standing in (full fine-tuning; sharded like the policy)."""
        with torch.no_grad(), self.adapter_disabled():
            args = self.pass_args(batch, temperature, False, image_features)
            return self.run(logprob_tensors, *args)[0]

    def pass_args(
        self,
        batch: RolloutBatch,
        temperature: float,
        with_entropy: bool,
        image_features: list[torch.Tensor] | None,
    ) -> tuple[Any, ...]:
        """logprob_tensors' arguments after the model: this policy's chunking, suppressed ids
        and batch layout (prefix-shared, packed or padded)."""
        s = self.settings
        layout = "prefix" if self.prefix_shared else "packed" if s.packing else "padded"
        return (batch, temperature, with_entropy, image_features, s.chunk_tokens,
                self.suppressed, layout)  # fmt: skip

    # --- training state -------------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def frozen_reference(self) -> Any:
        """Full fine-tuning's frozen copy of the base; an error when none was kept."""
        if self.reference is None:
            raise RuntimeError(
                "this full fine-tuning policy keeps no reference copy (built only when the "
                "KL term needs one, beta > 0)"
            )
        return self.reference

    @contextmanager
    def adapter_disabled(self) -> Iterator[None]:
        """Inside the block the policy computes (and its merged weights are) the base model's:
        the adapter is switched off (LoRA) or the frozen copy stands in (full fine-tuning)."""
        if not self.full:
            with self.model.disable_adapter():
                yield
            return
        trained, self.model = self.model, self.frozen_reference()
        trained_root, self.root = self.root, self.reference_root
        try:
            yield
        finally:
            self.model, self.root = trained, trained_root

    def save_trainable(self, directory: Path) -> None:
        """The adapter in peft's format, or (full fine-tuning) the whole model as a transformers
        directory. Sharded: a collective (the tensors are gathered to rank 0, which writes);
        unsharded: call it on the writing rank only."""
        if self.root is None:
            if self.full:
                save_full(self, directory)
            else:
                self.model.save_pretrained(directory)
            return
        from models.sharding import gathered_state

        state = gathered_state(self.root, trained_only=not self.full)  # {} except on rank 0
        if not state:
            return
        if self.full:
            save_full(self, directory, state)
        else:
            self.model.save_pretrained(directory, state_dict=state)

    def load_trainable(self, directory: Path) -> None:
        from models.export import load_adapter_weights

        if self.root is not None:
            raise NotImplementedError(
                "a sharded policy resumes from its torch.distributed.checkpoint state "
                "(grpo/checkpoint.py), not from the adapter or model directory"
            )
        if self.full:
            load_full_weights(self.model, directory)
        else:
            load_adapter_weights(self.model, directory)

    # --- sharding (models/sharding.py) ----------------------------------------------------
    def shard(self, mesh: Any, settings: ShardSettings) -> None:
        from models.sharding import shard_model

        self.root = shard_model(self.model, mesh, settings)
        if self.reference is not None:  # full fine-tuning's frozen copy, sharded the same way
            self.reference_root = shard_model(self.reference, mesh, settings)

    @property
    def sharded(self) -> bool:
        return self.root is not None

    def module(self) -> torch.nn.Module:
        return self.root if self.root is not None else self.model

    def describe(self) -> dict[str, Any]:
        return {
            "base_model": self.settings.model,
            "base_model_path": self.path,
            "full": self.full,
        }


def logprob_tensors(
    model: Any,
    batch: RolloutBatch,
    temperature: float,
    with_entropy: bool,
    image_features: list[torch.Tensor] | None,
    chunk_tokens: int,
    suppressed: torch.Tensor,
    layout: str,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Completion log-probs [N, T] (and entropy) as a tuple of tensors, in the batch layout
    asked for: "prefix" (each group's prompt once, models/prefix.py), "packed"
    (models/packing.py) or "padded". A tuple: the root FSDP unit hooks the backward onto the
    tensors a forward returns, and it does not look inside a dataclass. Copies, not views: an
    in-place op on a returned view would bypass that hook ([N, T]: cheap)."""
    args = (batch, temperature, with_entropy, image_features, chunk_tokens, suppressed)
    if layout == "prefix":
        out = prefix_shared_logprobs(model, *args)
    else:
        out = completion_logprobs(model, *args, layout == "packed")
    entropy = out.entropy.clone() if out.entropy is not None else None
    return out.logp.clone(), entropy


def plain_message(message: dict) -> dict:
    """A message whose content is a list of parts -> the same with its text parts joined: not
    every text model's chat template accepts Qwen-VL's content lists."""
    content = message["content"]
    if isinstance(content, str):
        return message
    if any(part.get("type") != "text" for part in content):
        raise ValueError("a text-only model was given a message with non-text parts")
    return {**message, "content": "".join(part["text"] for part in content)}


class TextPolicy(Policy):
    """A text-only causal LM (Llama, Qwen2, ...): the tokenizer and its chat template stand in
    for the processor, nothing is suppressed, and no vision code runs."""

    has_vision = False

    def load_inputs(self, settings: PolicySettings) -> Any:
        tokenizer = load_tokenizer(self.path, padding_side="left")
        if tokenizer.pad_token_id is None:  # a pad id is needed for batches, never scored
            tokenizer.pad_token = tokenizer.eos_token
        self.processor = None
        self.min_pixels = self.max_pixels = None
        return tokenizer

    def prompt_input(self, messages: list[dict], images: list[Any]) -> PromptInput:
        if images:
            raise ValueError(f"{self.path} is a text-only model; this prompt has images")
        text = self.tokenizer.apply_chat_template(
            [plain_message(m) for m in messages], tokenize=False, add_generation_prompt=True
        )
        return PromptInput(text, [])

    def encode(self, prompts: list[PromptInput]) -> PromptBatch:
        return encode_text_prompts(self.tokenizer, prompts, self.device)

    def visual_tokens(self, width: int, height: int) -> int:
        return 0

    def image_features(self, prompts: PromptBatch) -> None:
        return None


def make_policy(settings: PolicySettings, device: torch.device) -> Policy:
    """Policy for a Qwen2.5-VL checkpoint, TextPolicy for any other causal LM."""
    vision = is_vision_language(resolve_model_path(settings.model))
    return (Policy if vision else TextPolicy)(settings, device)
