"""Sampling G completions per prompt: the Sampler interface and its transformers backend.

A sampler turns P prompts into N = P * G completions, group-major: the G completions of
prompt j are rows j*G .. j*G + G - 1. The trainer depends only on this interface, so the
transformers sampler here and the colocated vLLM sampler (grpo/vllm_sampler.py) are
interchangeable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from PIL import Image


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

    completion_ids:   token ids per row, ending with the EOS token when one was produced.
    sampler_logprobs: per-token log-probs of the sampled tokens under the distribution actually
                      sampled from (temperature applied), when the backend reports them.
    """

    completion_ids: list[list[int]]
    sampler_logprobs: list[list[float]] | None = None


class Sampler(Protocol):
    """What the trainer needs from a generation backend."""

    def generate(self, prompts: list[PromptInput], n: int, settings: SamplingSettings) -> Rollout:
        """Sample `n` completions for each prompt; rows group-major."""
        ...

    def sync_weights(self, policy: Any) -> None:
        """Make the sampler's weights equal the policy's current ones (no-op if shared)."""
        ...


class TransformersSampler:
    """Samples with the policy's own `generate`: shares its weights, so sync is a no-op."""

    def __init__(self, policy: Any) -> None:
        self.policy = policy

    def generate(self, prompts: list[PromptInput], n: int, settings: SamplingSettings) -> Rollout:
        return Rollout(self.policy.generate(prompts, n, settings))

    def sync_weights(self, policy: Any) -> None:
        return None
