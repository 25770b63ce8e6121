"""`sampler: auto` (the default) is vLLM on CUDA when it is installed, CPU_SAMPLER on a CPU;
an explicit sampler is kept; `packing` reaches the policy's settings."""

from __future__ import annotations

import pytest

import grpo.config as config_module
from grpo.config import CPU_SAMPLER, TrainConfig


def test_auto_sampler_by_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert TrainConfig().sampler == "auto"
    monkeypatch.setattr(config_module.torch.cuda, "is_available", lambda: False)
    assert TrainConfig().sampler_settings().backend == CPU_SAMPLER
    monkeypatch.setattr(config_module.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(config_module.importlib.util, "find_spec", lambda name: object())
    assert TrainConfig().sampler_settings().backend == "vllm"
    assert TrainConfig(sampler="hf").sampler_settings().backend == "hf"
    monkeypatch.setattr(config_module.importlib.util, "find_spec", lambda name: None)
    assert TrainConfig().sampler_settings().backend == CPU_SAMPLER  # no vLLM installed


def test_packing_flag_reaches_policy_settings() -> None:
    assert TrainConfig().policy_settings().packing is False
    assert TrainConfig(packing=True).policy_settings().packing is True
    flags = config_module.build_parser().parse_args(["--packing", "true"])
    assert flags.packing is True
