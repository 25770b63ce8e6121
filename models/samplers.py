"""The two Sampler backends (grpo.types.Sampler) for our policies, and the choice between them.

- TransformersSampler samples with the policy's own weights (models.generation's lean loop):
  nothing to sync, and the log-probs it reports are the trainer's up to numerics.
- VLLMSampler (models/vllm_sampler.py) runs a colocated vLLM engine and receives the trained
  weights after every optimizer step.
"""

from __future__ import annotations

import torch

from grpo.types import PromptInput, Rollout, Sampler, SamplerSettings, SamplingSettings
from models.batch import PromptBatch
from models.policy import Policy


class TransformersSampler:
    """Samples with the policy's own weights: sync is a no-op."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    def generate(
        self,
        prompts: list[PromptInput],
        n: int,
        settings: SamplingSettings,
        encoded: PromptBatch | None = None,
        image_features: list[torch.Tensor] | None = None,
    ) -> Rollout:
        """`encoded` / `image_features` (the trainer's, for these prompts) are used as given:
        no second tokenisation or image preprocessing, no second vision-tower pass."""
        batch = encoded if encoded is not None else self.policy.encode(prompts)
        completions = self.policy.sample(batch, n, settings, image_features)
        return Rollout(completions.tokens, completions.logprobs)

    def sync_weights(self, policy: Policy) -> None:
        return None

    def close(self) -> None:
        return None


def make_sampler(settings: SamplerSettings, policy: Policy) -> Sampler:
    """The sampler `settings.backend` names, colocated with `policy`."""
    if settings.backend == "hf":
        return TransformersSampler(policy)
    if settings.backend != "vllm":
        raise ValueError(f"sampler must be 'hf' or 'vllm', got {settings.backend!r}")
    from models.vllm_sampler import VLLMSampler, VLLMSettings

    engine = VLLMSettings(
        gpu_memory_utilization=settings.gpu_memory_utilization,
        max_model_len=settings.max_model_len,
        sync=settings.sync,
        sleep=settings.sleep,
        seed=settings.seed,  # the sampler adds the rank
        max_images_per_prompt=max(1, settings.max_images_per_prompt),
        tensor_parallel_size=settings.tensor_parallel_size,
    )
    return VLLMSampler(policy, engine)
