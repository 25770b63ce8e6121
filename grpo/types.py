"""What a GRPO step needs from a model and a sampler, and the records that cross that line.

grpo/ (the algorithm and the loop) is written against these Protocols only; models/ implements
them for Qwen2.5-VL (and text-only causal LMs). Both sides import this module, and nothing in
it names a model family, peft or vLLM. Shapes: P prompts, G completions per prompt,
N = P * G rows (group-major: prompt j owns rows j*G .. j*G + G - 1), T completion positions.

    PromptInput -> Sampler.generate -> Rollout        (token ids + the sampler's log-probs)
    Policy.encode(prompts) + Rollout -> Policy.rollout_batch -> RolloutBatch
    Policy.logprobs / reference_logprobs(RolloutBatch) -> TokenLogProbs
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image

ADAPTER_CONFIG = "adapter_config.json"  # a saved adapter directory holds this (peft's format)
EXPORT_INFO = "export_info.json"  # a merged export records where its weights came from here
ADAPTER_DIR = "adapter"  # a LoRA checkpoint's trained weights: the peft adapter
MODEL_DIR = "model"  # a full fine-tuning checkpoint's: a model directory transformers loads

# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptInput:
    """One prompt as a sampler sees it: the rendered chat text and its images, already sized."""

    text: str
    images: list[Image.Image]


@dataclass(frozen=True)
class SamplingSettings:
    """How completions are drawn. top_k 0 and top_p 1.0 mean plain sampling at temperature."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False


@dataclass
class Rollout:
    """N = P * G sampled completions, group-major.

    completion_ids: token ids per row, ending with the stop token when one was produced.
    logprobs:       per row, the log-prob of each sampled token under the distribution it was
                    drawn from (temperature, top-p/top-k and the banned tokens applied); NaN
                    where the sampler could not report one.
    """

    completion_ids: list[list[int]]
    logprobs: list[list[float]]


@dataclass
class TokenLogProbs:
    logp: torch.Tensor  # [N, T] float32; 0 outside the completion mask
    entropy: torch.Tensor | None  # [N, T] float32, detached; None unless asked for


@dataclass(frozen=True)
class PolicySettings:
    """How to load the policy, in one of three modes:

    - LoRA (lora_r > 0, full False): an adapter is trained, the base weights are frozen, and the
      reference is the same model with its adapter disabled;
    - full fine-tuning (full True, lora_r ignored): every language-model weight is trained
      (embeddings and LM head included; the vision tower too with lora_vision), and the
      reference is a frozen copy of the base model, held only when `reference` is True;
    - frozen (lora_r 0, full False): nothing is trained, a plain model for evaluation.
    """

    model: str = "tiny"  # a local directory, a hub id, or a short name ("tiny")
    lora_r: int = 8
    full: bool = False  # train the whole language model (no adapter)
    reference: bool = True  # full: keep a frozen copy of the base (False when beta is 0)
    lora_alpha: int = 32
    lora_vision: bool = False  # also train the vision tower (then its features are not cached)
    dtype: str | None = None  # "bfloat16" | "float32" | None (bf16 on CUDA, fp32 on CPU)
    attn_implementation: str | None = None  # None/"auto" | "sdpa" | "flash_attention_2"
    gradient_checkpointing: bool = False
    min_pixels: int | None = None  # None: the checkpoint's processor setting
    max_pixels: int | None = None
    chunk_tokens: int = 1024  # tokens per vocabulary-projection chunk in log-prob passes
    packing: bool = False  # log-prob passes over one padding-free sequence (text models only)


@dataclass(frozen=True)
class SamplerSettings:
    """Which generation backend, and the vLLM engine's knobs (ignored by "hf")."""

    backend: str = "hf"  # "hf" (the policy's own weights) | "vllm" (a colocated engine)
    gpu_memory_utilization: float = 0.3
    max_model_len: int = 4096
    sync: str = "merged"  # "merged": push W + s*B@A; "adapter": vLLM LoRA of the adapter
    sleep: bool = False  # free engine memory between generation and training (GPU only)
    seed: int = 0  # the engine of rank r uses seed + r
    max_images_per_prompt: int = 1


# --------------------------------------------------------------------------------------------
# Protocols
# --------------------------------------------------------------------------------------------


class RolloutBatch(Protocol):
    """Prompts + completions, ready for a log-prob forward. Its tensors are the model's."""

    completion_mask: torch.Tensor  # [N, T] float 0/1: up to and including the first stop
    truncated: torch.Tensor  # [N] bool: no stop token within the sampled tokens

    @property
    def num_rows(self) -> int: ...

    def select(self, rows: list[int]) -> RolloutBatch:
        """The sub-batch of `rows`, in that order."""
        ...


class Policy(Protocol):
    """The trained model with the handful of operations a GRPO step needs."""

    device: torch.device
    stop_ids: set[int]  # a completion ends at the first of these
    full: bool  # every language-model weight is trained (no adapter): checkpoints hold MODEL_DIR

    def prompt_input(self, messages: list[dict], images: list[Image.Image]) -> PromptInput:
        """Render chat messages and size their images for the model."""
        ...

    def visual_tokens(self, width: int, height: int) -> int:
        """Prompt tokens an image of this size becomes once sized for the model (0: no vision)."""
        ...

    def encode(self, prompts: list[PromptInput]) -> Any:
        """Tokenise (and preprocess images of) P prompts: an opaque prompt batch."""
        ...

    def prompt_lengths(self, prompts: Any) -> list[int]:
        """Tokens of each encoded prompt, image tokens included."""
        ...

    def decode(self, completions: list[list[int]]) -> list[str]: ...

    def rollout_batch(
        self, prompts: Any, completions: list[list[int]], group_size: int
    ) -> RolloutBatch: ...

    def image_features(self, prompts: Any) -> Any:
        """Per-image features computed once per step and reused by every forward of it, or
        None (no images, or the vision tower is trained)."""
        ...

    def logprobs(
        self,
        batch: RolloutBatch,
        temperature: float,
        with_entropy: bool = False,
        image_features: Any = None,
    ) -> TokenLogProbs:
        """Log-probs [N, T] of the completion tokens under the policy, with grad."""
        ...

    def reference_logprobs(
        self, batch: RolloutBatch, temperature: float, image_features: Any = None
    ) -> torch.Tensor:
        """Log-probs [N, T] under the frozen reference, no grad."""
        ...

    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...

    def adapter_disabled(self) -> AbstractContextManager[None]:
        """Inside the block the policy is the frozen base model (the reference)."""
        ...

    def save_trainable(self, directory: Path) -> None:
        """Write what training changes to `directory`: the adapter (LoRA), or the whole model
        as a directory transformers and vLLM load (full fine-tuning)."""
        ...

    def load_trainable(self, directory: Path) -> None:
        """Read back what `save_trainable` wrote; an error naming `directory` if it does not
        fit this model."""
        ...

    def describe(self) -> dict[str, Any]:
        """What a checkpoint records about the model (base model name and path)."""
        ...


class Sampler(Protocol):
    """What the trainer needs from a generation backend."""

    def generate(self, prompts: list[PromptInput], n: int, settings: SamplingSettings) -> Rollout:
        """Sample `n` completions for each prompt; rows group-major."""
        ...

    def sync_weights(self, policy: Policy) -> None:
        """Make the sampler's weights equal the policy's current ones (no-op if shared)."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class ModelBackend:
    """How the loop gets its model: models.BACKEND for the built-in models.

    load_policy:     the policy to train (adapter added, trainable weights set);
    make_sampler:    a sampler colocated with a policy;
    load_trained:    (model, adapter dir or None, settings, device) -> a policy for evaluation,
                     the saved adapter on the base model;
    check_same_base: (expected, given) raises when `given` is not `expected`'s architecture.
    """

    load_policy: Callable[[PolicySettings, torch.device], Policy]
    make_sampler: Callable[[SamplerSettings, Policy], Sampler]
    load_trained: Callable[[str, Path | None, PolicySettings, torch.device], Policy]
    check_same_base: Callable[[str, str], None]
