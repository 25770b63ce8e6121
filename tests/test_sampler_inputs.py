"""The transformers sampler takes the trainer's encoded prompts and image features as they are.

A step encodes its prompts once (tokeniser + image preprocessing) and runs the vision tower
once per image: the sampler, the reference pass and the policy passes all reuse them. Counted
on the tiny Qwen2.5-VL with hooks on the vision tower and Policy.encode; and the sampler's
completions and log-probs for a fixed seed are the same whether it encodes the prompts itself
or is handed them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from grpo import distributed
from grpo.trainer import build_trainer, train_step
from grpo.types import PolicySettings, PromptInput, SamplingSettings
from models import BACKEND
from models.logprobs import unwrap
from models.policy import Policy
from models.samplers import TransformersSampler
from tests.training_helpers import small_config, write_ocr_jsonl

CPU = torch.device("cpu")


def count_vision_tower(policy: Policy) -> tuple[list[int], Any]:
    """(images per vision-tower call, the hook handle)."""
    calls: list[int] = []

    def record(module: Any, args: tuple, kwargs: dict, out: Any) -> None:
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        calls.append(int(grid.shape[0]))

    visual = unwrap(policy.model).model.visual
    return calls, visual.register_forward_hook(record, with_kwargs=True)


def chat(policy: Policy, text: str, images: list[Image.Image]) -> PromptInput:
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    return policy.prompt_input([{"role": "user", "content": content}], images)


def test_sampler_given_the_encoded_batch_draws_the_same_completions(
    tiny_model_dir: Path, images: list[Image.Image]
) -> None:
    torch.manual_seed(0)
    policy = Policy(PolicySettings(model=str(tiny_model_dir)), CPU)
    prompts = [chat(policy, "read", images[:1]), chat(policy, "both?", images[1:])]
    prompts.append(chat(policy, "2 + 2 =", []))
    sampler = TransformersSampler(policy)
    settings = SamplingSettings(max_new_tokens=8, temperature=0.9)
    calls, hook = count_vision_tower(policy)
    torch.manual_seed(3)
    own = sampler.generate(prompts, 3, settings)  # encodes and runs the tower itself
    assert calls == [3]  # one pass over the 3 images, not one per completion
    encoded = policy.encode(prompts)
    features = policy.image_features(encoded)
    assert calls == [3, 3]
    torch.manual_seed(3)
    given = sampler.generate(prompts, 3, settings, encoded, features)
    hook.remove()
    assert calls == [3, 3]  # the sampler did not run the tower again
    assert given.completion_ids == own.completion_ids
    assert given.logprobs == own.logprobs
    assert len(own.completion_ids) == 9 and all(own.completion_ids)


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_a_step_encodes_once_and_runs_the_vision_tower_once_per_image(
    tmp_path: Path, beta: float
) -> None:
    config = small_config(write_ocr_jsonl(tmp_path / "data"), tmp_path / "run", beta=beta)
    trainer = build_trainer(config, distributed.init_distributed(), BACKEND)
    assert isinstance(trainer.sampler, TransformersSampler)
    policy = trainer.policy
    encodes: list[int] = []
    original = policy.encode
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(policy, "encode", lambda p: encodes.append(len(p)) or original(p))
        calls, hook = count_vision_tower(policy)
        for step in range(2):
            train_step(trainer)
            assert encodes == [config.prompts_per_step] * (step + 1)
            # one image per OCR prompt: one tower pass over the step's images, shared by the
            # sampler, the reference pass (beta > 0) and the policy pass
            assert calls == [config.prompts_per_step] * (step + 1)
        hook.remove()
