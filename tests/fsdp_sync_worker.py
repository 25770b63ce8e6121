"""Run by tests/test_fsdp_sync.py under torchrun: a sharded (FSDP2) tiny policy is trained
towards a target completion, then synced into each rank's own vLLM engine unit by unit.

    python fsdp_sync_worker.py OUT [lora|full]

Each rank writes OUT/rank<r>.json: the engine's greedy completion before and after the sync,
the sharded policy's own greedy completion, the target, and the names pushed per FSDP unit.
Rank 0 also writes the greedy completion of an unsharded policy built from the gathered
weights (the adapter or the full model directory saved from the shards).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

import models  # noqa: F401
from grpo import distributed
from grpo.types import PolicySettings, SamplingSettings, ShardSettings
from models import BACKEND
from models.policy import Policy
from models.samplers import TransformersSampler
from models.sharding import sharded_sync_batches
from models.tiny import tiny_model_path
from tests.launch import cleanup_checked
from tests.vllm_helpers import VLLM_TINY, image_prompts, new_sampler

GREEDY = SamplingSettings(max_new_tokens=8, greedy=True)


def train_towards(policy: Policy, prompt, target: list[int]) -> int:
    """Adam steps raising log p(target | prompt) until the policy greedily decodes `target`;
    the number of steps taken. Every rank trains on the same prompt, so the mean gradient
    FSDP2 reduce-scatters is this prompt's gradient."""
    optimizer = torch.optim.Adam(policy.trainable_parameters(), lr=0.02)
    batch = policy.rollout_batch(policy.encode([prompt]), [target], 1)
    for step in range(1, 11):
        loss = -(policy.logprobs(batch, 1.0).logp * batch.completion_mask).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if TransformersSampler(policy).generate([prompt], 1, GREEDY).completion_ids == [target]:
            return step
    raise AssertionError("the worker's training did not reach its target; its setup is broken")


def main(out_dir: str, mode: str) -> None:
    run(out_dir, mode)
    cleanup_checked()  # after run(): its sharded policy, which holds the group, is gone


def run(out_dir: str, mode: str) -> None:
    info = distributed.init_distributed()
    out = Path(out_dir)
    torch.manual_seed(0)  # the same LoRA initialisation on every rank
    path = str(tiny_model_path(spec=VLLM_TINY))
    settings = PolicySettings(model=path, lora_r=0 if mode == "full" else 8, full=mode == "full")
    policy = Policy(dataclasses.replace(settings, reference=False), info.device)
    policy.shard(distributed.device_mesh(info), ShardSettings())
    prompt = image_prompts(policy)[0]
    sampler = new_sampler(policy)
    before = sampler.generate([prompt], 1, GREEDY).completion_ids[0]
    target = policy.processor.tokenizer.encode("hello", add_special_tokens=False) * 8
    steps = train_towards(policy, prompt, target)
    sampler.sync_weights(policy)
    after = sampler.generate([prompt], 1, GREEDY).completion_ids[0]
    names = policy.trained_names if policy.full else None
    pushed = [[name for name, _ in batch] for batch in sharded_sync_batches(policy.root, names)]
    own = TransformersSampler(policy).generate([prompt], 1, GREEDY).completion_ids[0]
    saved = out / ("model" if policy.full else "adapter")
    policy.save_trainable(saved)  # gathered from the shards to rank 0
    record = {
        "before": before,
        "after": after,
        "sharded_policy": own,
        "target": target,
        "steps": steps,
        "pushed": pushed,
    }
    if distributed.is_main_process():
        record["gathered"] = gathered_greedy(path, saved, policy.full, prompt)
    (out / f"rank{info.rank}.json").write_text(json.dumps(record))
    distributed.barrier()
    sampler.close()  # after the last collective: vLLM's teardown destroys the process group


def gathered_greedy(base: str, saved: Path, full: bool, prompt) -> list[int]:
    """Greedy completion of an unsharded policy holding the weights saved from the shards."""
    cpu = torch.device("cpu")
    if full:
        policy = BACKEND.load_trained(str(saved), None, PolicySettings(lora_r=0), cpu)
    else:
        policy = BACKEND.load_trained(base, saved, PolicySettings(lora_r=0), cpu)
    return TransformersSampler(policy).generate([prompt], 1, GREEDY).completion_ids[0]


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
