"""--fsdp, --fsdp-cpu-offload and --vllm-tensor-parallel-size: what config validation accepts
on this CPU machine, each refusal one line naming the field."""

from __future__ import annotations

import pytest
import torch

from grpo.config import ConfigError, TrainConfig, load_config, validate


def test_fsdp_flags_parse() -> None:
    config = load_config(["--fsdp", "--vllm-tensor-parallel-size", "1"])
    assert config.fsdp and not config.fsdp_cpu_offload and config.vllm_tensor_parallel_size == 1
    settings = config.shard_settings()  # CPU: no mixed precision
    assert settings.param_dtype is None and settings.reduce_dtype is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        # WORLD_SIZE unset: one process, which k = 2 does not divide; under torchrun with 2
        # ranks the GPU rule speaks instead (next test's setting)
        ({"vllm_tensor_parallel_size": 2}, "vllm_tensor_parallel_size=2 must divide"),
        ({"vllm_tensor_parallel_size": 0}, "vllm_tensor_parallel_size=0: must be >= 1"),
        ({"fsdp_cpu_offload": True}, "fsdp_cpu_offload=True needs fsdp=True"),
        ({"fsdp": True, "fsdp_cpu_offload": True}, "fsdp_cpu_offload=True: without CUDA"),
        (
            {"fsdp": True, "sampler": "vllm", "vllm_sync": "adapter"},
            "vllm_sync='adapter' with fsdp=True",
        ),
    ],
)
def test_refusals_name_the_field(fields: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        validate(TrainConfig(**fields))
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)


def test_tensor_parallel_needs_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="=2: tensor-parallel vLLM needs GPUs; on a CPU use 1"):
        validate(TrainConfig(vllm_tensor_parallel_size=2))


def test_tensor_parallel_size_must_divide_the_world(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "3")
    validate(TrainConfig(vllm_tensor_parallel_size=1))
    with pytest.raises(ConfigError, match="=2 must divide the world size 3"):
        validate(TrainConfig(vllm_tensor_parallel_size=2))


def test_lean_heap_is_for_cpu_runs_only(monkeypatch: pytest.MonkeyPatch) -> None:
    validate(TrainConfig(cpu_lean_heap=True))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match="cpu_lean_heap=True: on CUDA"):
        validate(TrainConfig(cpu_lean_heap=True))
