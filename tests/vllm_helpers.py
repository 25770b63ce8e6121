"""The tiny policy, prompts and engine used by the vLLM tests (test_vllm_sampler.py,
test_weight_sync.py).

Tolerance for sampler vs trainer log-probs, both float32: 1e-4 (absolute, per token).
Measured: 3.3e-5, almost all of it the ban of the 5 vision special tokens — vLLM renormalises
over the remaining vocabulary, the trainer does not, and on this near-uniform random model the
banned mass is 5/151936, i.e. a shift of -log(1 - 5/151936) = 3.29e-5. Kernel differences
(attention, RMSNorm, a 151936-way logsumexp in float32) are ~1e-6. Real defects are orders of
magnitude larger: a stale weight, a wrong temperature or LoRA dropout left on move log-probs
by 1e-2..1 here.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from PIL import Image

from grpo.types import PolicySettings, PromptInput
from models.policy import Policy
from models.tiny import TinySpec, tiny_model_path

LOGP_TOLERANCE = 1e-4
# vLLM's CPU attention kernels need head_dim >= 32: the default tiny spec has it.
VLLM_TINY = TinySpec()


def vllm_policy() -> Policy:
    """The tiny policy in eval mode: no LoRA dropout, so trainer log-probs are deterministic."""
    torch.manual_seed(0)
    policy = Policy(PolicySettings(model=str(tiny_model_path(spec=VLLM_TINY))), torch.device("cpu"))
    policy.model.eval()
    return policy


def image_prompts(policy: Policy) -> list[PromptInput]:
    """Two prompts whose images have different sizes (different numbers of image tokens)."""

    def messages(question: str) -> list[dict]:
        content = [{"type": "image"}, {"type": "text", "text": question}]
        return [{"role": "user", "content": content}]

    wide = Image.new("RGB", (120, 60), (200, 30, 30))
    tall = Image.new("RGB", (56, 90), (30, 200, 30))
    return [
        policy.prompt_input(messages("你好"), [wide]),
        policy.prompt_input(messages("what is in this picture?"), [tall]),
    ]


def trainer_logprobs(
    policy: Policy,
    prompts: list[PromptInput],
    completions: list[list[int]],
    group: int,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The trainer's recomputation: (logp [N, T], completion mask [N, T])."""
    batch = policy.rollout_batch(policy.encode(prompts), completions, group)
    with torch.no_grad():
        return policy.logprobs(batch, temperature).logp, batch.completion_mask


def new_sampler(policy: Policy, **settings: Any) -> Any:
    """A VLLMSampler with a small KV cache; skips only when vllm cannot be imported."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        pytest.skip("vllm is not installed (pip install '.[cpu]' or '.[gpu]')")
    from models.vllm_sampler import VLLMSampler, VLLMSettings

    return VLLMSampler(policy, VLLMSettings(kv_cache_gib=0.25, **settings))
