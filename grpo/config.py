"""One flat dataclass holds every training setting.

Resolution order, later wins: the dataclass defaults < the task preset configs/<task>.yaml
< a --config YAML file < command-line flags (`--learning-rate 3e-6`, `--lora-r 16`, ...).
The resolved config is printed and saved as config.yaml in the run directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from grpo.loss import LossSettings
from grpo.sampler_correction import CorrectionSettings
from grpo.types import PolicySettings, SamplerSettings, SamplingSettings

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class TrainConfig:
    # what to train, on what
    task: str = "ocr"
    model: str = "tiny"  # local dir, hub id, or "tiny" (offline random Qwen2.5-VL)
    data: str | None = None  # None: the task's built-in data
    skip_bad_samples: bool = False
    rewards: str | None = None  # "ocr:1.0,format:0.5"; None: the task's default
    reward_plugin: list[str] = field(default_factory=list)  # python files that register rewards
    output_dir: str = "runs/{task}"
    seed: int = 0
    # steps and batches (per rank)
    max_steps: int = 100
    prompts_per_step: int = 2  # prompts sampled per rank per optimizer step (x G completions)
    num_generations: int = 8  # G
    gradient_accumulation_steps: int = 1  # generation batches per optimizer step
    num_iterations: int = 1  # mu: optimizer passes over one generation batch
    # optimiser
    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    max_grad_norm: float = 1.0
    lr_scheduler: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 0
    # GRPO
    loss_type: str = "grpo"  # grpo | bnpo | dapo | dr_grpo
    scale_rewards: str = "group"  # group | batch | none
    beta: float = 0.04  # KL weight; 0 skips the reference forward
    epsilon_low: float = 0.2
    epsilon_high: float | None = None  # None: epsilon_low (DAPO uses 0.28)
    advantage_eps: float = 1e-4
    mask_truncated_completions: bool = False
    skip_zero_std_groups: bool = False  # drop groups whose rewards are all equal from the loss
    reward_aggregation: str = "sum"  # sum | normalize_then_sum (GDPO)
    dynamic_sampling: bool = False  # DAPO: draw prompts until every group has reward spread
    dynamic_sampling_max_draws: int = 8  # generation rounds per batch before giving up
    overlong_buffer: int | None = None  # the `overlong` reward's L_cache (None: L_max // 5)
    # loss variants (grpo/loss.py LossSettings; docs/algorithm.md section 6)
    importance_sampling_level: str = "token"  # token | sequence (GSPO) | sequence_token
    policy_loss: str = "ppo"  # ppo | cispo | sapo
    delta: float | None = None  # INTELLECT-2 two-sided clip (> 1 + epsilon_high)
    clip_ratio_c: float | None = None  # dual-clip PPO bound (> 1)
    sapo_tau_pos: float = 1.0
    sapo_tau_neg: float = 1.05
    kl_estimator: str = "k3"  # k1 | k2 | k3 | low_var_kl
    kl_in_reward: bool = False  # subtract beta * KL from the rewards instead of the loss term
    entropy_coef: float = 0.0
    top_entropy_quantile: float = 1.0  # < 1: only the top-rho entropy tokens train
    # sampler/trainer mismatch (grpo/sampler_correction.py)
    is_mode: str | None = None  # token_truncate | token_mask | sequence_truncate | sequence_mask
    is_lower: float | None = None
    is_upper: float | None = None
    off_policy_delta: float | None = None  # DeepSeek-V3.2 off-policy sequence masking
    # sampling
    sampler: str = "hf"  # hf | vllm
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_completion_length: int = 1024
    max_prompt_length: int | None = None  # longer prompts are an error, never cut
    importance_sampling_cap: float | None = None  # shorthand: is_mode token_truncate, this cap
    vllm_gpu_memory_utilization: float = 0.3
    vllm_max_model_len: int = 4096
    vllm_sync: str = "merged"  # merged | adapter
    vllm_sleep: bool = False
    # model
    lora_r: int = 8
    lora_alpha: int = 32
    lora_vision: bool = False
    dtype: str | None = None  # None: bf16 on CUDA, float32 on CPU
    attn_implementation: str | None = None  # None: flash_attention_2 if available, else sdpa
    gradient_checkpointing: bool = False
    min_pixels: int | None = None
    max_pixels: int | None = None
    logprob_chunk_tokens: int = 1024
    # checkpoints and logging
    save_steps: int = 50
    save_total_limit: int | None = 3
    resume: bool = False
    overwrite: bool = False  # replace an existing run in output_dir
    log_completions_steps: int = 10  # print/save sample completions every N steps (0: never)
    tensorboard: bool = True

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir.format(task=self.task))

    # --- the records the loop hands on ------------------------------------------------------
    def policy_settings(self) -> PolicySettings:
        return PolicySettings(
            model=self.model,
            lora_r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_vision=self.lora_vision,
            dtype=self.dtype,
            attn_implementation=self.attn_implementation,
            gradient_checkpointing=self.gradient_checkpointing,
            min_pixels=self.min_pixels,
            max_pixels=self.max_pixels,
            chunk_tokens=self.logprob_chunk_tokens,
        )

    def sampler_settings(self, max_images_per_prompt: int = 1) -> SamplerSettings:
        return SamplerSettings(
            backend=self.sampler,
            gpu_memory_utilization=self.vllm_gpu_memory_utilization,
            max_model_len=self.vllm_max_model_len,
            sync=self.vllm_sync,
            sleep=self.vllm_sleep,
            seed=self.seed,
            max_images_per_prompt=max(1, max_images_per_prompt),
        )

    def sampling_settings(self) -> SamplingSettings:
        return SamplingSettings(
            max_new_tokens=self.max_completion_length,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
        )

    def loss_settings(self) -> LossSettings:
        return LossSettings(
            loss_type=self.loss_type,
            beta=self.beta,
            eps_low=self.epsilon_low,
            eps_high=self.epsilon_high,
            max_completion_length=self.max_completion_length,
            importance_sampling_level=self.importance_sampling_level,
            policy_loss=self.policy_loss,
            delta=self.delta,
            clip_ratio_c=self.clip_ratio_c,
            sapo_tau_pos=self.sapo_tau_pos,
            sapo_tau_neg=self.sapo_tau_neg,
            kl_estimator=self.kl_estimator,
            kl_in_reward=self.kl_in_reward,
            entropy_coef=self.entropy_coef,
            top_entropy_quantile=self.top_entropy_quantile,
        )

    def correction_settings(self) -> CorrectionSettings:
        """--importance-sampling-cap C is --is-mode token_truncate --is-upper C."""
        mode, upper = self.is_mode, self.is_upper
        if mode is None and self.importance_sampling_cap is not None:
            mode, upper = "token_truncate", self.importance_sampling_cap
        return CorrectionSettings(mode, self.is_lower, upper, self.off_policy_delta)


def _field_type(f: dataclasses.Field) -> Any:
    """The non-None type of a field (`int | None` -> int), and whether it is a list."""
    hint = typing.get_type_hints(TrainConfig)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = args[0]
    return hint


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _check_keys(values: dict, source: str) -> None:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown := sorted(set(values) - known):
        raise ValueError(f"{source}: unknown config field(s) {unknown}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="GRPO training of a vision-language model")
    parser.add_argument("--config", help="YAML file with config fields (CLI flags override it)")
    for f in dataclasses.fields(TrainConfig):
        kind = _field_type(f)
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, type=_parse_bool, nargs="?", const=True, default=None)
        elif typing.get_origin(kind) is list:
            parser.add_argument(flag, action="append", default=None)
        else:
            parser.add_argument(flag, type=kind, default=None)
    return parser


def load_config(argv: list[str] | None = None) -> TrainConfig:
    """Defaults < configs/<task>.yaml < --config file < command-line flags."""
    args = vars(build_parser().parse_args(argv))
    config_file = args.pop("config")
    flags = {k: v for k, v in args.items() if v is not None}
    from_file: dict = {}
    if config_file:
        from_file = yaml.safe_load(Path(config_file).read_text()) or {}
        _check_keys(from_file, config_file)
    task = flags.get("task", from_file.get("task", TrainConfig.task))
    preset: dict = {}
    if (PRESET_DIR / f"{task}.yaml").is_file():
        preset = yaml.safe_load((PRESET_DIR / f"{task}.yaml").read_text()) or {}
        _check_keys(preset, str(PRESET_DIR / f"{task}.yaml"))
    config = TrainConfig(**{**preset, **from_file, **flags})
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    """Reject settings that would fail later or train on nonsense."""
    choices = {
        "loss_type": ("grpo", "bnpo", "dapo", "dr_grpo"),
        "scale_rewards": ("group", "batch", "none"),
        "lr_scheduler": ("cosine", "linear", "constant"),
        "sampler": ("hf", "vllm"),
        "vllm_sync": ("merged", "adapter"),
    }
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            raise ValueError(f"{name}={getattr(config, name)!r}: expected one of {allowed}")
    if config.num_generations < 2:
        raise ValueError("num_generations must be >= 2: advantages compare completions of a group")
    for name in ("max_steps", "prompts_per_step", "gradient_accumulation_steps", "num_iterations"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1")
    if config.temperature <= 0:
        raise ValueError("temperature must be > 0 for sampling")


def to_yaml(config: TrainConfig) -> str:
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False, allow_unicode=True)
