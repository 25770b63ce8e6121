"""The models behind grpo.types' Protocols: Qwen2.5-VL and text-only causal LMs (loading,
samplers, vLLM engine and weight sync, LoRA merge and export) and the offline tiny model.

`models.BACKEND` is what train.py and evaluate.py hand to the loop.
"""

import models.cpu_compat  # noqa: F401, I001  (first: lets torchvision import beside CPU torch)

from pathlib import Path

from grpo.types import ModelBackend, Policy, PolicySettings, Sampler, SamplerSettings


def load_policy(settings: PolicySettings, device) -> Policy:
    from models.policy import make_policy

    return make_policy(settings, device)


def make_sampler(settings: SamplerSettings, policy: Policy) -> Sampler:
    from models.samplers import make_sampler as make

    return make(settings, policy)


def load_trained(model: str, adapter: Path | None, settings: PolicySettings, device) -> Policy:
    from models.export import load_policy as load

    return load(model, adapter, settings, device)


def check_same_base(expected: str, given: str) -> None:
    from models.export import check_same_base as check

    check(expected, given)


BACKEND = ModelBackend(
    load_policy=load_policy,
    make_sampler=make_sampler,
    load_trained=load_trained,
    check_same_base=check_same_base,
)
