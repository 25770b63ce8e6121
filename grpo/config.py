"""One flat dataclass holds every training setting.

Resolution order, later wins: the dataclass defaults < the task preset configs/<task>.yaml
< a --config YAML file < command-line flags (`--learning-rate 3e-6`, `--lora-r 16`, ...).
The resolved config is printed and saved as config.yaml in the run directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from grpo.loss import LossSettings
from grpo.sampler_correction import IS_MODES, CorrectionSettings
from grpo.types import PolicySettings, SamplerSettings, SamplingSettings, ShardSettings

# The sampler "auto" picks on a CPU: the faster one on SmolLM2 here (README, Speed; measured with
# bench/step.py and bench/sampling.py). On CUDA "auto" is vLLM.
CPU_SAMPLER = "hf"
PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class TrainConfig:
    # what to train, on what
    task: str = "ocr"
    model: str = "tiny"  # local dir, hub id, or "tiny" (offline random Qwen2.5-VL)
    data: str | None = None  # None: the task's built-in data
    data_split: str | None = None  # a Hugging Face dataset's split (None: "train" or the only one)
    column_map: str | None = None  # "problem=query,solution=label": our name=dataset's column
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
    sampler: str = "auto"  # hf | vllm | auto: vllm on CUDA (if installed), else CPU_SAMPLER
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
    full: bool = False  # full fine-tuning: train every language-model weight (so does lora_r 0)
    lora_r: int = 8
    lora_alpha: int = 32
    lora_vision: bool = False
    dtype: str | None = None  # None: bf16 on CUDA, float32 on CPU
    attn_implementation: str | None = None  # None: flash_attention_2 if available, else sdpa
    gradient_checkpointing: bool = False
    min_pixels: int | None = None
    max_pixels: int | None = None
    logprob_chunk_tokens: int = 1024
    packing: bool = False  # padding-free log-prob passes (text LMs, Qwen2.5-VL; models/packing.py)
    prefix_sharing: bool = True  # each group's prompt once in log-prob passes (models/prefix.py)
    logprob_group_batch: int = 1  # groups per log-prob micro-batch and backward (0: all)
    merge_for_sampling: bool = True  # transformers sampler: LoRA merged into W while sampling
    cpu_lean_heap: bool = False  # CPU: freed tensors go back to the OS (less RSS, slower steps)
    # scaling past one GPU (README "Scaling"; models/sharding.py)
    fsdp: bool = False  # shard parameters, gradients and optimizer state with FSDP2
    fsdp_cpu_offload: bool = False  # keep the shards (and the AdamW step) on the host (CUDA)
    vllm_tensor_parallel_size: int = 1  # ranks per vLLM engine (GPUs; divides the world size)
    # checkpoints and logging
    save_steps: int = 50  # 0: only the final checkpoint (the final one is always saved)
    save_total_limit: int | None = 3
    resume: bool = False
    overwrite: bool = False  # replace an existing run in output_dir
    log_completions_steps: int = 10  # print/save sample completions every N steps (0: never)
    tensorboard: bool = True
    report_to: list[str] = field(default_factory=list)  # also log to: "wandb"
    wandb_project: str = "vl-grpo"
    report: bool = True  # <run>/report.html, rebuilt at every save
    # evaluation during training (grpo/training_eval.py)
    eval_steps: int = 0  # greedy evaluation every N steps and at step 0 (0: never)
    eval_on_start: bool = True  # with eval_steps: evaluate the base model at step 0 too
    eval_data: str | None = None  # held-out data; None: eval_fraction, else the task's eval split
    eval_fraction: float = 0.0  # hold out this fraction of the training data instead
    eval_batch_size: int | None = None  # None: 8 with transformers, 64 with vLLM
    save_best: str | None = None  # keep <run>/best/checkpoint-N of the best eval/<metric>

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir.format(task=self.task))

    # --- the records the loop hands on ------------------------------------------------------
    @property
    def full_finetuning(self) -> bool:
        """Training the whole language model: --full, or --lora-r 0 (no adapter to train)."""
        return self.full or self.lora_r == 0

    def policy_settings(self) -> PolicySettings:
        """In training lora_r 0 means full fine-tuning, never a frozen model; the frozen copy of
        the base that serves as reference is built only when the loss has a KL term. Full
        fine-tuning keeps its weights (and so AdamW's moments) in float32 on every device."""
        return PolicySettings(
            model=self.model,
            lora_r=0 if self.full_finetuning else self.lora_r,
            full=self.full_finetuning,
            reference=self.beta > 0,
            lora_alpha=self.lora_alpha,
            lora_vision=self.lora_vision,
            dtype=self.dtype or ("float32" if self.full_finetuning else None),
            attn_implementation=self.attn_implementation,
            gradient_checkpointing=self.gradient_checkpointing,
            min_pixels=self.min_pixels,
            max_pixels=self.max_pixels,
            chunk_tokens=self.logprob_chunk_tokens,
            packing=self.packing,
            prefix_sharing=self.prefix_sharing,
            merge_for_sampling=self.merge_for_sampling,
        )

    @property
    def sampler_backend(self) -> str:
        """The sampler that runs: `sampler`, or for "auto" vLLM on CUDA, CPU_SAMPLER on a CPU."""
        if self.sampler != "auto":
            return self.sampler
        has_vllm = importlib.util.find_spec("vllm") is not None
        return "vllm" if has_vllm and torch.cuda.is_available() else CPU_SAMPLER

    def sampler_settings(self, max_images_per_prompt: int = 1) -> SamplerSettings:
        return SamplerSettings(
            backend=self.sampler_backend,
            gpu_memory_utilization=self.vllm_gpu_memory_utilization,
            max_model_len=self.vllm_max_model_len,
            sync=self.vllm_sync,
            sleep=self.vllm_sleep,
            seed=self.seed,
            max_images_per_prompt=max(1, max_images_per_prompt),
            tensor_parallel_size=self.vllm_tensor_parallel_size,
        )

    def shard_settings(self) -> ShardSettings:
        """FSDP2's mixed precision: bf16 compute with float32 gradient reduction on CUDA; on a
        CPU the parameters' own dtype (float32) throughout."""
        cuda = torch.cuda.is_available()
        return ShardSettings(
            param_dtype=torch.bfloat16 if cuda else None,
            reduce_dtype=torch.float32 if cuda else None,
            cpu_offload=self.fsdp_cpu_offload,
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


class ConfigError(ValueError):
    """A setting with the wrong type or out of range; the message names field, value, rule."""


def _hint(name: str) -> tuple[Any, bool]:
    """The non-None type of a field (`int | None` -> int) and whether None is allowed."""
    hint = typing.get_type_hints(TrainConfig)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return args[0], True
    return hint, False


def _field_type(f: dataclasses.Field) -> Any:
    return _hint(f.name)[0]


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _coerce_scalar(kind: type, value: Any) -> Any:
    """`value` as `kind`, or raise TypeError/ValueError. Strings are parsed because PyYAML
    reads `1e-5` (no dot) as a string; a bool is never taken for a number."""
    if kind is bool:
        return value if isinstance(value, bool) else _parse_bool(_as_text(value))
    if isinstance(value, bool):
        raise TypeError("a boolean")
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value if isinstance(value, int) else int(_as_text(value))
    if kind is float:
        return float(value) if isinstance(value, int | float) else float(_as_text(value))
    return _as_text(value)  # str


def _type_name(name: str) -> str:
    kind, optional = _hint(name)
    text = "a list of strings" if typing.get_origin(kind) is list else f"a {kind.__name__}"
    return text + (" or null" if optional else "")


def _has_type(name: str, value: Any) -> bool:
    """Whether `value` already is of the field's type (an int passes for a float)."""
    kind, optional = _hint(name)
    if value is None:
        return optional
    if typing.get_origin(kind) is list:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    return isinstance(value, (int, float) if kind is float else kind)


def _as_text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(type(value).__name__)
    return value


def coerce(name: str, value: Any, source: str = "config") -> Any:
    """One setting converted to its TrainConfig type; ConfigError naming it if it cannot be."""
    kind, optional = _hint(name)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: {name}=None: a value is required")
    try:
        if typing.get_origin(kind) is list:
            items = [value] if isinstance(value, str) else value  # one plugin: a bare string
            if not isinstance(items, list | tuple):
                raise TypeError(type(value).__name__)
            return [_coerce_scalar(typing.get_args(kind)[0], v) for v in items]
        return _coerce_scalar(kind, value)
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        raise ConfigError(f"{source}: {name}={value!r}: expected {_type_name(name)}") from None


def coerce_all(values: dict[str, Any], source: str) -> dict[str, Any]:
    """A whole mapping of settings (a YAML file's) checked for unknown keys and coerced."""
    _check_keys(values, source)
    return {name: coerce(name, value, source) for name, value in values.items()}


def _check_keys(values: dict, source: str) -> None:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown := sorted(set(values) - known):
        raise ConfigError(f"{source}: unknown config field(s) {unknown}")


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


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of config fields, got {values!r:.60}")
    return coerce_all(values, str(path))


def task_preset(task: str) -> dict[str, Any]:
    """configs/<task>.yaml's values, coerced through the field types ({} when there is none)."""
    preset_file = PRESET_DIR / f"{task}.yaml"
    return _read_yaml(preset_file) if preset_file.is_file() else {}


def load_config(argv: list[str] | None = None) -> TrainConfig:
    """Defaults < configs/<task>.yaml < --config file < command-line flags."""
    args = vars(build_parser().parse_args(argv))
    config_file = args.pop("config")
    flags = {k: v for k, v in args.items() if v is not None}
    from_file = _read_yaml(Path(config_file)) if config_file else {}
    task = flags.get("task", from_file.get("task", TrainConfig.task))
    explicit = {**from_file, **flags}
    check_full_and_lora(explicit)
    preset = task_preset(task)
    if explicit.get("full"):  # a preset's adapter rank does not apply to full fine-tuning
        preset.pop("lora_r", None)
        explicit.setdefault("lora_r", 0)
    config = TrainConfig(**{**preset, **explicit})
    validate(config)
    return config


def check_full_and_lora(explicit: dict[str, Any]) -> None:
    """--full with an adapter rank given on the command line or in --config is a contradiction
    (a task preset's lora_r is not: --full overrides it)."""
    if explicit.get("full") and explicit.get("lora_r", 0) > 0:
        raise ConfigError(
            f"--full and --lora-r {explicit['lora_r']} both given: full fine-tuning trains no "
            "adapter; drop --lora-r (or --full to train LoRA)"
        )


CHOICES: dict[str, tuple[str, ...]] = {
    "scale_rewards": ("group", "batch", "none"),
    "lr_scheduler": ("cosine", "linear", "constant"),
    "sampler": ("hf", "vllm", "auto"),
    "vllm_sync": ("merged", "adapter"),
    "reward_aggregation": ("sum", "normalize_then_sum"),
    "is_mode": (*IS_MODES, None),
}  # loss_type, policy_loss, kl_estimator, importance_sampling_level: LossSettings checks them

# (field, rule, allowed text); None values of optional fields are not checked
RANGES: list[tuple[str, Callable[[Any], bool], str]] = [
    *[(n, lambda v: v >= 1, ">= 1") for n in (
        "max_steps", "prompts_per_step", "gradient_accumulation_steps", "num_iterations",
        "max_completion_length", "max_prompt_length", "dynamic_sampling_max_draws",
        "logprob_chunk_tokens", "vllm_max_model_len", "min_pixels", "max_pixels",
    )],
    ("num_generations", lambda v: v >= 2, ">= 2 (advantages compare completions of a group)"),
    *[(n, lambda v: v >= 0, ">= 0 (0: full fine-tuning)") for n in ("lora_r",)],
    *[(n, lambda v: v >= 0, ">= 0") for n in (
        "warmup_steps", "top_k", "weight_decay", "save_steps", "log_completions_steps",
        "overlong_buffer", "advantage_eps", "entropy_coef", "off_policy_delta",
        "save_total_limit", "eval_steps", "logprob_group_batch",
    )],
    *[(n, lambda v: v > 0, "> 0") for n in (
        "learning_rate", "temperature", "max_grad_norm", "lora_alpha", "is_upper", "is_lower",
        "importance_sampling_cap", "eval_batch_size",
    )],
    *[(n, lambda v: 0 <= v < 1, "in [0, 1)") for n in ("adam_beta1", "adam_beta2")],
    *[(n, lambda v: 0 < v <= 1, "in (0, 1]") for n in ("top_p", "vllm_gpu_memory_utilization")],
]  # fmt: skip


def validate(config: TrainConfig) -> None:
    """Reject settings that would fail later or train on nonsense: every field's type, then
    choices and ranges. Raises ConfigError naming the field, its value and what is allowed."""
    for f in dataclasses.fields(TrainConfig):  # a TrainConfig built in code skips coercion
        value = getattr(config, f.name)
        if not _has_type(f.name, value):
            raise ConfigError(f"{f.name}={value!r}: expected {_type_name(f.name)}")
    for name, allowed in CHOICES.items():
        if (value := getattr(config, name)) not in allowed:
            raise ConfigError(f"{name}={value!r}: expected one of {allowed}")
    for name, rule, allowed in RANGES:
        value = getattr(config, name)
        if value is not None and not (math.isfinite(value) and rule(value)):
            raise ConfigError(f"{name}={value!r}: must be {allowed}")
    if None not in (config.min_pixels, config.max_pixels) and config.min_pixels > config.max_pixels:
        raise ConfigError(
            f"min_pixels={config.min_pixels} > max_pixels={config.max_pixels}: need min <= max"
        )
    if config.dtype is not None and not _is_float_dtype(config.dtype):
        raise ConfigError(f"dtype={config.dtype!r}: expected a torch float type, e.g. bfloat16")
    _validate_corrections(config)
    _validate_evaluation(config)
    _validate_parallel(config)
    _validate_full(config)
    try:  # the loss variants' own rules (grpo/loss.py), so they live in one place
        config.loss_settings()
    except ValueError as e:  # LossSettings says eps_*, the config calls them epsilon_*
        message = str(e).replace("eps_low", "epsilon_low").replace("eps_high", "epsilon_high")
        raise ConfigError(f"loss settings: {message}") from None


def _validate_parallel(config: TrainConfig) -> None:
    """--fsdp-cpu-offload, --cpu-lean-heap and --vllm-tensor-parallel-size: what this machine
    and job allow."""
    cuda = torch.cuda.is_available()
    if config.fsdp_cpu_offload and not config.fsdp:
        raise ConfigError("fsdp_cpu_offload=True needs fsdp=True (it offloads FSDP2's shards)")
    if config.fsdp_cpu_offload and not cuda:
        raise ConfigError(
            "fsdp_cpu_offload=True: without CUDA the shards already live in host memory; drop it"
        )
    if config.cpu_lean_heap and cuda:
        raise ConfigError("cpu_lean_heap=True: on CUDA the tensors live in device memory; drop it")
    if config.fsdp and config.vllm_sync == "adapter" and config.sampler_backend == "vllm":
        raise ConfigError("vllm_sync='adapter' with fsdp=True: a sharded policy syncs merged")
    k = config.vllm_tensor_parallel_size
    if k < 1:
        raise ConfigError(f"vllm_tensor_parallel_size={k}: must be >= 1")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % k:
        raise ConfigError(f"vllm_tensor_parallel_size={k} must divide the world size {world}")
    if k > 1 and not cuda:
        raise ConfigError(
            f"vllm_tensor_parallel_size={k}: tensor-parallel vLLM needs GPUs; on a CPU use 1"
        )
    if k > 1 and config.sampler_backend != "vllm":
        raise ConfigError(f"vllm_tensor_parallel_size={k} needs sampler=vllm")


def _is_float_dtype(name: str) -> bool:
    import torch  # the policy reads dtype as getattr(torch, name)

    dtype = getattr(torch, name, None)
    return isinstance(dtype, torch.dtype) and dtype.is_floating_point


def _validate_evaluation(config: TrainConfig) -> None:
    """Evaluation, best-checkpoint and logger settings that only make sense together."""
    if not 0 <= config.eval_fraction < 1:
        raise ConfigError(f"eval_fraction={config.eval_fraction!r}: must be in [0, 1)")
    if config.eval_fraction and config.eval_data:
        raise ConfigError("eval_data and eval_fraction both given: hold out one or the other")
    if config.save_best is not None:
        if not config.eval_steps:
            raise ConfigError(f"save_best={config.save_best!r} needs eval_steps > 0")
        if not config.save_best.startswith("eval/"):
            raise ConfigError(
                f"save_best={config.save_best!r}: name an eval metric, e.g. eval/accuracy/answer"
            )
    if unknown := sorted(set(config.report_to) - {"wandb", "tensorboard", "none"}):
        raise ConfigError(f"report_to={unknown}: expected wandb, tensorboard or none")


def _validate_full(config: TrainConfig) -> None:
    """Full fine-tuning has no adapter (no rank beside --full, nothing for vLLM's LoRA) and
    needs weights that can hold small updates (float32)."""
    check_full_and_lora({"full": config.full, "lora_r": config.lora_r})
    if config.full_finetuning and config.dtype in ("bfloat16", "float16"):
        raise ConfigError(
            f"dtype={config.dtype!r} with full fine-tuning (--full or --lora-r 0): the update "
            "is applied to the weights themselves, and an update below 1/256 of a weight "
            "vanishes in 16-bit; leave --dtype out (float32) or train LoRA"
        )
    if config.full_finetuning and config.vllm_sync == "adapter":
        raise ConfigError(
            "vllm_sync='adapter' needs a LoRA adapter; full fine-tuning (--full or --lora-r 0) "
            "syncs the weights themselves: use vllm_sync merged"
        )


def _validate_corrections(config: TrainConfig) -> None:
    c = config.correction_settings()
    if c.is_mode is not None and c.is_upper is None:
        raise ConfigError(f"is_mode={c.is_mode!r} needs is_upper (the weight cap)")
    if None not in (c.is_lower, c.is_upper) and c.is_lower > c.is_upper:
        raise ConfigError(f"is_lower={c.is_lower} > is_upper={c.is_upper}: need lower <= upper")


def check_inputs(config: TrainConfig, default_rewards: str) -> list[tuple[str, float]]:
    """The files and names a run needs, before any model loads: the data path, the reward
    plugins (imported: they register rewards) and every reward named. Returns the specs."""
    from rewards import get_reward, load_plugin, parse_reward_spec

    for name in ("data", "eval_data"):
        if (value := getattr(config, name)) is not None and not Path(value).exists():
            raise ConfigError(f"{name}={value!r}: no such file or directory")
    for plugin in config.reward_plugin:
        if not Path(plugin).is_file():
            raise ConfigError(f"reward_plugin={plugin!r}: no such file")
        load_plugin(plugin)
    spec = config.rewards or default_rewards
    try:
        specs = parse_reward_spec(spec)
        for name, _ in specs:
            get_reward(name)
    except (KeyError, ValueError, TypeError) as e:
        message = e.args[0] if isinstance(e, KeyError) else str(e)
        raise ConfigError(f"rewards={spec!r}: {message}") from None
    return specs


def to_yaml(config: TrainConfig) -> str:
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False, allow_unicode=True)
