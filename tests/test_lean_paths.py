"""The lean paths compute the same numbers as the straightforward ones.

Lean (models.policy.Policy) against naive (tests/naive.py) on the tiny model with the real
vocabulary: policy and reference log-probs, entropy, the GRPO loss and its gradient w.r.t. the
LoRA weights, for prompts with images of different sizes (and one without) and G > 1; the
suppressed vision ids in the chunked path against a loop; image features reused across inner
iterations; and the lean sampler: its prefill once per prompt, its
positions and KV-cache expansion (the log-probs it reports equal the trainer's), its draw
(inverse CDF against a loop, and frequencies), its top-k/top-p (transformers' own processors)
and its greedy path (transformers' generate, token for token).

The LoRA B matrices are set to random values so the adapter changes every log-prob, and the final
norm is scaled up (as in test_models_logprobs.py) so next-token distributions are not uniform.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.testing import assert_close

from grpo.loss import LossSettings, grpo_loss
from grpo.types import PolicySettings, PromptInput, SamplingSettings
from models.batch import RolloutBatch, build_rollout_batch
from models.generation import draw_tokens, processed_scores, sample_completions
from models.logprobs import token_logprobs, unwrap
from models.policy import Policy
from models.samplers import TransformersSampler
from tests.naive import NaiveSampler, naive_view

CPU = torch.device("cpu")
GROUP = 2


def prepare(policy: Policy, seed: int) -> Policy:
    """Eval mode (no dropout), non-zero LoRA B, sharpened logits."""
    policy.model.eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
        unwrap(policy.model).model.language_model.norm.weight.mul_(8.0)
    return policy


@pytest.fixture(scope="module")
def policy(tiny_model_dir: Path) -> Policy:
    torch.manual_seed(0)
    return prepare(Policy(PolicySettings(model=str(tiny_model_dir)), CPU), seed=1)


@contextmanager
def naive(policy: Policy) -> Iterator[Policy]:
    """The same policy (same weights) with the lean paths off."""
    yield naive_view(policy)


def chat(policy: Policy, text: str, images: list[Image.Image]) -> PromptInput:
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    return policy.prompt_input([{"role": "user", "content": content}], images)


def mixed_prompts(policy: Policy, images: list[Image.Image]) -> list[PromptInput]:
    """One image, two images of two other sizes, no image."""
    return [
        chat(policy, "请读出图中的文字", images[:1]),
        chat(policy, "same?", images[1:]),
        chat(policy, "2+2=", []),
    ]


COMPLETIONS = [
    "12<|im_end|>",
    "The answer is 42.<|im_end|>",
    "没有<|im_end|>after the end",
    "no end token",
    "4<|im_end|>",
    "four, 四<|endoftext|>",
]


def fixed_batch(policy: Policy, images: list[Image.Image]) -> RolloutBatch:
    tokenizer = policy.processor.tokenizer
    completions = [tokenizer.encode(text) for text in COMPLETIONS]
    return policy.rollout_batch(policy.encode(mixed_prompts(policy, images)), completions, GROUP)


def lora_grads(policy: Policy) -> list[torch.Tensor]:
    grads = [p.grad.clone() for p in policy.trainable_parameters()]
    policy.model.zero_grad(set_to_none=True)
    return grads


# --- log-probs, entropy, reference -----------------------------------------------------------
def test_policy_and_reference_logprobs_lean_equal_naive(
    policy: Policy, images: list[Image.Image]
) -> None:
    batch = fixed_batch(policy, images)
    assert len({tuple(g) for g in batch.image_grid_thw.tolist()}) == 3  # three image sizes
    features = policy.image_features(batch.prompts)
    assert features is not None and len(features) == 3  # per prompt image, not per row
    with torch.no_grad():
        lean = policy.logprobs(batch, 0.8, with_entropy=True, image_features=features)
        lean_ref = policy.reference_logprobs(batch, 0.8, image_features=features)
        with naive(policy) as plain_policy:
            assert plain_policy.image_features(batch.prompts) is None
            plain = plain_policy.logprobs(batch, 0.8, with_entropy=True)
            plain_ref = plain_policy.reference_logprobs(batch, 0.8)
    mask = batch.completion_mask.bool()
    # float32 log_softmax over 151,936 entries is good to ~1e-5 when one token dominates
    assert_close(lean.logp, plain.logp, atol=2e-5, rtol=0)
    # entropy sums 151,936 terms p log p to ~10.7 nats (near-uniform): the two paths sum in a
    # different order, so its float32 error is relative, ~2e-6 of the value (measured 1.9e-6)
    assert_close(lean.entropy, plain.entropy, atol=0, rtol=5e-6)
    assert_close(lean_ref, plain_ref, atol=2e-5, rtol=0)
    assert (lean.logp[~mask] == 0).all() and (plain.logp[~mask] == 0).all()
    # the adapter matters, so the reference really is a different model
    assert (lean.logp - lean_ref)[mask].abs().max() > 1e-2
    assert lean.logp[mask].min() < -3.0  # log-probs spread over several nats


# --- suppressed ids in the chunked path ---------------------------------------------------------
def test_token_logprobs_with_suppressed_ids_against_a_loop() -> None:
    """logp = z[y] - log sum_{v not suppressed} exp(z[v]) and its entropy, in float64 against a
    per-token loop, for values, gradients (hidden and weight) and gradcheck."""
    gen = torch.Generator().manual_seed(7)
    n, t, h, v = 2, 4, 3, 9
    hidden = torch.randn(n, t, h, generator=gen, dtype=torch.float64).requires_grad_()
    weight = (2 * torch.randn(v, h, generator=gen, dtype=torch.float64)).requires_grad_()
    targets = torch.tensor([[0, 2, 4, 8], [1, 1, 7, 0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    suppressed = torch.tensor([3, 5, 6])
    allowed = [u for u in range(v) if u not in suppressed.tolist()]

    ref_logp = torch.zeros(n, t, dtype=torch.float64)
    ref_entropy = torch.zeros(n, t, dtype=torch.float64)
    for i in range(n):
        for s in range(t):
            if mask[i, s]:
                z = weight[allowed] @ hidden[i, s] / 0.7  # [V - S]
                log_p = z - torch.logsumexp(z, 0)
                ref_logp[i, s] = log_p[allowed.index(int(targets[i, s]))]
                ref_entropy[i, s] = -(log_p.exp() * log_p).sum()
    out = token_logprobs(hidden, weight, targets, mask, 0.7, True, 3, suppressed)
    assert_close(out.logp, ref_logp, atol=1e-12, rtol=0)
    assert_close(out.entropy, ref_entropy, atol=1e-12, rtol=0)
    coeff = torch.randn(n, t, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad((out.logp * coeff).sum(), (hidden, weight))
    ref_grads = torch.autograd.grad((ref_logp * coeff).sum(), (hidden, weight))
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert_close(grad, ref_grad, atol=1e-12, rtol=0)
    assert (grads[1][suppressed] == 0).all()  # no gradient into tokens that cannot be drawn
    assert torch.autograd.gradcheck(
        lambda a, b: token_logprobs(a, b, targets, mask, 0.7, False, 3, suppressed).logp,
        (hidden, weight),
    )


# --- the loss and its gradient -----------------------------------------------------------------
def test_grpo_loss_and_lora_gradient_lean_equal_naive(
    policy: Policy, images: list[Image.Image]
) -> None:
    """beta 0.04 (with the reference) and 0, from one forward of each path."""
    batch = fixed_batch(policy, images)
    advantages = torch.tensor([1.0, -0.5, -0.5, 0.3, 0.7, -1.0])  # [N]
    lora = policy.trainable_parameters()

    def losses_and_grads(
        computing: Policy, features: list[torch.Tensor] | None
    ) -> list[tuple[torch.Tensor, ...]]:
        ref = computing.reference_logprobs(batch, 0.9, image_features=features)
        logp = computing.logprobs(batch, 0.9, image_features=features).logp
        old = logp.detach() - 0.05 * batch.completion_mask  # ratios away from 1
        out = []
        for beta in (0.04, 0.0):
            settings = LossSettings(beta=beta, loss_type="bnpo")
            loss, _ = grpo_loss(logp, old, ref, advantages, batch.completion_mask, settings)
            out.append((loss.detach(), *torch.autograd.grad(loss, lora, retain_graph=True)))
        return out

    lean = losses_and_grads(policy, policy.image_features(batch.prompts))
    with naive(policy) as plain_policy:
        plain = losses_and_grads(plain_policy, None)
    for lean_values, plain_values in zip(lean, plain, strict=True):
        assert_close(lean_values[0], plain_values[0], atol=1e-6, rtol=1e-5)  # the loss
        for lean_grad, naive_grad in zip(lean_values[1:], plain_values[1:], strict=True):
            assert_close(lean_grad, naive_grad, atol=1e-6, rtol=1e-4)
    assert lean[0][0] != lean[1][0]  # the KL term is there
    assert sum(float(g.abs().sum()) for g in lean[0][1:]) > 0


# --- image features across inner iterations ------------------------------------------------
def test_image_features_reused_across_iterations_equal_recomputation(
    tiny_model_dir: Path, images: list[Image.Image]
) -> None:
    """mu = 2: features computed before the first update serve the second pass exactly, since
    LoRA on the language model does not touch the vision tower."""
    torch.manual_seed(0)
    policy = prepare(Policy(PolicySettings(model=str(tiny_model_dir)), CPU), seed=2)
    batch = fixed_batch(policy, images)
    calls: list[int] = []
    visual = unwrap(policy.model).model.visual
    hook = visual.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    features = policy.image_features(batch.prompts)
    assert calls == [batch.prompts.pixel_values.shape[0]]  # one call, each prompt's patches once
    optimizer = torch.optim.SGD(policy.trainable_parameters(), lr=0.5)
    for _ in range(2):
        cached = policy.logprobs(batch, 1.0, image_features=features).logp
        (-(cached * batch.completion_mask).sum()).backward()
        cached_grads = lora_grads(policy)
        recomputed = policy.logprobs(batch, 1.0).logp  # vision tower on every row's images
        (-(recomputed * batch.completion_mask).sum()).backward()
        assert_close(cached, recomputed, atol=1e-6, rtol=0)
        for a, b in zip(cached_grads, lora_grads(policy), strict=True):
            assert_close(a, b, atol=1e-6, rtol=1e-5)
        for p, g in zip(policy.trainable_parameters(), cached_grads, strict=True):
            p.grad = g
        optimizer.step()
        policy.model.zero_grad(set_to_none=True)
    hook.remove()
    assert len(calls) == 3  # the features once + one plain pass per iteration


def test_trained_vision_tower_keeps_the_plain_path(
    tiny_model_dir: Path, images: list[Image.Image]
) -> None:
    torch.manual_seed(0)
    settings = PolicySettings(model=str(tiny_model_dir), lora_vision=True)
    policy = prepare(Policy(settings, CPU), seed=3)
    batch = fixed_batch(policy, images)
    assert policy.image_features(batch.prompts) is None  # features depend on trained weights
    lean = policy.logprobs(batch, 1.0).logp
    lean.sum().backward()
    lean_grads = lora_grads(policy)
    with naive(policy) as plain_policy:
        plain = plain_policy.logprobs(batch, 1.0).logp
        plain.sum().backward()
        plain_grads = lora_grads(policy)
    assert_close(lean, plain, atol=2e-5, rtol=0)
    names = [n for n, p in policy.model.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, lean_grads, plain_grads, strict=True):
        assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
    vision = [g for n, g in zip(names, lean_grads, strict=True) if ".visual." in n]
    assert vision and sum(float(g.abs().sum()) for g in vision) > 0


# --- the lean sampler ---------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_equal_trainer_logprobs(
    policy: Policy, images: list[Image.Image], temperature: float
) -> None:
    """Prefill per prompt + repeated KV cache + explicit positions reproduce the training
    forward: the log-prob the sampler reports for each drawn token is the trainer's. Tokens a
    first run drew count as stop tokens in a second run with the same seed, so rows end at
    different steps and leave the decode batch early."""
    prompts = policy.encode(mixed_prompts(policy, images))
    calls: list[int] = []
    visual = unwrap(policy.model).model.visual
    hook = visual.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    settings = SamplingSettings(max_new_tokens=7, temperature=temperature)
    torch.manual_seed(5)
    free = sample_completions(policy.model, prompts, GROUP, settings, set(), policy.suppressed)
    assert [len(t) for t in free.tokens] == [7] * 3 * GROUP
    stops = {free.tokens[0][2], free.tokens[3][4]}  # same seed: rows 0 and 3 stop early
    torch.manual_seed(5)
    out = sample_completions(policy.model, prompts, GROUP, settings, stops, policy.suppressed)
    hook.remove()
    assert calls == [prompts.pixel_values.shape[0]] * 2  # images encoded once per prompt

    lengths = [len(t) for t in out.tokens]
    assert len(out.tokens) == 3 * GROUP and len(set(lengths)) > 1 and max(lengths) == 7
    assert all(len(t) == len(lp) for t, lp in zip(out.tokens, out.logprobs, strict=True))
    assert not policy.vision_ids.intersection(t for row in out.tokens for t in row)
    batch = build_rollout_batch(prompts, out.tokens, GROUP, policy.pad_id, stops, policy.vision_ids)
    assert batch.completion_mask.sum(1).tolist() == lengths
    with torch.no_grad():
        trainer = policy.logprobs(batch, temperature).logp  # [N, T]
    reported = torch.zeros_like(trainer)
    for i, row in enumerate(out.logprobs):
        reported[i, : len(row)] = torch.tensor(row)
    assert_close(reported, trainer, atol=1e-5, rtol=0)


def test_draw_tokens_inverts_the_cdf() -> None:
    """Against a loop: the token is the first v whose cumulative weight exceeds u * total;
    zero-probability tokens are never drawn, even at u = 0 and u -> 1."""
    scores = torch.tensor(
        [
            [0.0, float("-inf"), 1.0, 2.0, float("-inf")],
            [float("-inf"), 0.5, 0.5, float("-inf"), -1.0],
            [3.0, -2.0, float("-inf"), 0.0, float("-inf")],
        ]
    )
    for u in (0.0, 0.2, 0.5, 0.7, 0.999, 1.0 - 2.0**-53):
        uniform = torch.full((3,), u, dtype=torch.float64)
        tokens, logp = draw_tokens(scores.clone(), uniform)
        for i in range(3):
            weights = [math.exp(s) for s in scores[i].tolist()]
            total, running, expected = sum(weights), 0.0, None
            for v, w in enumerate(weights):
                running += w
                if running > u * total and w > 0:
                    expected = v
                    break
            assert int(tokens[i]) == expected, (u, i)
            assert abs(float(logp[i]) - (float(scores[i, expected]) - math.log(total))) < 1e-6


def test_draw_tokens_frequencies_match_softmax() -> None:
    gen = torch.Generator().manual_seed(0)
    scores = torch.tensor([1.0, -0.5, float("-inf"), 2.0, 0.0, -3.0])
    probs = torch.softmax(scores.double(), 0)  # [V]
    draws = 40_000
    uniform = torch.rand(draws, generator=gen, dtype=torch.float64)
    tokens, _ = draw_tokens(scores.expand(draws, -1).clone(), uniform)
    counts = torch.bincount(tokens, minlength=6).double()
    sigma = (draws * probs * (1 - probs)).sqrt()
    assert counts[2] == 0
    assert ((counts - draws * probs).abs() <= 4 * sigma + 1e-9).all(), counts / draws


@pytest.mark.parametrize(
    ("top_k", "top_p", "temperature"), [(0, 1.0, 1.0), (5, 1.0, 0.7), (0, 0.6, 1.3), (50, 0.9, 1.0)]
)
def test_processed_scores_equal_transformers_processors(
    top_k: int, top_p: float, temperature: float
) -> None:
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        SuppressTokensLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    gen = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(4, 1000, generator=gen)  # [N, V]
    suppressed = torch.tensor([3, 17, 999])
    chain = LogitsProcessorList([SuppressTokensLogitsProcessor(suppressed.tolist())])
    chain.append(TemperatureLogitsWarper(temperature)) if temperature != 1.0 else None
    chain.append(TopKLogitsWarper(top_k)) if top_k else None
    chain.append(TopPLogitsWarper(top_p)) if top_p < 1.0 else None
    expected = chain(torch.zeros(4, 1, dtype=torch.long), logits.clone())
    settings = SamplingSettings(temperature=temperature, top_k=top_k, top_p=top_p)
    ours = processed_scores(logits.clone(), settings, suppressed)
    assert torch.equal(ours.isinf(), expected.isinf())
    assert_close(ours, expected, atol=1e-6, rtol=0)
    assert (ours[:, suppressed] == float("-inf")).all()


def test_greedy_lean_equals_transformers_generate(
    policy: Policy, images: list[Image.Image]
) -> None:
    prompts = mixed_prompts(policy, images)
    greedy = SamplingSettings(max_new_tokens=6, greedy=True)
    lora_b = [p for name, p in policy.model.named_parameters() if "lora_B" in name]
    saved = [p.detach().clone() for p in lora_b]
    with torch.no_grad():
        for p in lora_b:
            p.mul_(10.0)  # a strong adapter: greedy text then depends on the prompt
    try:
        lean = TransformersSampler(policy).generate(prompts, 2, greedy).completion_ids
        plain = NaiveSampler(policy).generate(prompts, 2, greedy).completion_ids
    finally:
        with torch.no_grad():
            for p, value in zip(lora_b, saved, strict=True):
                p.copy_(value)
    assert lean == plain
    assert len({tuple(row) for row in lean}) == 3  # one text per prompt, repeated
