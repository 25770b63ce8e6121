"""Trained weights -> a colocated vLLM engine: one small function per engine call.

Two ways to make the engine sample from the policy after an optimizer step:

- merged (default): stream W' = W + s * B @ A for the linears LoRA touched (and their fused
  siblings) into the engine's base weights with `reload_weights`, by transformers' in-memory
  names. The engine then runs a plain model at full speed; only the touched matrices move.
- adapter: save the peft adapter and hand it to vLLM's own LoRA support under a new id.
  The engine keeps the original base weights and applies B @ A at run time.
- full fine-tuning: there is nothing to merge; every trained tensor (the whole language model,
  embeddings and LM head included; a frozen vision tower stays as loaded) goes through the
  same `reload_weights` call as the merged mode (models/full.changed_weights).

Either way, state derived from the old weights must go: the encoder cache (image features) and
the prefix cache (KV of shared prompt prefixes). The calls below are the ones that work with
vLLM 0.32 on both CPU and GPU with the in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0):
tensors travel by reference, nothing is pickled. The older in-place
`model_runner.model.load_weights(...)` breaks on CPU, where weights are repacked after loading.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

# vLLM warns once per layer a reload leaves out and lists every tensor not sent; for a partial
# push (the LoRA-touched matrices only) that is the intent, and hundreds of lines per step.
PARTIAL_RELOAD_LOGGERS = (
    "vllm.model_executor.model_loader.reload.layerwise",
    "vllm.model_executor.model_loader.reload.inplace",
)


@contextmanager
def _errors_only(names: tuple[str, ...]) -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def push_weights(llm: Any, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Load (checkpoint-format name, tensor) pairs into the engine's model, in place.

    The engine maps names onto its own (fused, renamed) parameters and re-runs its
    post-load processing for every layer it touched; layers not named keep their weights.
    A fused layer must receive all of its parts in one call.
    """
    with _errors_only(PARTIAL_RELOAD_LOGGERS):
        llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True}
        )


def release_input_embedding_gemm(llm: Any) -> int:
    """Free the packed matmul vLLM's CPU backend prepares for the input embedding; returns
    how many it freed (0 on GPU).

    On CPU, vLLM packs a oneDNN copy of every vocabulary matrix as if it were an output head
    (vocab x hidden more bytes each: 2.3 GiB for the 72B's embedding, 1.0 for a 7B's). The
    input embedding only looks rows up, and the output head is a module of its own (tied or
    not) with its own packed copy, so the embedding's copy is never used. vLLM packs again
    whatever a reload touches: call this after every push too.
    """
    return sum(llm.apply_model(_drop_input_embedding_gemm))


def _drop_input_embedding_gemm(model: torch.nn.Module) -> int:
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        ParallelLMHead,
        VocabParallelEmbedding,
    )

    heads = {id(module.lm_head) for module in model.modules() if hasattr(module, "lm_head")}
    dropped = 0
    for module in model.modules():
        packed = getattr(module, "cpu_linear", torch.nn.functional.linear)
        if (
            isinstance(module, VocabParallelEmbedding)
            and not isinstance(module, ParallelLMHead)
            and id(module) not in heads  # a model whose head is the embedding module itself
            and packed is not torch.nn.functional.linear
        ):
            module.cpu_linear = torch.nn.functional.linear  # the packed copy goes with its closure
            dropped += 1
    return dropped


def shutdown(llm: Any) -> None:
    """Stop the engine now instead of at interpreter exit (idempotent).

    vLLM's teardown also destroys torch.distributed's default process group, which the
    in-process engine shares with the trainer: call it after the last collective.
    """
    llm.llm_engine.engine_core.shutdown()


def reset_caches(llm: Any) -> None:
    """Forget cached image features and prompt KV computed with the previous weights.

    Without the encoder-cache reset the next request with an image fails ("Encoder cache
    miss") or, worse, reuses stale features.
    """
    llm.llm_engine.reset_encoder_cache()
    llm.reset_prefix_cache()


def save_adapter(model: Any, directory: Path) -> Path:
    """Write the peft adapter (adapter_config.json + weights) of `model` to `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    return directory


def add_adapter(llm: Any, directory: Path, adapter_id: int) -> Any:
    """Load the adapter in `directory` into the engine under a fresh integer id.

    vLLM caches adapters by id, so every new set of weights needs a new id.
    Returns the LoRARequest to pass to `generate`.
    """
    from vllm.lora.request import LoRARequest

    request = LoRARequest(f"policy-{adapter_id}", adapter_id, str(directory))
    if not llm.llm_engine.add_lora(request):
        raise RuntimeError(f"vLLM refused the adapter in {directory}")
    return request


def remove_adapter(llm: Any, request: Any) -> None:
    """Drop an adapter from the engine and delete its directory."""
    llm.llm_engine.remove_lora(request.lora_int_id)
    shutil.rmtree(request.lora_path, ignore_errors=True)
