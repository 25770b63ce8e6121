"""Weight sync into the real vLLM engine on the CPU, after a real optimizer step.

The module trains the tiny policy's LoRA for a couple of Adam steps towards repeating one
token, so greedy decoding changes, then syncs two engines: one with merged weights (default)
and one through vLLM's own LoRA (adapter mode). Log-prob tolerance: see tests/vllm_helpers.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from grpo.types import PromptInput, Rollout, SamplingSettings
from models.policy import Policy
from models.samplers import TransformersSampler
from tests.vllm_helpers import (
    LOGP_TOLERANCE,
    image_prompts,
    new_sampler,
    trainer_logprobs,
    vllm_policy,
)

pytestmark = pytest.mark.vllm

GREEDY = SamplingSettings(max_new_tokens=8, greedy=True)


@dataclass
class Trained:
    policy: Policy
    prompt: PromptInput
    merged: Any  # VLLMSampler, sync="merged"
    adapter: Any  # VLLMSampler, sync="adapter"
    target: list[int]
    before: Rollout  # engine greedy output before the step
    adapter_before: Rollout
    parameters: dict[str, torch.Tensor]  # the policy's parameters right before the syncs


def train_towards(policy: Policy, prompt: PromptInput, target: list[int]) -> None:
    """Adam steps on the LoRA parameters raising log p(target | prompt) until transformers'
    greedy decoding produces `target` (two steps at lr 0.02 for the tiny model)."""
    optimizer = torch.optim.Adam(policy.trainable_parameters(), lr=0.02)
    batch = policy.rollout_batch(policy.encode([prompt]), [target], 1)
    for _ in range(10):
        loss = -(policy.logprobs(batch, 1.0).logp * batch.completion_mask).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if TransformersSampler(policy).generate([prompt], 1, GREEDY).completion_ids == [target]:
            return
    raise AssertionError("the test's training did not reach its target; its setup is broken")


def parameters(policy: Policy) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in policy.model.named_parameters()}


def engine_weights(sampler: Any) -> dict[str, torch.Tensor]:
    """A copy of every tensor the engine's model holds."""
    (state,) = sampler.llm.apply_model(
        lambda model: {name: t.detach().clone() for name, t in model.state_dict().items()}
    )
    return state


@pytest.fixture(scope="module")
def trained() -> Iterator[Trained]:
    policy = vllm_policy()
    prompt = image_prompts(policy)[0]
    merged = new_sampler(policy)
    adapter = new_sampler(policy, sync="adapter")
    before = merged.generate([prompt], 1, GREEDY)
    adapter_before = adapter.generate([prompt], 1, GREEDY)
    target = policy.processor.tokenizer.encode("hello", add_special_tokens=False) * 8
    train_towards(policy, prompt, target)
    snapshot = parameters(policy)
    merged.sync_weights(policy)
    adapter.sync_weights(policy)
    yield Trained(policy, prompt, merged, adapter, target, before, adapter_before, snapshot)
    merged.close()
    adapter.close()


def assert_matches_trainer(trained: Trained, rollout: Rollout) -> None:
    """Engine greedy output = transformers' greedy output, with the trainer's log-probs."""
    assert (
        rollout.completion_ids
        == TransformersSampler(trained.policy).generate([trained.prompt], 1, GREEDY).completion_ids
    )
    logp, _ = trainer_logprobs(trained.policy, [trained.prompt], rollout.completion_ids, 1, 1.0)
    sampled = torch.tensor(rollout.logprobs)  # [1, T]
    assert (logp - sampled).abs().max().item() < LOGP_TOLERANCE


def test_sync_leaves_the_trainer_bitwise_unchanged(trained: Trained) -> None:
    now = parameters(trained.policy)
    assert now.keys() == trained.parameters.keys()
    assert all(torch.equal(now[name], trained.parameters[name]) for name in now)
    assert not any(getattr(m, "merged", False) for m in trained.policy.model.modules())


def test_engine_follows_the_step(trained: Trained) -> None:
    after = trained.merged.generate([trained.prompt], 1, GREEDY)
    assert after.completion_ids == [trained.target]
    assert after.completion_ids != trained.before.completion_ids
    assert_matches_trainer(trained, after)


def test_sampled_logprobs_agree_after_sync(trained: Trained) -> None:
    """Beyond the trained path: free samples are scored alike by engine and trainer."""
    settings = SamplingSettings(max_new_tokens=8)
    rollout = trained.merged.generate([trained.prompt], 4, settings)
    logp, mask = trainer_logprobs(trained.policy, [trained.prompt], rollout.completion_ids, 4, 1.0)
    for i, row in enumerate(rollout.logprobs):
        diff = (logp[i, : len(row)] - torch.tensor(row)).abs() * mask[i, : len(row)]
        assert diff.max().item() < LOGP_TOLERANCE


def test_second_sync_without_a_step_changes_nothing(trained: Trained) -> None:
    first = trained.merged.generate([trained.prompt], 1, GREEDY)
    weights = engine_weights(trained.merged)
    trained.merged.sync_weights(trained.policy)
    again = engine_weights(trained.merged)
    assert weights.keys() == again.keys()
    assert all(torch.equal(weights[name], again[name]) for name in weights)
    second = trained.merged.generate([trained.prompt], 1, GREEDY)
    assert second.completion_ids == first.completion_ids
    assert second.logprobs == first.logprobs


def test_adapter_sync_gives_the_same_model(trained: Trained) -> None:
    assert trained.adapter_before.completion_ids == trained.before.completion_ids
    after = trained.adapter.generate([trained.prompt], 1, GREEDY)
    assert after.completion_ids == [trained.target]
    assert_matches_trainer(trained, after)


def packed_vocabulary_matmuls(sampler: Any) -> dict[str, bool]:
    """Each vocabulary module of the engine's model: does it hold a packed CPU matmul?"""

    def probe(model: torch.nn.Module) -> dict[str, bool]:
        from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

        linear = torch.nn.functional.linear
        return {
            name: getattr(module, "cpu_linear", linear) is not linear
            for name, module in model.named_modules()
            if isinstance(module, VocabParallelEmbedding)
        }

    (found,) = sampler.llm.apply_model(probe)
    return found


def test_only_the_output_head_keeps_a_packed_matmul(trained: Trained) -> None:
    """vLLM on CPU packs the input embedding as if it were a head; the sampler frees that copy
    at start and again after a reload that packed it anew. The tiny model ties its head to the
    embedding, and the head is a module of its own: it keeps its matmul."""
    from models.weight_sync import push_weights

    for sampler in (trained.merged, trained.adapter):
        found = packed_vocabulary_matmuls(sampler)
        assert {name for name, packed in found.items() if packed} == {"language_model.lm_head"}
        assert len(found) == 2  # the embedding is there, without its copy
    (name,) = [n for n in dict(trained.policy.model.named_parameters()) if "embed_tokens" in n]
    embedding = trained.policy.model.get_parameter(name).detach()
    push_weights(trained.merged.llm, [("model.language_model.embed_tokens.weight", embedding)])
    assert all(packed_vocabulary_matmuls(trained.merged).values())  # vLLM packed it again
    trained.merged.sync_weights(trained.policy)
    found = packed_vocabulary_matmuls(trained.merged)
    assert {name for name, packed in found.items() if packed} == {"language_model.lm_head"}
    assert_matches_trainer(trained, trained.merged.generate([trained.prompt], 1, GREEDY))
