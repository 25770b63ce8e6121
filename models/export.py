"""A trained LoRA adapter on its base model: loading it (checked to fit), and exporting the merge.

Loading. A checkpoint stores only the adapter (peft format). `load_policy(base, adapter)` loads
the base model and puts the adapter on it. Before peft sees the adapter, every adapted module
is checked against the base: it must exist, and the factors must fit it (A [r, in] with
in = the layer's in_features, B [out, r] with out = its out_features). A mismatch is reported
as `BaseModelMismatch`, naming the base model, the adapter and the first modules that differ,
instead of peft's wall of "size mismatch" lines.

Export. `export_merged(policy, out)` folds the adapter into the base weights,

    W' = W + (alpha / r) * B @ A        for every adapted linear (models/merge.merged_weight,
                                        the formula the vLLM weight sync uses)

and writes a plain checkpoint directory: model safetensors + config.json +
generation_config.json (transformers' own save, so the tensor names are those of the original
checkpoint), the processor (image processor settings, tokenizer, chat template) and
`export_info.json` (where the weights came from); a text-only model gets its tokenizer in
place of the processor. transformers' from_pretrained and vLLM load
it like the original model. The policy must not be used afterwards: the adapter wrappers are
removed from it and the merged weights written into its base layers (no second copy of the
model is made, which matters for a 7B model on a host).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

import models.cpu_compat  # noqa: F401  (must precede transformers' image code)
from grpo.types import ADAPTER_CONFIG, EXPORT_INFO, PolicySettings
from models.loading import ModelLoadError, resolve_model_path
from models.merge import PEFT_PREFIX, lora_linears, merged_weight
from models.policy import Policy, make_policy
from models.tokenizer_cache import load_auto_processor, load_tokenizer

ADAPTER_WEIGHTS = "adapter_model.safetensors"
MAX_LISTED = 3  # mismatching modules quoted in an error


class BaseModelMismatch(ModelLoadError):
    """The adapter (or checkpoint) was trained on a different base model than the one given."""


# --------------------------------------------------------------------------------------------
# Comparing base models
# --------------------------------------------------------------------------------------------


def read_config(name: str) -> Any | None:
    """The model's transformers config, or None when it is not available offline."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolve_model_path(name), local_files_only=True)
    except (OSError, ValueError, ModelLoadError):
        return None


def architecture(config: Any) -> dict[str, Any]:
    """The config fields two models must share for one's adapter to run on the other."""
    text = getattr(config, "text_config", config)
    vision = getattr(config, "vision_config", None)
    return {
        "architectures": list(getattr(config, "architectures", None) or []),
        "hidden_size": text.hidden_size,
        "vocab_size": text.vocab_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": getattr(text, "num_key_value_heads", None),
        "intermediate_size": getattr(text, "intermediate_size", None),
        "vision_hidden_size": getattr(vision, "hidden_size", None),
    }


def check_same_base(expected: str, given: str) -> None:
    """BaseModelMismatch when `given` differs in architecture from `expected`.

    Models whose configs cannot be read offline are not compared here (the adapter shape check
    at load time still applies).
    """
    expected_config, given_config = read_config(expected), read_config(given)
    if expected_config is None or given_config is None:
        return
    want, got = architecture(expected_config), architecture(given_config)
    differences = [f"{k}: {want[k]} vs {got[k]}" for k in want if want[k] != got[k]]
    if differences:
        raise BaseModelMismatch(
            f"the checkpoint was trained on base model {expected}, but --model {given} is a "
            f"different model ({'; '.join(differences)})"
        )


# --------------------------------------------------------------------------------------------
# Loading an adapter onto its base
# --------------------------------------------------------------------------------------------


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """adapter_config.json, checked to describe a plain LoRA adapter this code can load."""
    config_file = adapter_dir / ADAPTER_CONFIG
    if not config_file.is_file() or not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(
            f"{adapter_dir}: not a peft adapter directory ({ADAPTER_CONFIG} and "
            f"{ADAPTER_WEIGHTS} expected)"
        )
    config = json.loads(config_file.read_text())
    if config.get("peft_type") != "LORA":
        raise ModelLoadError(f"{config_file}: peft_type {config.get('peft_type')!r} is not LORA")
    if config.get("modules_to_save") or config.get("use_dora"):
        raise ModelLoadError(f"{config_file}: modules_to_save and DoRA are not supported")
    return config


def adapter_shapes(adapter_dir: Path) -> dict[str, dict[str, tuple[int, ...]]]:
    """{module name: {"lora_A": shape, "lora_B": shape}} as stored in the adapter file.

    Module names are transformers' in-memory names (peft's `base_model.model.` dropped).
    """
    from safetensors import safe_open

    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    with safe_open(str(adapter_dir / ADAPTER_WEIGHTS), "pt") as f:
        for key in f.keys():  # noqa: SIM118  (safe_open handles are not iterable)
            module, _, factor = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
            factor = "lora_" + factor.split(".")[0]
            if module and factor in ("lora_A", "lora_B"):
                shapes.setdefault(module, {})[factor] = tuple(f.get_slice(key).get_shape())
    return shapes


def adapter_mismatches(model: torch.nn.Module, adapter_dir: Path) -> list[str]:
    """Why the adapter's factors cannot sit on `model`'s linears (empty list: they fit)."""
    problems: list[str] = []
    for module_name, factors in adapter_shapes(adapter_dir).items():
        try:
            layer = model.get_submodule(module_name)
        except AttributeError:
            problems.append(f"{module_name}: no such module in the model")
            continue
        if not isinstance(layer, torch.nn.Linear):
            problems.append(f"{module_name}: is a {type(layer).__name__}, not a Linear")
            continue
        a, b = factors.get("lora_A"), factors.get("lora_B")
        if a is not None and a[1] != layer.in_features:
            problems.append(f"{module_name}: adapter in_features {a[1]}, model {layer.in_features}")
        if b is not None and b[0] != layer.out_features:
            problems.append(
                f"{module_name}: adapter out_features {b[0]}, model {layer.out_features}"
            )
    return problems


def attach_adapter(policy: Policy, adapter_dir: Path) -> None:
    """Put the saved LoRA adapter on the policy's (plain) model, for inference."""
    from peft import PeftModel

    config = read_adapter_config(adapter_dir)
    trained_on = config.get("base_model_name_or_path") or "unknown"
    problems = adapter_mismatches(policy.model, adapter_dir)
    if problems:
        raise BaseModelMismatch(
            f"adapter {adapter_dir} (trained on {trained_on}) does not fit model {policy.path}: "
            + "; ".join(problems[:MAX_LISTED])
            + (f"; and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else "")
        )
    try:
        policy.model = PeftModel.from_pretrained(policy.model, str(adapter_dir))
    except (RuntimeError, ValueError, KeyError) as e:  # whatever the shape check did not catch
        raise BaseModelMismatch(
            f"adapter {adapter_dir} (trained on {trained_on}) does not load onto model "
            f"{policy.path}: {str(e).splitlines()[0]}"
        ) from e
    policy.model.eval()


def load_adapter_weights(model: Any, adapter_dir: Path) -> None:
    """Copy a saved adapter's weights into the same-shaped adapter of `model` (resume)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    where = adapter_dir.parent
    adapter = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    try:
        result = set_peft_model_state_dict(model, adapter)
    except RuntimeError as e:  # shape mismatch: the checkpoint was trained on another model
        raise RuntimeError(
            f"{where}: the adapter does not fit this model (was it trained "
            f"from another base model?): {str(e)[:500]}"
        ) from e
    if getattr(result, "unexpected_keys", None):
        raise RuntimeError(
            f"{where}: adapter has keys this model lacks: {result.unexpected_keys[:5]}"
        )


def load_policy(
    model: str, adapter_dir: Path | None, settings: PolicySettings, device: torch.device
) -> Policy:
    """The model `model` (settings.lora_r ignored), with the saved adapter on it when given."""
    policy = make_policy(dataclasses.replace(settings, model=model, lora_r=0), device)
    if adapter_dir is not None:
        attach_adapter(policy, adapter_dir)
    return policy


def stored_dtype(model: str) -> str | None:
    """The dtype the checkpoint's weights are stored in ("bfloat16", ...), if recorded."""
    config = read_config(model)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return None if dtype is None else str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def unwrap_merged(policy: Policy) -> torch.nn.Module:
    """The plain transformers model holding W + s * B @ A; the adapter wrappers are gone.

    One adapted linear at a time, W' is computed (models/merge.py) and written over W, so the
    peak memory is the model plus one matrix, not two models.
    """
    model = policy.model
    with torch.no_grad():
        for layer in lora_linears(model).values():
            layer.get_base_layer().weight.copy_(merged_weight(layer))
    plain = model.unload() if hasattr(model, "unload") else model  # drops A, B; keeps W'
    policy.model = plain
    return plain


def save_processor(policy: Policy, out: Path) -> None:
    """The base model's processor as shipped (right padding), with the policy's pixel bounds;
    for a text-only model its tokenizer (and chat template) as shipped."""
    if not policy.has_vision:
        load_tokenizer(policy.path).save_pretrained(out)
        return
    processor = load_auto_processor(policy.path)
    size = dict(processor.image_processor.size)
    size["shortest_edge"], size["longest_edge"] = policy.min_pixels, policy.max_pixels
    processor.image_processor.size = size
    processor.save_pretrained(out)


def check_output_dir(out: Path, overwrite: bool) -> None:
    """FileExistsError unless `out` is absent, an empty directory, or may be replaced."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: directory is not empty (pass --overwrite to replace it)")


def prepare_output(out: Path, overwrite: bool) -> Path:
    """A fresh temporary sibling of `out`, after checking `out` may be (re)placed."""
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))


def export_merged(
    policy: Policy,
    out: Path,
    info: dict[str, Any],
    dtype: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the merged model to `out` (module docstring); returns `out`.

    dtype: the stored weights' dtype ("bfloat16", "float32"); None keeps the policy's.
    The directory appears complete or not at all: it is written beside `out` and renamed.
    """
    out = Path(out)
    tmp = prepare_output(out, overwrite)
    try:
        plain = unwrap_merged(policy)
        if dtype is not None:
            plain.to(getattr(torch, dtype))
        plain.save_pretrained(tmp)
        save_processor(policy, tmp)
        record = dict(info)
        if policy.has_vision:
            record |= {"min_pixels": policy.min_pixels, "max_pixels": policy.max_pixels}
        (tmp / EXPORT_INFO).write_text(json.dumps(record, indent=1, ensure_ascii=False))
        tmp.chmod(0o755)  # mkdtemp makes it private
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
