"""Full fine-tuning (--full / --lora-r 0) end to end on the tiny model: which weights train, the
frozen reference copy, checkpoints that transformers loads, exact resume, evaluation and
export, gradient checkpointing, and the settings that contradict it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch.testing import assert_close

import evaluate
from grpo import distributed
from grpo.config import ConfigError, load_config
from grpo.trainer import build_trainer, save, train, train_step
from grpo.types import MODEL_DIR, PolicySettings
from models import BACKEND
from models.full import changed_weights, is_vision_parameter
from models.policy import Policy, make_policy
from models.tiny import tiny_model_path
from tests.launch import torchrun
from tests.text_helpers import TEXT_FAMILIES, tiny_text_model_path
from tests.training_helpers import small_config, train_killed_then_resumed, write_ocr_jsonl
from tests.vllm_helpers import image_prompts

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_ocr_jsonl(tmp_path_factory.mktemp("ocr"))


def full_config(data: Path, out: Path, **overrides: object):
    """small_config in full fine-tuning (lora_r 0 is --full's resolved form)."""
    return small_config(data, out, **{"lora_r": 0, "full": True, **overrides})


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def saved_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118


def fixed_batch(policy: Policy):
    """Two image prompts with two fixed completions each: a batch both models can score."""
    prompts = image_prompts(policy)
    completions = [[11, 12, 13, 14], [15, 16], [17, 18, 19], [20]]
    return policy.rollout_batch(policy.encode(prompts), completions, 2)


# --- the mode itself -------------------------------------------------------------------------


def test_every_language_model_weight_trains_and_the_reference_is_a_copy() -> None:
    policy = Policy(PolicySettings(model="tiny", full=True), CPU)
    named = dict(policy.model.named_parameters())
    trained = {n for n, p in named.items() if p.requires_grad}
    assert trained == {n for n in named if not is_vision_parameter(n)}
    assert any("embed_tokens" in n for n in trained) and any("visual" in n for n in named)
    assert len(policy.trainable_parameters()) == len(trained)
    inner = policy.model
    assert inner.lm_head.weight is inner.get_input_embeddings().weight  # still tied
    pushed = dict(changed_weights(policy.model, policy.trained_names))
    assert pushed.keys() == trained | {"lm_head.weight"}  # the engine's tied head reloads too
    assert not any(p.requires_grad for p in policy.reference.parameters())
    for (name, p), (_, q) in zip(named.items(), policy.reference.named_parameters(), strict=True):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), name  # a copy, not a view
    with_vision = Policy(PolicySettings(model="tiny", full=True, lora_vision=True), CPU)
    assert all(p.requires_grad for p in with_vision.model.parameters())
    assert with_vision.image_features(with_vision.encode(image_prompts(with_vision))) is None


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_a_text_model_trains_whole_and_syncs_its_head(family: str) -> None:
    """Tied (llama) or untied (qwen2) output projection: every weight trains, and the head
    is among the tensors a sync sends."""
    settings = PolicySettings(model=str(tiny_text_model_path(family)), full=True)
    policy = make_policy(settings, CPU)
    assert all(p.requires_grad for p in policy.model.parameters())
    pushed = dict(changed_weights(policy.model, policy.trained_names))
    assert "lm_head.weight" in pushed and "model.embed_tokens.weight" in pushed
    tied = policy.model.lm_head.weight is policy.model.get_input_embeddings().weight
    assert tied == (family == "llama")


def test_a_full_step_moves_the_weights_and_not_the_reference(
    data_file: Path, tmp_path: Path
) -> None:
    trainer = build_trainer(
        full_config(data_file, tmp_path / "run"), distributed.init_distributed(), BACKEND
    )
    policy = trainer.policy
    before = snapshot(policy.model)
    metrics, _ = train_step(trainer)
    assert metrics["grad_norm"] > 0
    after = snapshot(policy.model)
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    language = {n for n in before if not is_vision_parameter(n)}
    assert moved == language, sorted(language - moved)[:5]  # every LM tensor, no vision one
    # the reference is still the base model: its log-probs are a fresh base model's
    base = Policy(
        PolicySettings(model="tiny", lora_r=0, min_pixels=28 * 28, max_pixels=56 * 56), CPU
    )
    batch = fixed_batch(policy)
    reference = policy.reference_logprobs(batch, 1.0)
    with torch.no_grad():
        assert_close(reference, base.logprobs(fixed_batch(base), 1.0).logp, rtol=0, atol=1e-6)
        trained = policy.logprobs(batch, 1.0).logp
    assert (trained - reference).abs().max() > 1e-3  # guard: the step did change the policy
    with policy.adapter_disabled(), torch.no_grad():  # --compare-base: the frozen copy
        assert_close(policy.logprobs(batch, 1.0).logp, reference, rtol=0, atol=0)


def test_beta_zero_keeps_no_reference_copy(data_file: Path, tmp_path: Path) -> None:
    config = full_config(data_file, tmp_path / "run", beta=0.0)
    trainer = build_trainer(config, distributed.init_distributed(), BACKEND)
    assert trainer.policy.reference is None
    metrics, _ = train_step(trainer)
    assert metrics["grad_norm"] > 0
    with pytest.raises(RuntimeError, match="no reference copy"):
        trainer.policy.reference_logprobs(fixed_batch(trainer.policy), 1.0)


def count_checkpointed_calls(policy: Policy, calls: list[int]) -> None:
    """Make every checkpointed decoder layer append to `calls` when it recomputes."""
    for layer in policy.model.model.language_model.layers:
        real = layer._gradient_checkpointing_func

        def counted(*args, real=real, **kwargs):
            calls.append(1)
            return real(*args, **kwargs)

        layer._gradient_checkpointing_func = counted


def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients() -> None:
    """Checkpointing runs although the policy stays in eval mode (no dropout), and changes no
    gradient."""
    grads, calls = [], []
    for checkpointing in (False, True):
        settings = PolicySettings(model="tiny", full=True, gradient_checkpointing=checkpointing)
        policy = Policy(settings, CPU)
        if checkpointing:
            count_checkpointed_calls(policy, calls)
        policy.logprobs(fixed_batch(policy), 1.0).logp.sum().backward()
        assert not any(m.training for m in policy.model.modules())  # eval mode restored
        grads.append({n: p.grad for n, p in policy.model.named_parameters() if p.requires_grad})
    assert len(calls) == len(policy.model.model.language_model.layers)
    with torch.no_grad():  # no gradient to save memory for: the plain forward
        policy.logprobs(fixed_batch(policy), 1.0)
    assert len(calls) == len(policy.model.model.language_model.layers)
    for name, grad in grads[0].items():
        assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


# --- checkpoints, resume, evaluation, export ------------------------------------------------


@pytest.fixture(scope="module")
def trained(data_file: Path, tmp_path_factory: pytest.TempPathFactory):
    """Two full fine-tuning steps saved as checkpoint-2, with the trainer still in memory."""
    run = tmp_path_factory.mktemp("full-run")
    config = full_config(data_file, run, learning_rate=1e-2)
    trainer = build_trainer(config, distributed.init_distributed(), BACKEND)
    for _ in range(2):
        train_step(trainer)
        trainer.step += 1
    return trainer, save(trainer)


def test_checkpoint_is_a_model_directory_transformers_loads(trained) -> None:
    from transformers import Qwen2_5_VLForConditionalGeneration

    trainer, checkpoint = trained
    assert not (checkpoint / "adapter").exists()
    model_dir = checkpoint / MODEL_DIR
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (model_dir / name).is_file(), name
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert f"{MODEL_DIR}/model.safetensors" in manifest and "trainer_state.pt" in manifest
    loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir).eval()
    batch = fixed_batch(trainer.policy)
    inputs = {k: getattr(batch, k) for k in ("input_ids", "attention_mask", "image_grid_thw")}
    inputs |= {"pixel_values": batch.pixel_values, "mm_token_type_ids": batch.mm_token_type_ids}
    with torch.no_grad():
        ours = trainer.policy.model(**inputs).logits
        theirs = loaded(**inputs).logits
    assert_close(theirs, ours, rtol=0, atol=1e-5)
    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_path()).eval()
    with torch.no_grad():
        assert (base(**inputs).logits - ours).abs().max() > 1e-2  # guard: trained weights


def read_predictions(out: Path, name: str = "predictions.jsonl") -> list[tuple[str, int]]:
    records = [json.loads(line) for line in (out / name).open(encoding="utf-8")]
    return [(r["prediction"], r["num_tokens"]) for r in records]


def evaluate_cli(source: Path, data: Path, out: Path, *extra: str) -> None:
    argv = ["--ckpt", str(source), "--data", str(data), "--limit", "3", "--max-new-tokens", "6"]
    evaluate.main([*argv, "--out", str(out), *extra])


def test_evaluate_and_export_a_full_checkpoint(trained, data_file: Path, tmp_path: Path) -> None:
    _, checkpoint = trained
    evaluate_cli(checkpoint, data_file, tmp_path / "eval", "--sampler", "hf", "--compare-base")
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert (summary["source"], summary["adapter"], summary["task"]) == ("checkpoint", None, "ocr")
    assert summary["base_metrics"] is not None
    ours = read_predictions(tmp_path / "eval")
    assert ours != read_predictions(tmp_path / "eval", "base_predictions.jsonl")  # trained
    out = evaluate.export_checkpoint(str(checkpoint), str(tmp_path / "export"))
    info = json.loads((out / "export_info.json").read_text())
    assert info["base_model_path"] == str(tiny_model_path()) and info["step"] == 2
    exported, stored = saved_weights(out), saved_weights(checkpoint / MODEL_DIR)
    assert exported.keys() == stored.keys()
    for key, tensor in exported.items():
        assert torch.equal(tensor, stored[key]), key
    evaluate_cli(out, data_file, tmp_path / "eval-export", "--sampler", "hf")
    assert read_predictions(tmp_path / "eval-export") == ours


def test_checkpoint_of_another_model_is_refused(trained, tmp_path: Path) -> None:
    from models.tiny import TinySpec

    _, checkpoint = trained
    other = TinySpec(hidden_size=32, num_heads=1, num_kv_heads=1, intermediate_size=64)
    other_dir = str(tiny_model_path(spec=other))
    with pytest.raises(SystemExit, match="different model"):
        evaluate.main(["--ckpt", str(checkpoint), "--model", other_dir])
    policy = Policy(PolicySettings(model=other_dir, full=True, reference=False), CPU)
    with pytest.raises(RuntimeError, match=r"checkpoint-2: the model weights do not fit"):
        policy.load_trainable(checkpoint / MODEL_DIR)  # what --resume does


def test_resume_equals_uninterrupted(
    data_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    straight = full_config(
        data_file, tmp_path / "straight", max_steps=4, save_steps=2, num_iterations=2,
        warmup_steps=1,
    )  # fmt: skip
    train(straight, BACKEND)
    train_killed_then_resumed(straight, tmp_path / "killed", monkeypatch)
    killed = replace(straight, output_dir=str(tmp_path / "killed"))
    a = saved_weights(tmp_path / "straight" / "checkpoint-4" / MODEL_DIR)
    b = saved_weights(tmp_path / "killed" / "checkpoint-4" / MODEL_DIR)
    start = saved_weights(tmp_path / "straight" / "checkpoint-2" / MODEL_DIR)
    assert a.keys() == b.keys()
    for key in a:
        assert_close(a[key], b[key], rtol=1e-6, atol=1e-7, msg=key)
    assert any(not torch.equal(a[k], start[k]) for k in a)  # guard: steps 3-4 trained
    # a LoRA run cannot resume from it, with a message saying why
    as_lora = replace(killed, full=False, lora_r=8, resume=True, max_steps=5)
    with pytest.raises(RuntimeError, match="holds model/, not the adapter/"):
        train(as_lora, BACKEND)


# --- settings --------------------------------------------------------------------------------


def test_full_and_an_explicit_lora_rank_contradict() -> None:
    with pytest.raises(ConfigError, match=r"--full and --lora-r 8 both given"):
        load_config(["--full", "--lora-r", "8"])
    config = load_config(["--full"])  # the ocr preset's lora_r 8 does not count
    assert config.full and config.lora_r == 0 and config.full_finetuning
    settings = config.policy_settings()
    assert settings.full and settings.reference  # beta 0.04 by default
    zero = load_config(["--lora-r", "0", "--beta", "0"])
    assert zero.full_finetuning and not zero.full
    assert zero.policy_settings().full and not zero.policy_settings().reference
    assert not load_config([]).policy_settings().full
    assert settings.dtype == "float32" and load_config([]).policy_settings().dtype is None
    with pytest.raises(ConfigError, match=r"dtype='bfloat16' with full fine-tuning"):
        load_config(["--lora-r", "0", "--dtype", "bfloat16"])
    with pytest.raises(ConfigError, match="vllm_sync='adapter' needs a LoRA adapter"):
        load_config(["--full", "--vllm-sync", "adapter"])


def test_gradient_buckets_cover_every_parameter_in_order() -> None:
    from grpo.trainer import gradient_buckets

    sizes = [3, 4, 10, 1, 1, 2]
    params = [torch.nn.Parameter(torch.zeros(n)) for n in sizes]
    buckets = gradient_buckets(params, limit=5)
    assert [[p.numel() for p in b] for b in buckets] == [[3], [4], [10], [1, 1, 2]]
    assert [p for b in buckets for p in b] == params


# --- two ranks ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process_on_the_same_global_batch(
    data_file: Path, tmp_path: Path
) -> None:
    """Each rank computes the gradient of its half of the groups; the explicit all-reduce
    averages them, so after the updates both ranks hold the single-process weights (in float64,
    see dist_full_worker.DTYPE; far inside float32's tolerance)."""
    from tests.dist_full_worker import __file__ as worker

    for world in (1, 2):
        torchrun(Path(worker), str(data_file), str(tmp_path), nproc=world, timeout=600)
    single = torch.load(tmp_path / "weights-world1-rank0.pt")
    ranks = [torch.load(tmp_path / f"weights-world2-rank{r}.pt") for r in range(2)]
    base = snapshot(Policy(PolicySettings(model="tiny", lora_r=0, dtype="float64"), CPU).model)
    assert single.keys() == ranks[0].keys() == ranks[1].keys()
    for name, weight in single.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # the ranks agree exactly
        assert_close(ranks[0][name], weight, rtol=1e-9, atol=1e-12, msg=name)
    moved = [n for n in single if not torch.equal(single[n], base[n])]
    assert len(moved) == sum(not is_vision_parameter(n) for n in single)  # guard: all LM moved


# --- vLLM ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_training_syncs_the_full_weights_and_evaluates_the_checkpoint(
    data_file: Path, tmp_path: Path
) -> None:
    """Full fine-tuning with the vLLM sampler: after the steps' syncs the engine greedily
    samples what the trainer's model greedily samples, with the trainer's log-probs; the saved
    checkpoint evaluates under vLLM as under transformers."""
    pytest.importorskip("vllm")
    from grpo.types import SamplingSettings
    from models.samplers import TransformersSampler
    from tests.vllm_helpers import LOGP_TOLERANCE, trainer_logprobs

    config = full_config(data_file, tmp_path / "run", sampler="vllm", learning_rate=1e-2)
    trainer = build_trainer(config, distributed.init_distributed(), BACKEND)
    policy, engine = trainer.policy, trainer.sampler
    try:
        for _ in range(2):
            train_step(trainer)
            trainer.step += 1
        greedy = SamplingSettings(max_new_tokens=8, greedy=True)
        prompts = image_prompts(policy)
        rollout = engine.generate(prompts, 1, greedy)
        ours = TransformersSampler(policy).generate(prompts, 1, greedy)
        assert rollout.completion_ids == ours.completion_ids
        logp, mask = trainer_logprobs(policy, prompts, rollout.completion_ids, 1, 1.0)
        sampled = torch.tensor([lp + [0.0] * (logp.shape[1] - len(lp)) for lp in rollout.logprobs])
        assert ((logp - sampled).abs() * mask).max() < LOGP_TOLERANCE
        batch = policy.rollout_batch(policy.encode(prompts), rollout.completion_ids, 1)
        reference = policy.reference_logprobs(batch, 1.0)
        assert ((logp - reference).abs() * mask).max() > 100 * LOGP_TOLERANCE  # guard: trained
        checkpoint = save(trainer)
    finally:
        engine.close()
    for sampler in ("hf", "vllm"):
        evaluate_cli(checkpoint, data_file, tmp_path / f"eval-{sampler}", "--sampler", sampler)
    assert read_predictions(tmp_path / "eval-vllm") == read_predictions(tmp_path / "eval-hf")
