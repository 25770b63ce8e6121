"""Sampling with a vLLM engine colocated in the training process.

Each training process (each torchrun rank) owns one engine with tensor parallelism 1: the
rank's prompts never leave it, and the engine's seed is `seed + rank` so ranks draw different
completions. The engine runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), which is what
lets weight sync hand tensors over by reference (models/weight_sync.py).

What the sampler guarantees, whatever the engine's defaults:
- rows group-major: the n completions of prompt j are rows j*n .. j*n + n - 1;
- a completion ends with its stop token (<|im_end|> / <|endoftext|>) when one was produced;
- vision special tokens are banned (logit -inf via `bad_words`), never emitted;
- sampler log-probs are those of the distribution actually sampled from: temperature,
  top-p/top-k and the ban applied (vLLM's logprobs_mode="processed_logprobs"; its default,
  "raw_logprobs", would report the model's untempered distribution). With temperature 1,
  top_p 1 and top_k 0 they equal the trainer's log-probs up to numerics and the tiny mass of
  the banned tokens; with top-p/top-k they are the renormalised truncated distribution.
  Greedy decoding reports the untempered distribution's log-probs.
- every request carries its own seed drawn from the sampler's generator (seeded seed + rank):
  samples are reproducible, differ across ranks, and leave the trainer's global RNG alone;
- sleep mode frees the engine's accelerator memory while the trainer works (GPU only; on CPU
  vLLM has no sleep mode and the engine simply stays up).

In a process with the engine, torch.distributed is initialised (vLLM creates a group of size
one when the trainer has none) and `close()` destroys it: close the sampler last.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import sys
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import models.cpu_compat as cpu_compat  # first: before anything imports vllm
from grpo.types import PromptInput, Rollout, SamplingSettings
from models.full import changed_weights
from models.merge import lora_linears, merged_lora_weights, merged_state_dict
from models.tokenizer_cache import tokenizer_loads_cached, tokenizers_passed_by_reference
from models.weight_sync import (
    add_adapter,
    push_weights,
    release_input_embedding_gemm,
    remove_adapter,
    reset_caches,
    save_adapter,
    shutdown,
)

log = logging.getLogger(__name__)

SYNC_MODES = ("merged", "adapter")
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # max_lora_rank values vLLM accepts


@dataclass(frozen=True)
class VLLMSettings:
    """Engine knobs. On CPU, gpu_memory_utilization is the fraction of RAM vLLM may reserve."""

    gpu_memory_utilization: float = 0.3
    max_model_len: int = 4096
    sync: str = "merged"  # "merged": push W + s*B@A; "adapter": vLLM LoRA of the peft adapter
    sleep: bool = False  # free engine memory between generation and training (GPU only)
    dtype: str | None = None  # None: the policy's dtype
    seed: int = 0  # the engine of rank r uses seed + r
    enforce_eager: bool | None = None  # None: True on CPU (compiling adds ~60 s), False on GPU
    kv_cache_gib: float | None = None  # None: 1 GiB on CPU, sized by utilization on GPU
    chunked_prefill: bool | None = None  # None: vLLM's default
    max_num_batched_tokens: int | None = None  # tokens per engine step (None: vLLM's default)
    max_images_per_prompt: int = 1
    tensor_parallel_size: int = 1  # k consecutive torchrun ranks share one engine (GPUs)


def _is_distributed() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


def _process_rank() -> int:
    return torch.distributed.get_rank() if _is_distributed() else 0


def engine_index(tensor_parallel_size: int) -> int:
    """Which engine this rank belongs to: ranks k*e .. k*e + k - 1 form engine e (the grouping
    vLLM's external_launcher executor makes of the torchrun world for tensor parallelism)."""
    return _process_rank() // tensor_parallel_size


class TensorParallelGroup:
    """The k ranks serving one tensor-parallel engine, and the exchange of their prompts.

    Every rank of a vLLM tensor-parallel engine runs the same scheduler on the same requests,
    so the k ranks must submit identical batches: each rank's prompts are gathered across its
    group, all k generate the group's batch together, and each keeps its own slice.
    """

    def __init__(self, k: int) -> None:
        dist = torch.distributed
        world = dist.get_world_size()
        if world % k:
            raise ValueError(f"tensor_parallel_size {k} must divide the world size {world}")
        self.k, self.rank = k, dist.get_rank()
        groups = [dist.new_group(list(range(e * k, e * k + k))) for e in range(world // k)]
        self.group = groups[self.rank // k]  # every rank creates every group, in order

    def gather(self, prompts: list[PromptInput]) -> tuple[list[PromptInput], slice]:
        """The group's prompts in rank order, and the slice of them that is this rank's."""
        parts: list[Any] = [None] * self.k
        torch.distributed.all_gather_object(parts, prompts, group=self.group)
        mine = self.rank % self.k
        start = sum(len(part) for part in parts[:mine])
        return [p for part in parts for p in part], slice(start, start + len(prompts))


def _inspect_models_with_cpu_compat() -> None:
    """vLLM inspects model classes in a fresh interpreter (`python -m ...models.registry`),
    where torchvision/torchaudio wheels built for CUDA fail to import next to a CPU torch
    unless models/cpu_compat.py runs first. vLLM keeps that command in a module variable
    meant to be overridden; the preamble is a no-op where the wheels load."""
    from vllm.model_executor.models import registry

    root = str(Path(cpu_compat.__file__).resolve().parent.parent)
    preamble = (
        f"import sys; sys.path.insert(0, {root!r}); import models.cpu_compat, runpy; "
        "runpy.run_module('vllm.model_executor.models.registry', run_name='__main__')"
    )
    registry._SUBPROCESS_COMMAND = [sys.executable, "-c", preamble]


def _lora_rank(model: Any) -> int:
    """Smallest rank vLLM accepts that holds every adapter of `model`."""
    ranks = [max([c.r, *c.rank_pattern.values()]) for c in model.peft_config.values()]
    return next(r for r in VLLM_LORA_RANKS if r >= max(ranks))


def check_cpu_head_size(config: Any) -> None:
    """vLLM's CPU attention kernels exist for some head sizes only (32, 64, 80, ...): fail
    here, naming the model's, instead of at the first generation."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    text = getattr(config, "text_config", config)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim not in supported:
        raise ValueError(
            f"vLLM on CPU supports attention head sizes {supported}; this model's is {head_dim} "
            "(hidden_size / num_attention_heads). Use sampler 'hf' or a model with a supported "
            "head size."
        )


def model_length(config: Any, wanted: int) -> int:
    """`wanted` capped at the model's max_position_embeddings: vLLM refuses a longer context
    (a small text model may be trained for 2048 positions, below the 4096 default)."""
    text = getattr(config, "text_config", config)
    limit = getattr(text, "max_position_embeddings", None)
    return min(wanted, int(limit)) if limit else wanted


def engine_arguments(policy: Any, settings: VLLMSettings) -> dict[str, Any]:
    """Keyword arguments of vllm.LLM for a sampler colocated with `policy`."""
    on_cpu = policy.device.type == "cpu"
    if on_cpu:
        check_cpu_head_size(policy.model.config)
    dtype = settings.dtype or str(next(policy.model.parameters()).dtype).removeprefix("torch.")
    args: dict[str, Any] = {
        "model": policy.path,
        "dtype": dtype,
        "seed": settings.seed + engine_index(settings.tensor_parallel_size),
        "max_model_len": model_length(policy.model.config, settings.max_model_len),
        "gpu_memory_utilization": settings.gpu_memory_utilization,
        "enforce_eager": on_cpu if settings.enforce_eager is None else settings.enforce_eager,
        "tensor_parallel_size": settings.tensor_parallel_size,
        "logprobs_mode": "processed_logprobs",
    }
    if policy.has_vision:
        # no videos ever: at start-up vLLM builds (and profiles) a dummy input of every
        # modality it allows, and a max-length dummy video costs seconds and GBs on CPU
        args["limit_mm_per_prompt"] = {"image": settings.max_images_per_prompt, "video": 0}
        # the images arrive sized by the policy; keep vLLM's processor on the same bounds
        size = {"shortest_edge": policy.min_pixels, "longest_edge": policy.max_pixels}
        args["mm_processor_kwargs"] = {"size": size}
    kv_gib = settings.kv_cache_gib if settings.kv_cache_gib is not None else (1 if on_cpu else None)
    if kv_gib is not None:
        args["kv_cache_memory_bytes"] = int(kv_gib * 2**30)
    if settings.chunked_prefill is not None:
        args["enable_chunked_prefill"] = settings.chunked_prefill
    if settings.max_num_batched_tokens is not None:
        args["max_num_batched_tokens"] = settings.max_num_batched_tokens
    if settings.sync == "adapter":
        args |= {"enable_lora": True, "max_loras": 1, "max_lora_rank": _lora_rank(policy.model)}
    if settings.sleep and not on_cpu:
        args["enable_sleep_mode"] = True
    if settings.tensor_parallel_size > 1 and on_cpu:
        raise ValueError("vLLM tensor parallelism needs GPUs; on a CPU use tensor_parallel_size 1")
    if _is_distributed() and torch.distributed.get_world_size() > 1 and not on_cpu:
        # the engine lives in the torchrun processes, sharing their process group (as TRL's
        # colocate mode): one engine per rank, or with tensor_parallel_size k one engine per
        # k consecutive ranks, each rank holding 1/k of its weights and KV cache
        args["distributed_executor_backend"] = "external_launcher"
    return args


def use_in_process_engine() -> None:
    """The colocated sampler needs vLLM's engine in this process: weight sync hands it tensors
    by reference, which cannot cross into vLLM's engine subprocess."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0":
        raise RuntimeError("the colocated vLLM sampler needs VLLM_ENABLE_V1_MULTIPROCESSING=0")


def create_engine(args: dict[str, Any]) -> Any:
    """vllm.LLM(**args), leaving the process as it found it.

    vLLM's CPU worker replaces torch.set_num_threads with a no-op for the whole process, and
    engine start-up reseeds the global RNGs (torch, numpy, random) with the engine seed; the
    trainer's thread control and random streams are put back afterwards. The engine's own
    tokenizer load goes through models/tokenizer_cache.py: keyed by vLLM's arguments, so the
    first engine of a process parses it and every later engine reuses that parse.
    """
    use_in_process_engine()
    from vllm import LLM

    _inspect_models_with_cpu_compat()
    set_num_threads = torch.set_num_threads
    states = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    try:
        with tokenizers_passed_by_reference(), tokenizer_loads_cached():
            return LLM(**args)
    finally:
        torch.set_num_threads = set_num_threads
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])


def check_sync_mode(sync: str, adapted_modules: list[str]) -> None:
    """Reject a sync mode the policy's adapter cannot use."""
    if sync not in SYNC_MODES:
        raise ValueError(f"VLLMSettings.sync must be one of {SYNC_MODES}, got {sync!r}")
    if sync == "adapter" and not adapted_modules:
        raise ValueError("sync='adapter' needs a LoRA policy; use sync='merged'")
    if sync == "adapter" and any(".visual." in name for name in adapted_modules):
        raise ValueError(
            "vLLM's LoRA applies to the language model only; with LoRA on the vision tower "
            "use sync='merged'"
        )


class VLLMSampler:
    """The Sampler interface (grpo/types.py) on a colocated vLLM engine."""

    def __init__(self, policy: Any, settings: VLLMSettings) -> None:
        use_in_process_engine()
        check_sync_mode(settings.sync, list(lora_linears(policy.model)))
        self.settings = settings
        self.stop_ids = sorted(policy.stop_ids)
        self.can_sleep = settings.sleep and policy.device.type != "cpu"
        if settings.sleep and not self.can_sleep:
            log.warning("vLLM sleep mode is GPU-only; on CPU the engine stays resident")
        args = engine_arguments(policy, settings)  # checks the settings first
        k = settings.tensor_parallel_size
        self.tensor_parallel = TensorParallelGroup(k) if k > 1 else None
        self.llm = create_engine(args)
        release_input_embedding_gemm(self.llm)
        self.banned_words = self._vision_words(policy)
        self.asleep: set[str] = set()  # tags vLLM currently has asleep: "weights", "kv_cache"
        self.adapter: Any = None  # the LoRARequest in use (adapter sync)
        self.adapter_count = 0
        self.adapter_root = Path(tempfile.mkdtemp(prefix="vllm-adapter-"))
        weakref.finalize(self, shutil.rmtree, self.adapter_root, True)
        # per-request seeds come from this stream, so the samples depend on the engine seed
        # (distinct per rank) and never on, or disturb, the trainer's global RNG
        # (one stream per engine: the ranks of a tensor-parallel engine must send equal seeds)
        self.rng = torch.Generator().manual_seed(
            settings.seed + engine_index(settings.tensor_parallel_size)
        )
        if settings.sync == "adapter":
            self.sync_weights(policy)

    def _vision_words(self, policy: Any) -> list[str]:
        """The vision special tokens as strings, checked to be single tokens in the engine's
        tokenizer (vLLM bans a bad word's last token; it must be the special token itself)."""
        words = policy.tokenizer.convert_ids_to_tokens(sorted(policy.vision_ids))
        tokenizer = self.llm.get_tokenizer()
        encoded = [tokenizer.encode(word, add_special_tokens=False) for word in words]
        if encoded != [[i] for i in sorted(policy.vision_ids)]:
            raise RuntimeError(f"engine tokenizer splits vision tokens {words}: {encoded}")
        return words

    # --- sampling ------------------------------------------------------------------------
    def sampling_params(self, n: int, settings: SamplingSettings) -> Any:
        """vllm.SamplingParams for n completions per request (top_k 0 = off, as in vLLM)."""
        from vllm import SamplingParams

        common = {
            "max_tokens": settings.max_new_tokens,
            "logprobs": 0,  # the sampled token's log-prob only
            "stop_token_ids": self.stop_ids,
            "bad_words": self.banned_words or None,  # none for a text-only model
            "detokenize": False,
        }
        if settings.greedy:
            return SamplingParams(n=1, temperature=0.0, **common)
        return SamplingParams(
            n=n,
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=max(settings.top_k, 0),
            **common,
        )

    def seeded(self, params: Any, count: int) -> list[Any]:
        """One copy of `params` per request, request j seeded base + j * n (vLLM gives the
        k-th of a request's n completions seed + k, so no two completions share a seed)."""
        base = int(torch.randint(0, 2**31, (1,), generator=self.rng))
        copies = [params.clone() for _ in range(count)]
        for j, copy in enumerate(copies):
            copy.seed = base + j * params.n
        return copies

    @staticmethod
    def request(prompt: PromptInput) -> dict[str, Any]:
        if not prompt.images:
            return {"prompt": prompt.text}
        return {"prompt": prompt.text, "multi_modal_data": {"image": list(prompt.images)}}

    def generate(
        self,
        prompts: list[PromptInput],
        n: int,
        settings: SamplingSettings,
        encoded: Any = None,
        image_features: Any = None,
    ) -> Rollout:
        """n completions per prompt with their sampler log-probs; rows group-major. The
        engine encodes the PromptInputs itself: `encoded` / `image_features` are not used.
        With a tensor-parallel engine, the k ranks' prompts go in as one batch
        (TensorParallelGroup)."""
        if self.tensor_parallel is not None:
            everyone, mine = self.tensor_parallel.gather(prompts)
            rollout = self._generate(everyone, n, settings)
            rows = slice(mine.start * n, mine.stop * n)
            return Rollout(rollout.completion_ids[rows], rollout.logprobs[rows])
        return self._generate(prompts, n, settings)

    def _generate(self, prompts: list[PromptInput], n: int, settings: SamplingSettings) -> Rollout:
        self._wake(("weights", "kv_cache"))
        # vLLM refuses n > 1 with greedy decoding: send each prompt n times instead
        copies = n if settings.greedy else 1
        requests = [self.request(p) for p in prompts for _ in range(copies)]
        params = self.seeded(self.sampling_params(n, settings), len(requests))
        with torch.random.fork_rng(devices=[]):  # vLLM's CPU sampler also draws from it
            outputs = self.llm.generate(requests, params, use_tqdm=False, lora_request=self.adapter)
        completions = [c for out in outputs for c in sorted(out.outputs, key=lambda c: c.index)]
        if len(completions) != len(prompts) * n:
            raise RuntimeError(
                f"vLLM returned {len(completions)} completions, expected {len(prompts)} x {n}"
            )
        rows = [self._tokens_and_logprobs(c) for c in completions]
        self._sleep()
        return Rollout([ids for ids, _ in rows], [lps for _, lps in rows])

    def _tokens_and_logprobs(self, completion: Any) -> tuple[list[int], list[float]]:
        """Token ids (stop token included when produced) and their sampler log-probs."""
        ids = list(completion.token_ids)
        logprobs = [
            step[token].logprob for token, step in zip(ids, completion.logprobs, strict=True)
        ]
        if completion.finish_reason == "stop" and (not ids or ids[-1] not in self.stop_ids):
            # vLLM stopped on a stop token it did not return: restore it so the trainer's
            # completion mask ends there; its log-prob is unknown (NaN, see sampler_correction)
            ids.append(
                completion.stop_reason
                if isinstance(completion.stop_reason, int)
                else self.stop_ids[0]
            )
            logprobs.append(float("nan"))
        return ids, logprobs

    # --- weights -------------------------------------------------------------------------
    def sync_weights(self, policy: Any) -> None:
        """Make the engine sample from the policy's current weights; the policy is only read."""
        self._wake(("weights",))
        if getattr(policy, "sharded", False):
            self._push_sharded(policy)
        elif self.settings.sync == "adapter":
            self._swap_adapter(policy)
        elif getattr(policy, "full", False):  # every trained tensor (the LM, by default)
            push_weights(self.llm, changed_weights(policy.model, policy.trained_names))
        elif lora_linears(policy.model):
            push_weights(self.llm, merged_lora_weights(policy))
        else:  # no adapter: the whole model is trained, so all of it moves
            push_weights(self.llm, merged_state_dict(policy).items())
        release_input_embedding_gemm(self.llm)  # a reload of the embedding packs it again
        reset_caches(self.llm)

    def _push_sharded(self, policy: Any) -> None:
        """A sharded (--fsdp) policy: gather, merge and push one FSDP unit at a time (a
        collective: every rank syncs its own engine at once)."""
        from models.sharding import sharded_sync_batches

        if self.settings.sync == "adapter":
            raise ValueError("vllm_sync='adapter' with --fsdp: use the merged sync")
        names = policy.trained_names if getattr(policy, "full", False) else None
        for batch in sharded_sync_batches(policy.root, names):
            if batch:
                push_weights(self.llm, batch)

    def _swap_adapter(self, policy: Any) -> None:
        self.adapter_count += 1
        folder = save_adapter(policy.model, self.adapter_root / f"step-{self.adapter_count}")
        previous, self.adapter = self.adapter, add_adapter(self.llm, folder, self.adapter_count)
        if previous is not None:
            remove_adapter(self.llm, previous)

    def close(self) -> None:
        """Shut the engine down. vLLM's teardown destroys torch.distributed's default process
        group too (the engine shares the trainer's): call this after the last collective, in
        place of destroy_process_group."""
        shutdown(self.llm)

    # --- sleep mode (GPU) ----------------------------------------------------------------
    def _sleep(self) -> None:
        if self.can_sleep:
            self.llm.sleep(level=1)  # weights to host memory, KV cache dropped
            self.asleep = {"weights", "kv_cache"}

    def _wake(self, tags: tuple[str, ...]) -> None:
        wanted = [tag for tag in tags if tag in self.asleep]
        if wanted:
            self.llm.wake_up(tags=wanted)
            self.asleep -= set(wanted)
