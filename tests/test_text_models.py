"""Text-only causal LMs (Llama, Qwen2) behind the same Policy as Qwen2.5-VL.

On tiny random models (tests/text_helpers.py): the class is chosen from the config and no
vision code is involved; the lean chunked log-probs (explicit 1-D positions, left padding)
equal the naive full-vocabulary ones, gradient included; the lean sampler's reported
log-probs equal the trainer's recomputation and its greedy output equals transformers'
generate; a training step and a resume with each sampler; vLLM's greedy output after a weight
sync equals the trainer's (merged and adapter sync); an export reloads in transformers and
vLLM with equal greedy outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from grpo.config import TrainConfig
from grpo.trainer import train
from grpo.types import PolicySettings, PromptInput, SamplingSettings
from models import BACKEND
from models.logprobs import unwrap
from models.policy import Policy, TextPolicy, make_policy
from tests.naive import naive_completion_logprobs
from tests.text_helpers import TEXT_FAMILIES, tiny_text_model_path

CPU = torch.device("cpu")
GREEDY = SamplingSettings(max_new_tokens=8, greedy=True)


def text_policy(family: str, seed: int = 1, scale: float = 0.05) -> Policy:
    """The tiny policy with LoRA B ~ N(0, scale^2), so the adapter changes every log-prob
    (at 0.3 also the greedy tokens of both tiny models)."""
    torch.manual_seed(0)
    policy = make_policy(PolicySettings(model=str(tiny_text_model_path(family))), CPU)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.copy_(scale * torch.randn(p.shape, generator=gen))
    return policy


def prompts(policy: Policy) -> list[PromptInput]:
    """Two prompts of different lengths (so one is left-padded), in Qwen-VL's message format."""

    def ask(text: str) -> PromptInput:
        return policy.prompt_input(
            [{"role": "user", "content": [{"type": "text", "text": text}]}], []
        )

    return [ask("What is 7 + 5?"), ask("Compute 13 - 4 and put the result in a box, please.")]


@pytest.fixture(scope="module", params=TEXT_FAMILIES)
def policy(request: pytest.FixtureRequest) -> Policy:
    return text_policy(request.param)


def test_text_checkpoint_gets_the_text_policy(policy: Policy) -> None:
    assert isinstance(policy, TextPolicy) and not policy.has_vision
    assert policy.processor is None and policy.suppressed.numel() == 0
    im_end = policy.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in policy.stop_ids
    adapted = {n.split(".")[-4] for n, _ in policy.model.named_parameters() if "lora_A" in n}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    with pytest.raises(ValueError, match="text-only"):
        policy.prompt_input([{"role": "user", "content": "hi"}], [object()])


def test_lean_logprobs_equal_naive(policy: Policy) -> None:
    batch_prompts = policy.encode(prompts(policy))
    assert batch_prompts.attention_mask[0].min() == 0  # the shorter prompt is left-padded
    completions = [[11, 12, 13], [14, 15], [16, 17, 18, 19], [20, 21]]
    completions[1].append(min(policy.stop_ids))
    batch = policy.rollout_batch(batch_prompts, completions, 2)
    lean = policy.logprobs(batch, 0.7, with_entropy=True)
    naive = naive_completion_logprobs(policy.model, batch, 0.7, with_entropy=True)
    assert_close(lean.logp, naive.logp, atol=2e-5, rtol=1e-5)
    assert_close(lean.entropy, naive.entropy, atol=2e-5, rtol=1e-5)
    lora = [p for p in policy.trainable_parameters()]
    grad_lean = torch.autograd.grad(lean.logp.sum(), lora)
    naive = naive_completion_logprobs(policy.model, batch, 0.7)
    grad_naive = torch.autograd.grad(naive.logp.sum(), lora)
    for a, b in zip(grad_lean, grad_naive, strict=True):
        assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_lean_sampler_reports_the_trainers_logprobs(policy: Policy) -> None:
    encoded = policy.encode(prompts(policy))
    torch.manual_seed(3)
    out = policy.sample(encoded, 3, SamplingSettings(max_new_tokens=6, temperature=1.0))
    batch = policy.rollout_batch(encoded, out.tokens, 3)
    with torch.no_grad():
        trainer = policy.logprobs(batch, 1.0).logp  # [N, T]
    for i, row in enumerate(out.logprobs):
        assert_close(trainer[i, : len(row)], torch.tensor(row), atol=1e-4, rtol=0)


def test_lean_greedy_equals_transformers_generate(policy: Policy) -> None:
    encoded = policy.encode(prompts(policy))
    lean = policy.sample(encoded, 1, GREEDY).tokens
    with torch.no_grad():
        out = unwrap(policy.model).generate(
            input_ids=encoded.input_ids,
            attention_mask=encoded.attention_mask,
            max_new_tokens=GREEDY.max_new_tokens,
            do_sample=False,
            eos_token_id=sorted(policy.stop_ids),
            pad_token_id=policy.pad_id,
        )[:, encoded.input_ids.shape[1] :]
    for mine, theirs in zip(lean, out.tolist(), strict=True):
        assert mine == theirs[: len(mine)]


# --------------------------------------------------------------------------------------------
# Training, vLLM sync, export
# --------------------------------------------------------------------------------------------


def arith_config(model: Path, out: Path, sampler: str, **overrides: object) -> TrainConfig:
    settings: dict = dict(
        task="arith",
        model=str(model),
        output_dir=str(out),
        max_steps=1,
        prompts_per_step=2,
        num_generations=2,
        max_completion_length=6,
        learning_rate=1e-3,
        beta=0.04,
        save_steps=1,
        log_completions_steps=0,
        tensorboard=False,
        sampler=sampler,
    )
    return TrainConfig(**{**settings, **overrides})


def run_and_resume(tmp_path: Path, family: str, sampler: str) -> list[dict]:
    model = tiny_text_model_path(family)
    train(arith_config(model, tmp_path / "run", sampler), BACKEND)
    train(arith_config(model, tmp_path / "run", sampler, max_steps=2, resume=True), BACKEND)
    assert (tmp_path / "run" / "checkpoint-2" / "adapter" / "adapter_config.json").is_file()
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_training_step_and_resume_hf(tmp_path: Path, family: str) -> None:
    rows = run_and_resume(tmp_path, family, "hf")
    assert [row["step"] for row in rows] == [1, 2]
    assert all(row["completion_length_mean"] > 0 for row in rows)


@pytest.mark.vllm
def test_training_step_and_resume_vllm(tmp_path: Path) -> None:
    rows = run_and_resume(tmp_path, "llama", "vllm")
    assert [row["step"] for row in rows] == [1, 2]


@pytest.mark.vllm
@pytest.mark.parametrize("family", TEXT_FAMILIES)
@pytest.mark.parametrize("sync", ["merged", "adapter"])
def test_vllm_greedy_equals_trainer_after_sync(family: str, sync: str) -> None:
    from models.vllm_sampler import VLLMSampler, VLLMSettings

    policy = text_policy(family, seed=5, scale=0.3)  # the adapter moves the greedy output
    texts = prompts(policy)
    sampler = VLLMSampler(policy, VLLMSettings(sync=sync, max_model_len=512, kv_cache_gib=0.25))
    try:
        before = sampler.generate(texts, 1, GREEDY).completion_ids  # base weights (or adapter)
        sampler.sync_weights(policy)
        after = sampler.generate(texts, 1, GREEDY).completion_ids
    finally:
        sampler.close()
    trainer = policy.sample(policy.encode(texts), 1, GREEDY).tokens
    with policy.adapter_disabled():
        base = policy.sample(policy.encode(texts), 1, GREEDY).tokens
    assert after == trainer
    assert base != trainer  # the adapter changes the output, so the sync is what made it equal
    if sync == "merged":
        assert before == base


@pytest.mark.vllm
def test_export_reloads_in_transformers_and_vllm(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    from models.export import export_merged
    from models.vllm_sampler import create_engine

    policy = text_policy("llama", seed=7, scale=0.3)
    texts = prompts(policy)
    trained = policy.sample(policy.encode(texts), 1, GREEDY).tokens
    out = export_merged(policy, tmp_path / "export", {"base_model": "tiny-llama"})
    assert not (out / "preprocessor_config.json").exists()
    reloaded = make_policy(PolicySettings(model=str(out), lora_r=0), CPU)
    assert isinstance(reloaded, TextPolicy)
    assert reloaded.sample(reloaded.encode(texts), 1, GREEDY).tokens == trained
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert AutoTokenizer.from_pretrained(out).chat_template == policy.tokenizer.chat_template
    assert type(plain).__name__ == "LlamaForCausalLM"
    llm: LLM = create_engine(
        {
            "model": str(out),
            "dtype": "float32",
            "enforce_eager": True,
            "max_model_len": 512,
            "kv_cache_memory_bytes": 2**28,
        }
    )
    params = SamplingParams(
        temperature=0.0, max_tokens=GREEDY.max_new_tokens, stop_token_ids=sorted(policy.stop_ids)
    )
    try:
        engine = [
            list(o.outputs[0].token_ids) for o in llm.generate([t.text for t in texts], params)
        ]
    finally:
        llm.llm_engine.engine_core.shutdown()
    stops = policy.stop_ids
    assert [[t for t in row if t not in stops] for row in engine] == [
        [t for t in row if t not in stops] for row in trained
    ]
