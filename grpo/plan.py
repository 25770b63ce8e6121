"""A memory plan before the run: per-GPU bytes of every part of a GRPO step, from config.json.

    python -m grpo.plan --model Qwen2.5-VL-7B-Instruct/ --gpus 8 --gpu-memory 80 --fsdp --full

It reads only the checkpoint's config.json (a directory, a file, `tiny`, `smollm2`, or a name
under tests/fixtures), never the weights, and imports no model code: every figure below is a
formula over the architecture fields, checked against instantiated models and measured peaks in
tests/test_plan.py and bench/plan_check.py.

Notation: V vocabulary, H hidden, I intermediate, Y layers, h query heads, k KV heads, d head
dim, r LoRA rank; N = prompts_per_step * G rows per rank, L = Lp + T positions per row,
M = N * T scored tokens; E bytes per element of the model dtype (4 float32, 2 bf16), W GPUs,
S = W with --fsdp (the shard divisor), 1 without.

Per GPU (peak = persistent + the largest of the loading, sampling and training phases):
- weights        P E / S; with --fsdp plus the gathered root (embeddings, head) and two
                 gathered blocks (the one computing, the one prefetched)
- LoRA           sum over targeted Linear(i, o) of r (i + o), float32 (peft keeps adapters in
                 float32 beside a bf16 base) / S
- gradients      one per trained parameter, its dtype, / S (full fine-tuning trains the
                 language model; the vision tower only with --lora-vision, as models/full.py)
- optimizer      torch AdamW: exp_avg and exp_avg_sq in the parameter's dtype (our trainer keeps
                 no float32 master copy), / S
- activations    of one micro-batch of g = logprob_group_batch whole groups (all rows at 0 and
                 under --fsdp): prefix-shared (each group's prompt once, models/prefix.py)
                 `saved_per_token_layer` over g Lp prompt tokens + g G T completion tokens
                 attending over Lp + T, their cached prompt keys and values, and the KV cache
                 (`prefix_activation_bytes`); padded under --gradient-checkpointing or
                 --packing: over g G rows of L, with checkpointing E H g G L Y (each block's
                 input) + one block recomputed. The reference pass (no grad) keeps none.
- log-prob chunk the lean completion-only pass over a micro-batch's M = g G T tokens: at most
                 C = min(chunk_tokens, M) rows of float32
                 [C, V] logits alive, two in the forward (logits and exp for the entropy), one
                 (+ its E-byte cast) in the backward; plus the [M, H] hidden states it keeps
- reference      LoRA: the adapter switched off, no bytes; full fine-tuning at beta > 0 a frozen
                 copy P E / S
- sampler        vLLM: its own weight copy P E / tp plus its KV cache (CPU: the fixed 1 GiB our
                 sampler asks for; GPU: gpu_memory_utilization * GPU memory for the whole engine);
                 transformers (the sampling phase): the KV cache 2 Y N k d L E of all N rows,
                 one decode step's [N, V] logits, scores, exp and float64 CDF, and for LoRA the
                 merged W + s B A of every adapted weight (models/policy.py merged_for_sampling)
- loading        CPU: the checkpoint's mapped pages P x (its stored bytes) beside the model
                 while they are converted to another dtype (none when stored as loaded)
- baseline       CPU: the process after importing torch, transformers and peft (measured) and a
                 tokenizer; GPU: a CUDA context

On the CPU the figures are tensors alive at once; the process's RSS follows them under
--cpu-lean-heap (glibc's mmap threshold fixed, grpo/host_heap.py). Under glibc's default
growing threshold freed activations stay resident in its arenas and the peak RSS runs ~20-25%
over: the price of the default's ~25% shorter steps.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
NAMED_CONFIGS = {
    "tiny": ROOT / "configs" / "models" / "tiny.config.json",
    "smollm2": ROOT / "configs" / "models" / "smollm2.config.json",
}
FIXTURES = ROOT / "tests" / "fixtures"
GIB = 2**30
MIB = 2**20
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Measured on the 2-core CPU machine (torch 2.13.0+cpu, transformers 5.19, peft 0.21.2): RSS of
# `python -c "import torch, transformers, peft, models, grpo.trainer"` is 484 MiB, and the
# Qwen2.5 tokenizer (151,936 entries) adds 129 MiB: ~890 bytes per vocabulary entry.
CPU_BASELINE_BYTES = 484 * MIB
TOKENIZER_BYTES_PER_ENTRY = 890
# A CUDA context plus the NCCL and allocator reserve one process holds before any tensor
# (a typical figure for recent drivers; not measured on this CPU-only machine).
CUDA_CONTEXT_BYTES = 1 * GIB
VLLM_CPU_KV_BYTES = 1 * GIB  # models/vllm_sampler.py: kv_cache_memory_bytes on CPU
LM_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class PlanError(ValueError):
    """A config or an option the plan cannot use; the message names the field or flag."""


# --------------------------------------------------------------------------------------------
# The architecture, from config.json
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VisionTower:
    """Qwen2.5-VL's vision transformer (patch embedding, blocks, patch merger)."""

    hidden: int
    intermediate: int
    depth: int
    heads: int
    out_hidden: int
    patch: int
    temporal_patch: int
    channels: int
    merge: int


@dataclass(frozen=True)
class Architecture:
    """The fields of a decoder-only LM (Llama, Qwen2, Qwen2.5-VL's language model)."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    qkv_bias: bool  # Qwen2: biases on q, k, v
    o_bias: bool  # Llama's attention_bias puts one on o_proj too
    mlp_bias: bool
    tied: bool
    vision: VisionTower | None = None
    stored_bytes: int = 4  # bytes per element in the checkpoint (config.json's dtype)


def resolve_config(model: str) -> Path:
    """The config.json a --model value names."""
    if model in NAMED_CONFIGS:
        return NAMED_CONFIGS[model]
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
    elif not path.exists() and (FIXTURES / f"{model}.config.json").exists():
        path = FIXTURES / f"{model}.config.json"
    if not path.is_file():
        raise PlanError(f"--model: no config.json at {path}")
    return path


def _field(config: dict[str, Any], name: str, where: str) -> Any:
    if name not in config:
        raise PlanError(f"{where}: field {name!r} is missing")
    return config[name]


def vision_tower(vision: dict[str, Any]) -> VisionTower:
    where = "config.json vision_config"
    return VisionTower(
        hidden=_field(vision, "hidden_size", where),
        intermediate=_field(vision, "intermediate_size", where),
        depth=_field(vision, "depth", where),
        heads=_field(vision, "num_heads", where),
        out_hidden=_field(vision, "out_hidden_size", where),
        patch=vision.get("patch_size", 14),
        temporal_patch=vision.get("temporal_patch_size", 2),
        channels=vision.get("in_channels", vision.get("in_chans", 3)),
        merge=vision.get("spatial_merge_size", 2),
    )


def architecture(config: dict[str, Any]) -> Architecture:
    """The Architecture of a config.json dict (flat, or transformers 5's nested text_config)."""
    text = {**config, **config.get("text_config", {})}
    where = "config.json"
    model_type = str(config.get("model_type", ""))
    if model_type not in ("llama", "qwen2", "qwen2_5_vl", "mistral", "qwen3"):
        raise PlanError(f"{where}: model_type {model_type!r} is not one the plan knows")
    hidden = _field(text, "hidden_size", where)
    heads = _field(text, "num_attention_heads", where)
    is_qwen2 = model_type in ("qwen2", "qwen2_5_vl")
    attention_bias = bool(text.get("attention_bias", False))
    tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    return Architecture(
        vocab=_field(text, "vocab_size", where),
        hidden=hidden,
        intermediate=_field(text, "intermediate_size", where),
        layers=_field(text, "num_hidden_layers", where),
        heads=heads,
        kv_heads=text.get("num_key_value_heads") or heads,
        head_dim=text.get("head_dim") or hidden // heads,
        qkv_bias=is_qwen2 or attention_bias,
        o_bias=attention_bias,
        mlp_bias=bool(text.get("mlp_bias", False)),
        tied=bool(tied),
        stored_bytes=stored_bytes(config),
        vision=vision_tower(config["vision_config"]) if "vision_config" in config else None,
    )


def stored_bytes(config: dict[str, Any]) -> int:
    """Bytes per element of the checkpoint's tensors: config.json's dtype (transformers 5) or
    torch_dtype; float32 when neither is given."""
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    if name not in DTYPE_BYTES:
        raise PlanError(f"config.json: dtype {name!r} is not one of {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]


def load_architecture(model: str) -> Architecture:
    path = resolve_config(model)
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise PlanError(f"--model: {path} is not JSON ({error})") from error
    return architecture(config)


# --------------------------------------------------------------------------------------------
# Parameter counts
# --------------------------------------------------------------------------------------------


def linear(i: int, o: int, bias: bool) -> int:
    return i * o + (o if bias else 0)


def lm_linears(a: Architecture) -> dict[str, tuple[int, int]]:
    """(in, out) of each projection of one decoder layer, by module name."""
    q, kv = a.heads * a.head_dim, a.kv_heads * a.head_dim
    return {
        "q_proj": (a.hidden, q),
        "k_proj": (a.hidden, kv),
        "v_proj": (a.hidden, kv),
        "o_proj": (q, a.hidden),
        "gate_proj": (a.hidden, a.intermediate),
        "up_proj": (a.hidden, a.intermediate),
        "down_proj": (a.intermediate, a.hidden),
    }


def layer_parameters(a: Architecture) -> int:
    """One decoder layer: the seven projections (with their biases) and two RMSNorm weights."""
    shapes = lm_linears(a)
    biased = {"q_proj": a.qkv_bias, "k_proj": a.qkv_bias, "v_proj": a.qkv_bias, "o_proj": a.o_bias}
    total = sum(linear(i, o, biased.get(n, a.mlp_bias)) for n, (i, o) in shapes.items())
    return total + 2 * a.hidden


def vision_linears(v: VisionTower) -> dict[str, tuple[int, int]]:
    """(in, out) of each projection of one vision block (all with biases)."""
    return {
        "qkv": (v.hidden, 3 * v.hidden),
        "proj": (v.hidden, v.hidden),
        "gate_proj": (v.hidden, v.intermediate),
        "up_proj": (v.hidden, v.intermediate),
        "down_proj": (v.intermediate, v.hidden),
    }


def vision_parameters(v: VisionTower) -> int:
    """Conv3d patch embedding (no bias) + blocks (two RMSNorms, biased projections) + merger
    (RMSNorm, Linear(H m^2, H m^2), GELU, Linear(H m^2, out))."""
    patch = v.channels * v.temporal_patch * v.patch * v.patch * v.hidden
    block = sum(linear(i, o, True) for i, o in vision_linears(v).values()) + 2 * v.hidden
    merged = v.hidden * v.merge * v.merge
    merger = v.hidden + linear(merged, merged, True) + linear(merged, v.out_hidden, True)
    return patch + v.depth * block + merger


def parameter_count(a: Architecture) -> int:
    """Every parameter: embeddings, the untied head, layers, final norm, vision tower."""
    embeddings = a.vocab * a.hidden * (1 if a.tied else 2)
    vision = vision_parameters(a.vision) if a.vision else 0
    return embeddings + a.layers * layer_parameters(a) + a.hidden + vision


def trained_count(a: Architecture, full: bool, lora_r: int, vision: bool = False) -> int:
    """Trained parameters: full fine-tuning trains the language model (embeddings, blocks, final
    norm, head; models/full.py) and the vision tower only with `vision`; LoRA its adapters."""
    if not full:
        return lora_count(a, lora_r, vision)
    tower = vision_parameters(a.vision) if a.vision and not vision else 0
    return parameter_count(a) - tower


def lora_count(a: Architecture, r: int, vision: bool = False) -> int:
    """Adapter parameters models/loading.add_lora creates: r (i + o) per targeted Linear, on
    every language-model projection, and with `vision` every vision block's too."""
    per_layer = sum(r * (i + o) for i, o in lm_linears(a).values())
    total = a.layers * per_layer
    if vision and a.vision:
        total += a.vision.depth * sum(r * (i + o) for i, o in vision_linears(a.vision).values())
    return total


# --------------------------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------------------------


def attention_saved(a: Architecture, length: int, e: int, attention: str) -> int:
    """Bytes per token the attention of one layer keeps for backward.

    sdpa: q and k, v repeated to h heads (transformers repeats them when there is a padding
    mask), the output (the o_proj input is a view of it) and a float32 log-sum-exp per head,
    plus the additive mask [L, L] in the model dtype the kernel keeps per layer (E L bytes a
    token). flash_attention_2: k and v at k heads, no mask. eager: q, k, v, output and
    the softmax probabilities [h, L, L] (E h L a token)."""
    q, kv = a.heads * a.head_dim, a.kv_heads * a.head_dim
    if attention == "flash_attention_2":
        return e * (2 * q + 2 * kv) + 4 * a.heads
    if attention == "eager":
        return e * 4 * q + e * a.heads * length
    return e * 4 * q + 4 * a.heads + e * length


def saved_per_token_layer(
    a: Architecture,
    length: int,
    e: int,
    lora_r: int,
    attention: str = "sdpa",
    lora_cast: bool | None = None,
) -> int:
    """Bytes one decoder layer saves for backward per token (length L: for the L-dependent
    attention terms). Derived from the autograd graph of transformers' Llama/Qwen2 layer, and
    checked against torch's saved-tensor hooks in tests/test_plan.py.

    Both RMSNorms keep their float32 input and rsqrt: 2 (4H + 4). The MLP keeps gate, silu(gate)
    and up (E I each). Then:
    - LoRA (frozen base: a base Linear keeps nothing): each adapter keeps its input in float32
      (peft casts it to the adapter's dtype) and its r-wide A output: with E = 4 the input is
      the tensor already kept (q, k, v share one, gate and up one): 2 E H + E I + 7 r 4;
      with E < 4 each adapter makes its own copy: 4 (3H + q + 2H + I) + 7 r 4 (`lora_cast`;
      not under FSDP's bf16 mixed precision, which computes the adapters in bf16 too).
    - full fine-tuning: each Linear keeps its input (q, k, v share the normed hidden, o_proj's
      is the attention output), each norm its normalised input for the weight's gradient:
      2 E H + 2 E H + E I.
    """
    norms = 2 * (4 * a.hidden + 4)
    mlp = 3 * e * a.intermediate
    attention_bytes = attention_saved(a, length, e, attention)
    if lora_r <= 0:
        inputs = 4 * e * a.hidden + e * a.intermediate
    elif not (e != 4 if lora_cast is None else lora_cast):
        inputs = 2 * e * a.hidden + e * a.intermediate + 7 * lora_r * 4
    else:
        inputs = 4 * (5 * a.hidden + a.heads * a.head_dim + a.intermediate) + 7 * lora_r * 4
    return norms + mlp + attention_bytes + inputs


def activation_bytes(
    a: Architecture,
    rows: int,
    length: int,
    e: int,
    lora_r: int,
    checkpointing: bool,
    attention: str,
    lora_cast: bool | None = None,
) -> int:
    """Saved activations of the policy's forward over rows x length tokens, plus the model's
    output [rows, L, H] and the final norm's float32 input. With gradient checkpointing each
    block keeps only its input (E H a token) and one block is recomputed at a time in backward.
    """
    tokens = rows * length
    layer = saved_per_token_layer(a, length, e, lora_r, attention, lora_cast) * tokens
    ends = (e + 4) * a.hidden * tokens
    if checkpointing:
        return a.layers * e * a.hidden * tokens + layer + ends
    return a.layers * layer + ends


def prefix_activation_bytes(
    a: Architecture,
    groups: int,
    group_size: int,
    prompt: int,
    completion: int,
    e: int,
    lora_r: int,
    attention: str,
    lora_cast: bool | None = None,
) -> int:
    """Saved activations of one prefix-shared pass (models/prefix.py) over `groups` whole
    groups of G rows: the prefill of the groups' prompts (groups x Lp tokens, attending over
    Lp) and the continuation of the N = groups G rows' completions (N x T tokens, attending
    over Lp + T), each with the model output and final norm input as `activation_bytes`.
    A continuation row's attention also keeps the keys and values of its Lp cached prompt
    positions repeated to h heads (2 E h d per position and layer), and the KV cache handed
    to the rows, [N, k, Lp + T, d] keys and values per layer, is alive until the pass ends."""
    rows = groups * group_size
    prefill = activation_bytes(a, groups, prompt, e, lora_r, False, attention, lora_cast)
    per_token = saved_per_token_layer(a, prompt + completion, e, lora_r, attention, lora_cast)
    tokens = rows * completion
    continuation = a.layers * per_token * tokens + (e + 4) * a.hidden * tokens
    cached_keys = a.layers * rows * prompt * 2 * e * a.heads * a.head_dim
    cache = kv_cache_bytes(a, rows, prompt + completion, e)
    return prefill + continuation + cached_keys + cache


def kv_cache_bytes(a: Architecture, rows: int, length: int, e: int) -> int:
    """Keys and values of every layer: 2 Y rows k d L E."""
    return 2 * a.layers * rows * a.kv_heads * a.head_dim * length * e


def logprob_bytes(a: Architecture, scored: int, chunk_tokens: int, e: int) -> int:
    """The chunked completion-only log-prob pass (models/logprobs.py): the [M, H] hidden states
    it gathers, and its largest moment: two float32 [C, V] tensors in the forward with entropy
    (logits, exp), or one in the backward plus its cast to an E-byte weight dtype."""
    chunk = min(chunk_tokens, scored)
    forward = 2 * 4 * chunk * a.vocab
    backward = (4 + (e if e != 4 else 0)) * chunk * a.vocab
    return e * a.hidden * scored + max(forward, backward)


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """What one rank runs, and where. gpus 0 means the CPU."""

    gpus: int = 1
    gpu_memory_gib: float = 80.0
    fsdp: bool = False
    fsdp_cpu_offload: bool = False
    full: bool = False
    lora_r: int = 8
    lora_vision: bool = False
    num_generations: int = 8
    prompts_per_step: int = 2
    max_prompt_length: int = 512
    max_completion_length: int = 1024
    gradient_checkpointing: bool = False
    dtype: str | None = None  # None: bf16 on GPU, float32 on CPU (as the trainer does)
    attention: str = "sdpa"
    logprob_chunk_tokens: int = 1024
    logprob_group_batch: int = 1  # whole groups per log-prob micro-batch (0: all rows)
    packing: bool = False
    prefix_sharing: bool = True
    merge_for_sampling: bool = True
    beta: float = 0.04
    sampler: str = "vllm"
    vllm_gpu_memory_utilization: float = 0.3
    vllm_tensor_parallel_size: int = 1

    @property
    def on_cpu(self) -> bool:
        return self.gpus == 0

    @property
    def element_bytes(self) -> int:
        """Bytes per stored weight: --dtype (bf16 on GPU, float32 on CPU); full fine-tuning
        keeps float32 weights on every device (grpo/config.py)."""
        name = self.dtype or ("float32" if self.on_cpu or self.full else "bfloat16")
        if name not in DTYPE_BYTES:
            raise PlanError(f"--dtype must be one of {sorted(DTYPE_BYTES)}, got {name!r}")
        return DTYPE_BYTES[name]

    @property
    def mixed_precision(self) -> bool:
        """FSDP on GPUs computes in bf16 whatever the stored dtype (models/sharding.py)."""
        return self.fsdp and not self.on_cpu

    @property
    def compute_bytes(self) -> int:
        """Bytes per activation element: bf16 under FSDP mixed precision, else the weights'."""
        return 2 if self.mixed_precision else self.element_bytes

    @property
    def lora_cast(self) -> bool:
        """peft casts each adapter's input to the float32 adapter (not under mixed precision)."""
        return self.compute_bytes != 4 and not self.mixed_precision

    @property
    def shards(self) -> int:
        return max(self.gpus, 1) if self.fsdp else 1

    @property
    def prefix_shared(self) -> bool:
        """The trainer's layout (models/policy.py prefix_shared): each group's prompt once,
        unless --packing or --gradient-checkpointing keep the padded pass."""
        return self.prefix_sharing and not self.packing and not self.gradient_checkpointing

    @property
    def micro_groups(self) -> int:
        """Groups per log-prob micro-batch (grpo/trainer.py logprob_groups): all of them at
        logprob_group_batch 0 or under --fsdp (one pass per trajectory)."""
        if self.fsdp or self.logprob_group_batch <= 0:
            return self.prompts_per_step
        return min(self.logprob_group_batch, self.prompts_per_step)


@dataclass
class Plan:
    """Per-GPU (or, on the CPU, per-process) bytes by part, split into when they are alive."""

    workload: Workload
    parameters: int
    trainable: int
    persistent: dict[str, int] = field(default_factory=dict)
    sampling: dict[str, int] = field(default_factory=dict)
    training: dict[str, int] = field(default_factory=dict)
    loading: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        phases = (self.loading, self.sampling, self.training)
        phase = max(sum(parts.values()) for parts in phases)
        return sum(self.persistent.values()) + phase

    @property
    def capacity(self) -> int | None:
        return None if self.workload.on_cpu else int(self.workload.gpu_memory_gib * GIB)


def check(w: Workload) -> None:
    """One-line errors for settings the plan (and the trainer) cannot take."""
    if w.gpus < 0:
        raise PlanError(f"--gpus must be >= 0, got {w.gpus}")
    if w.fsdp and w.on_cpu:
        raise PlanError("--fsdp plans GPUs; give --gpus >= 1")
    if w.vllm_tensor_parallel_size < 1 or (w.gpus and w.gpus % w.vllm_tensor_parallel_size):
        raise PlanError("--vllm-tensor-parallel-size must divide --gpus")
    if w.on_cpu and w.vllm_tensor_parallel_size > 1:
        raise PlanError("--vllm-tensor-parallel-size above 1 needs GPUs")
    if w.sampler not in ("vllm", "hf"):
        raise PlanError(f"--sampler must be 'vllm' or 'hf', got {w.sampler!r}")
    if w.attention not in ("sdpa", "eager", "flash_attention_2"):
        raise PlanError(f"--attention must be sdpa, eager or flash_attention_2: {w.attention!r}")
    if w.full and w.dtype in ("bfloat16", "float16"):
        raise PlanError(f"--dtype {w.dtype} with --full: full fine-tuning keeps float32 weights")
    if not w.full and w.lora_r <= 0:
        raise PlanError("--lora-r must be > 0 (or pass --full / --lora-r 0 for full fine-tuning)")


def block_parameters(a: Architecture) -> int:
    """The largest unit FSDP gathers at once: a decoder layer or a vision block."""
    vision = a.vision
    if vision is None:
        return layer_parameters(a)
    block = sum(linear(i, o, True) for i, o in vision_linears(vision).values())
    return max(layer_parameters(a), block + 2 * vision.hidden)


def persistent_parts(a: Architecture, w: Workload, trainable: int) -> dict[str, int]:
    """What lives for the whole run: weights, adapters, optimizer state, reference, engine."""
    e, s = w.element_bytes, w.shards
    total = parameter_count(a)
    parts = {"weights": total * e // s}
    if w.fsdp:
        root = a.vocab * a.hidden * (1 if a.tied else 2) + a.hidden
        gathered = (root + 2 * block_parameters(a)) * w.compute_bytes
        parts["fsdp gathered (root + 2 blocks)"] = gathered
    train_bytes = e if w.full else 4  # adapters are float32 beside a bf16 base
    if not w.full:
        parts["lora"] = trainable * 4 // s
    optimizer = 2 * trainable * train_bytes // s
    parts["optimizer (AdamW 2 moments)"] = optimizer
    if w.full and w.beta > 0:
        parts["reference (frozen copy)"] = total * e // s
    if w.fsdp_cpu_offload:  # FSDP2's CPUOffloadPolicy: the shards and their AdamW live on the host
        for name in ("weights", "lora", "optimizer (AdamW 2 moments)", "reference (frozen copy)"):
            if name in parts:
                parts[name] = 0
    parts.update(sampler_parts(a, w, total))
    parts["baseline"] = (
        CPU_BASELINE_BYTES + TOKENIZER_BYTES_PER_ENTRY * a.vocab if w.on_cpu else CUDA_CONTEXT_BYTES
    )
    return parts


def sampler_parts(a: Architecture, w: Workload, total: int) -> dict[str, int]:
    """The colocated vLLM engine (weights + KV cache); nothing persistent for transformers."""
    if w.sampler != "vllm":
        return {}
    if w.on_cpu:
        return {"vllm weights": total * w.element_bytes, "vllm kv cache": VLLM_CPU_KV_BYTES}
    engine = int(w.vllm_gpu_memory_utilization * w.gpu_memory_gib * GIB)
    weights = total * w.element_bytes // w.vllm_tensor_parallel_size
    return {"vllm weights": weights, "vllm kv cache + workspace": max(engine - weights, 0)}


def phase_parts(a: Architecture, w: Workload, trainable: int) -> tuple[dict, dict]:
    """(sampling, training): the transient parts of the two phases of a step."""
    e = w.compute_bytes
    sampling = sampling_parts(a, w) if w.sampler == "hf" else {}
    groups = w.micro_groups  # per log-prob micro-batch and backward
    rows, lp, t = groups * w.num_generations, w.max_prompt_length, w.max_completion_length
    lora_r = 0 if w.full else w.lora_r
    if w.prefix_shared:
        saved = prefix_activation_bytes(
            a, groups, w.num_generations, lp, t, e, lora_r, w.attention, w.lora_cast
        )
    else:  # the padded pass (checkpointing, packing: an upper bound for the packed one)
        saved = activation_bytes(
            a, rows, lp + t, e, lora_r, w.gradient_checkpointing, w.attention, w.lora_cast
        )
    training = {
        "activations": saved,
        "log-prob chunks": logprob_bytes(a, rows * t, w.logprob_chunk_tokens, e),
        "gradients": 0
        if w.fsdp_cpu_offload
        else trainable * (w.element_bytes if w.full else 4) // w.shards,
    }
    return sampling, training


def sampling_parts(a: Architecture, w: Workload) -> dict[str, int]:
    """The transformers sampler (models/generation.py) over all N rows of the step: the KV
    cache of Lp + T positions, one decode step's [N, V] logits (E), float32 scores (a copy
    when E < 4), their exp and its float64 cumulative sum; and, for LoRA with
    merge_for_sampling, W + s B A of every adapted Linear(i, o) swapped in beside W (E i o
    each) plus the float32 B A of the largest one being formed."""
    e, rows = w.compute_bytes, w.prompts_per_step * w.num_generations
    length = w.max_prompt_length + w.max_completion_length
    parts = {
        "hf kv cache": kv_cache_bytes(a, rows, length, e),
        "hf decode scores": rows * a.vocab * (e + (4 if e != 4 else 0) + 4 + 8),
    }
    if not w.full and w.merge_for_sampling:
        shapes = [*lm_linears(a).values()]
        count = a.layers * sum(i * o for i, o in shapes)
        if w.lora_vision and a.vision:
            shapes += [*vision_linears(a.vision).values()]
            count += a.vision.depth * sum(i * o for i, o in vision_linears(a.vision).values())
        largest = max(i * o for i, o in shapes)
        parts["merged lora weights"] = count * w.element_bytes // w.shards + 4 * largest
    return parts


def loading_parts(a: Architecture, w: Workload) -> dict[str, int]:
    """Loading (build_trainer) on the CPU: from_pretrained reads the checkpoint through a
    memory map. Stored in the dtype it is loaded in, the model's tensors are those mapped
    pages (the weights part; measured: SmolLM2's float32 build peaks below baseline +
    weights, the pages not yet all touched). Stored in another dtype, the pages (P bytes of
    the stored dtype) are resident beside the converted tensors while they are copied. On a
    GPU the host holds them, not the device."""
    if not w.on_cpu or a.stored_bytes == w.element_bytes:
        return {}
    return {"checkpoint pages (while loading)": parameter_count(a) * a.stored_bytes}


def host_bytes(a: Architecture, w: Workload) -> int:
    """What --fsdp-cpu-offload moves to the host, per GPU: the weight, moment, gradient and
    reference shards."""
    trainable = trained_count(a, w.full, w.lora_r, w.lora_vision)
    kept = persistent_parts(a, replace(w, fsdp_cpu_offload=False), trainable)
    offloaded = ("weights", "lora", "optimizer (AdamW 2 moments)", "reference (frozen copy)")
    gradients = trainable * (w.element_bytes if w.full else 4) // w.shards
    return sum(kept.get(name, 0) for name in offloaded) + gradients


def activation_note(a: Architecture, w: Workload) -> str:
    """The saved activations of one micro-batch in each layout the trainer can take."""
    groups, g = w.micro_groups, w.num_generations
    lp, t, e, r = w.max_prompt_length, w.max_completion_length, w.compute_bytes, w.lora_r
    r = 0 if w.full else r
    shared = prefix_activation_bytes(a, groups, g, lp, t, e, r, w.attention, w.lora_cast)
    padded = [
        activation_bytes(a, groups * g, lp + t, e, r, gc, w.attention, w.lora_cast)
        for gc in (False, True)
    ]
    return (
        f"activations per micro-batch of {groups} group(s): prefix-shared {gib(shared).strip()}"
        f", padded {gib(padded[0]).strip()}, padded with checkpointing {gib(padded[1]).strip()}"
    )


def make_plan(a: Architecture, w: Workload) -> Plan:
    check(w)
    trainable = trained_count(a, w.full, w.lora_r, w.lora_vision)
    sampling, training = phase_parts(a, w, trainable)
    plan = Plan(w, parameter_count(a), trainable, persistent_parts(a, w, trainable))
    plan.sampling, plan.training = sampling, training
    plan.loading = loading_parts(a, w)
    if w.on_cpu:
        plan.notes.append("CPU: the peak is the process's peak RSS (VmHWM)")
    plan.notes.append(activation_note(a, w))
    if w.fsdp_cpu_offload:
        plan.notes.append(
            f"--fsdp-cpu-offload: host memory per GPU {gib(host_bytes(a, w)).strip()}"
        )
    if plan.persistent.get("vllm kv cache + workspace", 1) == 0:
        plan.notes.append(
            "vLLM's weight copy alone exceeds --vllm-gpu-memory-utilization x --gpu-memory: "
            "raise one or --vllm-tensor-parallel-size"
        )
    return plan


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def gib(n: int) -> str:
    return f"{n / GIB:8.2f} GiB"


def render(plan: Plan, model: str) -> str:
    w = plan.workload
    where = "CPU process" if w.on_cpu else f"per GPU ({w.gpus} GPUs, {w.gpu_memory_gib:g} GiB)"
    mode = "full fine-tuning" if w.full else f"LoRA r={w.lora_r}"
    lines = [
        f"plan for {model}: {plan.parameters:,} parameters, {plan.trainable:,} trained ({mode})"
        f"{', FSDP over ' + str(w.shards) if w.fsdp else ''}; {where}",
        f"rows per rank {w.prompts_per_step} x {w.num_generations}, "
        f"length {w.max_prompt_length} + {w.max_completion_length}, "
        f"{w.element_bytes}-byte weights, {w.compute_bytes}-byte activations",
    ]
    for title, parts in (
        ("persistent", plan.persistent),
        ("sampling", plan.sampling),
        ("training", plan.training),
        ("loading", plan.loading),
    ):
        lines.append(f"  {title}:")
        lines += [f"    {name:32s}{gib(size)}" for name, size in parts.items()]
        if not parts:
            lines.append("    (nothing beyond the persistent parts)")
    lines += [f"  note: {note}" for note in plan.notes]
    lines.append(f"  peak {gib(plan.peak).strip()}" + fit_line(plan))
    return "\n".join(lines)


def fit_line(plan: Plan) -> str:
    if plan.capacity is None:
        return " (predicted peak RSS of the process)"
    verdict = "fits in" if plan.peak <= plan.capacity else "does NOT fit in"
    return f": {verdict} {plan.workload.gpu_memory_gib:g} GiB"


def parse_args(argv: list[str] | None = None) -> tuple[str, Workload, bool]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="checkpoint dir, config.json, tiny, smollm2")
    p.add_argument("--gpus", type=int, default=1, help="GPUs (0: plan a CPU process)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU")
    p.add_argument("--fsdp", action="store_true")
    p.add_argument("--fsdp-cpu-offload", action="store_true")
    p.add_argument("--full", action="store_true", help="full fine-tuning (also --lora-r 0)")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-vision", action="store_true")
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--prompts-per-step", type=int, default=2, help="per rank")
    p.add_argument("--max-prompt-length", type=int, default=512)
    p.add_argument("--max-completion-length", type=int, default=1024)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default=None)
    p.add_argument("--attention", default="sdpa", help="sdpa | eager | flash_attention_2")
    p.add_argument("--logprob-chunk-tokens", type=int, default=1024)
    p.add_argument("--logprob-group-batch", type=int, default=1, help="groups (0: all rows)")
    p.add_argument("--packing", action="store_true")
    p.add_argument("--no-prefix-sharing", action="store_true")
    p.add_argument("--no-merge-for-sampling", action="store_true")
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--sampler", default="vllm", help="vllm | hf")
    p.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.3)
    p.add_argument("--vllm-tensor-parallel-size", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print the parts as JSON")
    args = p.parse_args(argv)
    gpus = 0 if args.device == "cpu" else args.gpus
    workload = Workload(
        gpus=gpus,
        gpu_memory_gib=args.gpu_memory,
        fsdp=args.fsdp,
        fsdp_cpu_offload=args.fsdp_cpu_offload,
        full=args.full or args.lora_r == 0,
        lora_r=args.lora_r,
        lora_vision=args.lora_vision,
        num_generations=args.num_generations,
        prompts_per_step=args.prompts_per_step,
        max_prompt_length=args.max_prompt_length,
        max_completion_length=args.max_completion_length,
        gradient_checkpointing=args.gradient_checkpointing,
        dtype=args.dtype,
        attention=args.attention,
        logprob_chunk_tokens=args.logprob_chunk_tokens,
        logprob_group_batch=args.logprob_group_batch,
        packing=args.packing,
        prefix_sharing=not args.no_prefix_sharing,
        merge_for_sampling=not args.no_merge_for_sampling,
        beta=args.beta,
        sampler=args.sampler,
        vllm_gpu_memory_utilization=args.vllm_gpu_memory_utilization,
        vllm_tensor_parallel_size=args.vllm_tensor_parallel_size,
    )
    return args.model, workload, args.json


def as_json(plan: Plan) -> dict[str, Any]:
    return {
        "parameters": plan.parameters,
        "trainable": plan.trainable,
        "persistent": plan.persistent,
        "sampling": plan.sampling,
        "training": plan.training,
        "loading": plan.loading,
        "peak": plan.peak,
        "fits": None if plan.capacity is None else plan.peak <= plan.capacity,
    }


def main(argv: list[str] | None = None) -> None:
    model, workload, want_json = parse_args(argv)
    try:
        plan = make_plan(load_architecture(model), workload)
    except PlanError as error:
        sys.exit(f"error: {error}")
    print(json.dumps(as_json(plan)) if want_json else render(plan, model))


if __name__ == "__main__":
    main()
