"""Completion log-probs: the chunked vocabulary projection, agreement with the distribution
`generate` sampled from (vision special tokens suppressed), the cached image-feature path,
text-only batches, and the frozen reference (adapter disabled) against a freshly loaded base
model.

The tiny model's random init gives almost uniform next-token distributions (logit std ~0.16),
where a position off by one changes a log-prob by only ~1e-3. The module's policy therefore
has its final norm scaled up (`sharpen`), which spreads log-probs over several nats.

References are computed in float64 from the float32 logits. torch's float32 log_softmax over
151,936 entries is itself off by up to ~1e-5 when one token dominates (its sum of exponentials
loses bits), while our logsumexp-based path stays within ~1e-7 of the float64 value.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.testing import assert_close

from grpo.types import PolicySettings, PromptInput, SamplingSettings
from models.batch import RolloutBatch
from models.generation import cut_at_stop
from models.loading import load_base_model
from models.logprobs import (
    TokenLogProbs,
    completion_logprobs,
    token_logprobs,
    unwrap,
)
from models.policy import Policy
from models.prefix import prefix_shared_logprobs
from models.samplers import TransformersSampler
from tests.naive import generate_kwargs, hf_generate, naive_completion_logprobs

CPU = torch.device("cpu")
SHARPEN = 8.0
GROUP = 2


def sharpen(model: torch.nn.Module) -> None:
    """Scale the final RMSNorm so the logits have std ~1.3 instead of ~0.16."""
    with torch.no_grad():
        unwrap(model).model.language_model.norm.weight.mul_(SHARPEN)


def load_policy(path: Path) -> Policy:
    torch.manual_seed(0)  # LoRA A init
    policy = Policy(PolicySettings(model=str(path)), CPU)
    policy.model.eval()  # no LoRA dropout: comparisons must be deterministic
    sharpen(policy.model)
    return policy


@pytest.fixture(scope="module")
def policy(tiny_model_dir: Path) -> Policy:
    return load_policy(tiny_model_dir)


def chat(policy: Policy, text: str, images: list[Image.Image]) -> PromptInput:
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    return policy.prompt_input([{"role": "user", "content": content}], images)


def mixed_prompts(policy: Policy, images: list[Image.Image]) -> list[PromptInput]:
    """Three prompts of different lengths: one image, two images of other sizes, no image."""
    return [
        chat(policy, "请读出图中的文字,然后 explain it in one line", images[:1]),
        chat(policy, "same?", images[1:]),
        chat(policy, "2+2=", []),
    ]


def fixed_batch(policy: Policy, prompts: list[PromptInput], texts: list[str]) -> RolloutBatch:
    """A rollout batch with given completion texts (len(prompts) * GROUP of them)."""
    tokenizer = policy.processor.tokenizer
    completions = [tokenizer.encode(text) for text in texts]
    return policy.rollout_batch(policy.encode(prompts), completions, GROUP)


COMPLETIONS = [
    "12<|im_end|>",
    "The answer is 42.<|im_end|>",
    "没有<|im_end|>garbage after the end",
    "no end token here at all",
    "4<|im_end|>",
    "four, 四<|endoftext|>",
]


def completion_logits(policy: Policy, batch: RolloutBatch) -> torch.Tensor:
    """The full model's float32 logits at the positions predicting completion tokens:
    [N, T, V]."""
    with torch.no_grad():
        logits = policy.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            mm_token_type_ids=batch.mm_token_type_ids,
            pixel_values=batch.pixel_values,
            image_grid_thw=batch.image_grid_thw,
        ).logits  # [N, Lp + T, V]
    lp, t = batch.prompt_length, batch.completion_ids.shape[1]
    return logits[:, lp - 1 : lp - 1 + t].float()


def float64_reference(
    logits: torch.Tensor,
    batch: RolloutBatch,
    temperature: float,
    suppressed: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(y) [N, T], entropy [N, T]) in float64, zero outside the completion mask; the
    `suppressed` ids get probability 0 (logit -inf)."""
    z = logits.double() / temperature  # [N, T, V]
    if suppressed:
        z[..., suppressed] = float("-inf")
    log_p = F.log_softmax(z, dim=-1)  # [N, T, V]
    logp = log_p.gather(-1, batch.completion_ids[..., None]).squeeze(-1)
    entropy = -torch.special.xlogy(log_p.exp(), log_p.exp()).sum(-1)  # 0 log 0 = 0
    return logp * batch.completion_mask, entropy * batch.completion_mask


# --- against the logits generate() sampled from --------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_generate_logits(
    policy: Policy, images: list[Image.Image], temperature: float
) -> None:
    prompts = mixed_prompts(policy, images)
    settings = SamplingSettings(max_new_tokens=6, temperature=temperature)
    kwargs = generate_kwargs(policy.processor, prompts, GROUP, settings, CPU)
    torch.manual_seed(1)
    with torch.no_grad():
        out = policy.model.generate(
            **kwargs, output_logits=True, output_scores=True, return_dict_in_generate=True
        )
    new = out.sequences[:, kwargs["input_ids"].shape[1] :].tolist()
    completions = [cut_at_stop(t, policy.stop_ids, policy.pad_id) for t in new]
    torch.manual_seed(1)
    assert hf_generate(policy.model, policy.processor, prompts, GROUP, settings, CPU) == completions

    batch = policy.rollout_batch(policy.encode(prompts), completions, GROUP)
    assert batch.pixel_values is not None and batch.image_grid_thw.shape[0] == 3 * GROUP
    assert len({tuple(g) for g in batch.image_grid_thw.tolist()}) == 3  # three image sizes
    assert (batch.attention_mask[:, 0] == 0).any()  # some prompt is left-padded
    t = batch.completion_ids.shape[1]
    mask = batch.completion_mask.bool()  # [N, T]
    y = batch.completion_ids[..., None]  # [N, T, 1]
    raw = torch.stack(out.logits, dim=1)[:, :t].float()  # [N, T, V] before any processing
    processed = torch.stack(out.scores, dim=1)[:, :t].float()  # [N, T, V] sampled from

    # generate sampled from z / T with the vision tokens removed, nothing else (no top-k/p)
    vision = sorted(policy.vision_ids)
    manual = raw / temperature
    manual[..., vision] = float("-inf")
    assert_close(processed, manual, atol=1e-6, rtol=0)

    # and that distribution is exactly the one the trainer scores
    with torch.no_grad():
        ours = policy.logprobs(batch, temperature).logp  # [N, T]
    sampler = F.log_softmax(processed.double(), dim=-1).gather(-1, y).squeeze(-1)  # [N, T]
    assert_close(ours[mask].double(), sampler[mask], atol=5e-6, rtol=0)
    assert (ours[~mask] == 0).all()
    # scoring the unsuppressed softmax instead would be off by log(1 - p_vision) < 0
    p_vision = F.softmax(raw.double() / temperature, dim=-1)[..., vision].sum(-1)  # [N, T]
    unsuppressed = F.log_softmax(raw.double() / temperature, dim=-1).gather(-1, y).squeeze(-1)
    assert_close(unsuppressed[mask], (sampler + torch.log1p(-p_vision))[mask], atol=1e-6, rtol=0)
    assert (p_vision[mask] > 0).all()


# --- the cached image-feature path -------------------------------------------------------------
def test_cached_image_features_equal_plain_path(policy: Policy, images: list[Image.Image]) -> None:
    batch = fixed_batch(policy, mixed_prompts(policy, images), COMPLETIONS)
    features = policy.image_features(batch.prompts)
    assert features is not None and len(features) == 3  # one per prompt image, not per row
    assert [f.shape[0] for f in features] == (batch.prompts.image_grid_thw.prod(-1) // 4).tolist()

    lora = policy.trainable_parameters()

    def run(cached: list[torch.Tensor] | None) -> tuple[TokenLogProbs, list[torch.Tensor]]:
        out = policy.logprobs(batch, 0.9, with_entropy=True, image_features=cached)
        out.logp.sum().backward()
        grads = [p.grad.clone() for p in lora]
        for p in lora:
            p.grad = None
        return out, grads

    plain, plain_grads = run(None)
    cached, cached_grads = run(features)
    assert_close(cached.logp, plain.logp, atol=1e-6, rtol=0)
    assert_close(cached.entropy, plain.entropy, atol=1e-6, rtol=0)
    for cached_grad, plain_grad in zip(cached_grads, plain_grads, strict=True):
        assert_close(cached_grad, plain_grad, atol=1e-6, rtol=1e-5)
    assert any(g.abs().sum() > 0 for g in plain_grads)


# --- text only ------------------------------------------------------------------------------
def test_text_only_prompts_end_to_end(policy: Policy) -> None:
    prompts = [chat(policy, "Say hi.", []), chat(policy, "一二三四五六七八九十 count on", [])]
    torch.manual_seed(2)
    completions = (
        TransformersSampler(policy)
        .generate(prompts, GROUP, SamplingSettings(max_new_tokens=5))
        .completion_ids
    )
    batch = policy.rollout_batch(policy.encode(prompts), completions, GROUP)
    assert batch.pixel_values is None and batch.image_grid_thw is None
    assert policy.image_features(batch.prompts) is None
    out = policy.logprobs(batch, 1.0, with_entropy=True)
    vision = sorted(policy.vision_ids)
    expected, entropy = float64_reference(completion_logits(policy, batch), batch, 1.0, vision)
    assert_close(out.logp.double(), expected, atol=1e-5, rtol=0)
    assert_close(out.entropy.double(), entropy, atol=1e-4, rtol=0)
    assert out.logp.requires_grad and out.entropy.shape == out.logp.shape


# --- chunking on the model, entropy, masking ----------------------------------------------
def test_chunked_equals_naive_on_the_model(policy: Policy, images: list[Image.Image]) -> None:
    batch = fixed_batch(policy, mixed_prompts(policy, images), COMPLETIONS)
    mask = batch.completion_mask.bool()
    # tokens up to and including the first stop token: "12<|im_end|>" is 1, 2, <|im_end|>
    assert mask.sum(1).tolist() == [3, 8, 2, 6, 2, 5]
    with torch.no_grad():
        small = completion_logprobs(policy.model, batch, 0.8, with_entropy=True, chunk_tokens=3)
        large = completion_logprobs(policy.model, batch, 0.8, with_entropy=True)
        naive = naive_completion_logprobs(policy.model, batch, 0.8, with_entropy=True)
    expected, entropy = float64_reference(completion_logits(policy, batch), batch, 0.8)
    # chunk shapes change the matmul's blocking: a few float32 ulps apart, both accurate
    assert_close(small.logp, large.logp, atol=1e-5, rtol=0)
    assert_close(small.logp.double(), expected, atol=1e-5, rtol=0)
    assert_close(large.logp.double(), expected, atol=1e-5, rtol=0)
    assert_close(small.entropy.double(), entropy, atol=1e-4, rtol=0)
    assert_close(naive.logp.double(), expected, atol=1e-4, rtol=0)  # float32 log_softmax
    assert_close(naive.entropy.double(), entropy, atol=1e-4, rtol=0)
    assert (small.entropy[~mask] == 0).all() and (small.logp[~mask] == 0).all()


def test_tokens_after_eos_do_not_change_anything(policy: Policy, images: list[Image.Image]) -> None:
    prompts = mixed_prompts(policy, images)
    with_garbage = fixed_batch(policy, prompts, COMPLETIONS)
    clean = fixed_batch(
        policy,
        prompts,
        [c.split("<|im_end|>")[0] + "<|im_end|>" if "<|im_end|>" in c else c for c in COMPLETIONS],
    )
    with torch.no_grad():
        a = policy.logprobs(with_garbage, 1.0).logp
        b = policy.logprobs(clean, 1.0).logp
    t = b.shape[1]
    assert_close(a[:, :t], b, atol=1e-6, rtol=0)
    assert (a[:, t:] == 0).all()


# --- token_logprobs against loop references (float64) -------------------------------------
def _reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loop: logp = log_softmax(h W^T / T)[y]; entropy = -sum p log p."""
    n, t = targets.shape
    logp = torch.zeros(n, t, dtype=hidden.dtype)
    entropy = torch.zeros(n, t, dtype=hidden.dtype)
    for i in range(n):
        for s in range(t):
            if mask[i, s]:
                z = weight @ hidden[i, s] / temperature  # [V]
                log_p = torch.log_softmax(z, dim=0)
                logp[i, s] = log_p[targets[i, s]]
                entropy[i, s] = -(log_p.exp() * log_p).sum()
    return logp, entropy


def _random_problem(
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [3, 5, 4], weight [11, 4] (both requiring grad), targets and mask [3, 5]."""
    gen = torch.Generator().manual_seed(3)
    n, t, h, v = 3, 5, 4, 11
    hidden = torch.randn(n, t, h, generator=gen, dtype=dtype).requires_grad_()
    weight = (2 * torch.randn(v, h, generator=gen, dtype=dtype)).requires_grad_()
    targets = torch.randint(0, v, (n, t), generator=gen)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)
    return hidden, weight, targets, mask


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_token_logprobs_chunking_values_and_gradients(temperature: float) -> None:
    hidden, weight, targets, mask = _random_problem()
    coeff = torch.randn(targets.shape, generator=torch.Generator().manual_seed(4)).double()
    ref_logp, ref_entropy = _reference(hidden, weight, targets, mask, temperature)
    ref_dh, ref_dw = torch.autograd.grad((ref_logp * coeff).sum(), (hidden, weight))
    for chunk in (1, 3, 4, 8, 1024):
        out = token_logprobs(hidden, weight, targets, mask, temperature, True, chunk)
        assert out.logp.dtype == torch.float64
        assert_close(out.logp, ref_logp, atol=1e-12, rtol=0)
        assert_close(out.entropy, ref_entropy, atol=1e-12, rtol=0)
        assert not out.entropy.requires_grad
        dh, dw = torch.autograd.grad((out.logp * coeff).sum(), (hidden, weight))
        assert_close(dh, ref_dh, atol=1e-12, rtol=0)
        assert_close(dw, ref_dw, atol=1e-12, rtol=0)
        assert (dh[~mask.bool()] == 0).all()  # masked positions get no gradient
    assert (ref_logp[~mask.bool()] == 0).all() and ref_dw.abs().sum() > 0


def test_token_logprobs_gradcheck() -> None:
    hidden, weight, targets, mask = _random_problem()
    assert torch.autograd.gradcheck(
        lambda h, w: token_logprobs(h, w, targets, mask, 0.7, chunk_tokens=3).logp,
        (hidden, weight),
    )


def test_token_logprobs_without_grad_and_in_bf16() -> None:
    hidden, weight, targets, mask = _random_problem()
    with_grad = token_logprobs(hidden, weight, targets, mask, chunk_tokens=2)
    with torch.no_grad():
        without = token_logprobs(hidden, weight, targets, mask, chunk_tokens=2)
    assert torch.equal(with_grad.logp.detach(), without.logp) and without.entropy is None
    low = token_logprobs(hidden.detach().bfloat16(), weight.detach().bfloat16(), targets, mask)
    assert low.logp.dtype == torch.float32  # float32 log-probs even from bf16 activations
    assert_close(low.logp.double(), without.logp, atol=0.1, rtol=0)
    nothing = token_logprobs(hidden, weight, targets, torch.zeros_like(mask))
    assert torch.equal(nothing.logp, torch.zeros(targets.shape, dtype=torch.float64))


# --- the frozen reference ------------------------------------------------------------------------
def test_adapter_disabled_equals_fresh_base_model(
    tiny_model_dir: Path, images: list[Image.Image]
) -> None:
    """After a few optimizer steps the adapter changes the log-probs; disabled, it is gone
    exactly: the same float32 kernels run on the same base weights."""
    policy = load_policy(tiny_model_dir)  # its own copy: the module's policy stays untouched
    batch = fixed_batch(policy, mixed_prompts(policy, images), COMPLETIONS)
    optimizer = torch.optim.Adam(policy.trainable_parameters(), lr=0.05)
    for _ in range(3):
        logp = policy.logprobs(batch, 1.0).logp
        loss = -(logp * batch.completion_mask).sum() / batch.completion_mask.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    lora_b = [p for n, p in policy.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().max() > 0 for p in lora_b)

    base = load_base_model(str(tiny_model_dir), CPU)
    base.eval()
    sharpen(base)
    features = policy.image_features(batch.prompts)
    with torch.no_grad():
        # in the policy's own (default, prefix-shared) layout: bitwise, not within rounding
        base_logp = prefix_shared_logprobs(base, batch, suppressed=policy.suppressed).logp
        adapted = policy.logprobs(batch, 1.0).logp
    reference = policy.reference_logprobs(batch, 1.0)
    reference_cached = policy.reference_logprobs(batch, 1.0, image_features=features)
    assert (adapted - base_logp).abs().max() > 1e-2
    assert torch.equal(reference, base_logp)
    assert torch.equal(reference_cached, base_logp)
    # only adapter weights moved
    base_weights = dict(base.named_parameters())
    for name, p in unwrap(policy.model).named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, base_weights[name.replace(".base_layer", "")]), name
