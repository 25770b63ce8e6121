"""evaluate.py: OCR metrics on hand cases, per-task scoring, checkpoint resolution, bad input,
and an end-to-end evaluation of a checkpoint from a short training run on the tiny model."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

import evaluate
from data import get_task, load_samples
from data.sample import DataError, Sample
from evaluate import format_table
from grpo.checkpoint import CheckpointError, resolve_source
from grpo.evaluation import (
    EvalReport,
    EvalSettings,
    EvaluationError,
    deltas,
    policy_settings,
)
from grpo.evaluation import evaluate as evaluate_with
from grpo.rollout import task_prompts
from grpo.trainer import train
from grpo.types import EXPORT_INFO, PolicySettings, SamplingSettings
from models import BACKEND
from models.export import BaseModelMismatch, check_same_base, load_policy
from models.policy import Policy
from models.samplers import TransformersSampler
from models.tiny import TinySpec, tiny_model_path
from rewards.ocr_metrics import character_error_rate, edit_distance, ocr_metrics, text_accuracy
from rewards.scoring import score_predictions
from tests.training_helpers import small_config, write_ocr_jsonl
from tests.vllm_helpers import VLLM_TINY


def run_evaluation(settings: EvalSettings) -> EvalReport:
    return evaluate_with(settings, BACKEND)


# A base the default tiny model's adapters do not fit: hidden 32 (head_dim 16, rope 2+3+3).
OTHER_SPEC = TinySpec(hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64)
CPU = torch.device("cpu")


# --------------------------------------------------------------------------------------------
# OCR metrics
# --------------------------------------------------------------------------------------------


def levenshtein_reference(a: str, b: str) -> int:
    """The full DP table, written out: the slow reference for rapidfuzz."""
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) + 1):
        table[i][0] = i
    for j in range(len(b) + 1):
        table[0][j] = j
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            table[i][j] = min(
                table[i - 1][j] + 1,
                table[i][j - 1] + 1,
                table[i - 1][j - 1] + (a[i - 1] != b[j - 1]),
            )
    return table[-1][-1]


@pytest.mark.parametrize(
    ("prediction", "label", "expected"),
    [
        ("", "", 1.0),
        ("abc", "abc", 1.0),
        ("abd", "abc", 2 / 3),
        ("a", "abcd", 1 / 4),
        ("abcdef", "abc", 1 / 2),  # normalised by the longer string: never below 0
        ("", "abc", 0.0),
        ("xyz", "", 0.0),
        ("识别文本", "识别文字", 3 / 4),  # characters, not UTF-8 bytes
        ("文字", "文字的", 2 / 3),
    ],
)
def test_text_accuracy_hand_cases(prediction: str, label: str, expected: float) -> None:
    assert text_accuracy(prediction, label) == pytest.approx(expected, abs=1e-12)


def test_edit_distance_equals_the_dp_reference() -> None:
    rng = random.Random(0)
    alphabet = "ab文字识别 1"
    for _ in range(300):
        a = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
        b = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
        assert edit_distance(a, b) == levenshtein_reference(a, b), (a, b)
        longest = max(len(a), len(b))
        expected = 1.0 if longest == 0 else 1 - levenshtein_reference(a, b) / longest
        assert text_accuracy(a, b) == pytest.approx(expected)


def test_cer_pools_edits_over_label_characters() -> None:
    # d("abd","abc") = 1, d("a","abcd") = 3; labels hold 3 + 4 characters
    assert character_error_rate(["abd", "a"], ["abc", "abcd"]) == pytest.approx(4 / 7)
    assert character_error_rate(["abcabc"], ["abc"]) == pytest.approx(1.0)  # 3 / 3
    assert character_error_rate(["x"], [""]) == 1.0  # all-empty labels divide by 1
    metrics = ocr_metrics(["abd", "abcd", ""], ["abc", "abcd", ""])
    assert metrics["text_accuracy"] == pytest.approx((2 / 3 + 1 + 1) / 3)
    assert metrics["exact_match"] == pytest.approx(2 / 3)
    assert metrics["cer"] == pytest.approx(1 / 7)


# --------------------------------------------------------------------------------------------
# Scoring per task, deltas, table
# --------------------------------------------------------------------------------------------


def _samples(solutions: list[str]) -> list[Sample]:
    return [Sample("q", s, [], {}, f"hand.jsonl:{i + 1}") for i, s in enumerate(solutions)]


def test_ocr_scoring_on_raw_and_answer_views() -> None:
    tagged = "<think>x</think><answer>文字</answer>"  # 35 characters, contains the label
    texts = ["文字", tagged, "  文本 \n", ""]
    rows, summary = score_predictions(
        "ocr", _samples(["文字"] * 4), texts, [("ocr", 1.0), ("format", 0.5)]
    )
    assert len(tagged) == 35
    assert summary["text_accuracy/raw"] == pytest.approx((1 + 2 / 35 + 1 / 2 + 0) / 4)
    assert summary["text_accuracy/answer"] == pytest.approx((1 + 1 + 1 / 2 + 0) / 4)
    assert summary["cer/raw"] == pytest.approx((0 + 33 + 1 + 2) / 8)
    assert summary["cer/answer"] == pytest.approx((0 + 0 + 1 + 2) / 8)
    assert summary["exact_match/raw"] == 0.25 and summary["exact_match/answer"] == 0.5
    assert summary["format_rate"] == 0.25
    assert summary["reward/ocr"] == pytest.approx(0.625)  # no digits: weights all 1
    assert summary["reward/format"] == 0.25
    assert [r["format"] for r in rows] == [0.0, 1.0, 0.0, 0.0]
    assert rows[2]["text_accuracy/raw"] == 0.5 and rows[2]["edit_distance/answer"] == 1


def test_count_accuracy_raw_needs_tags_answer_view_does_not() -> None:
    texts = ["<think>a</think><answer>3</answer>", "3", "<answer>4</answer>", "There are 3"]
    rows, summary = score_predictions("count", _samples(["3"] * 4), texts, [("count", 1.0)])
    assert [r["accuracy/raw"] for r in rows] == [1.0, 0.0, 0.0, 0.0]
    assert [r["accuracy/answer"] for r in rows] == [1.0, 1.0, 0.0, 1.0]
    assert summary["accuracy/raw"] == 0.25 and summary["accuracy/answer"] == 0.75
    assert summary["reward/count"] == 0.25 and summary["format_rate"] == 0.25


def test_deltas_and_table() -> None:
    model = {"text_accuracy/answer": 0.75, "cer/answer": 0.2, "seconds": 3.0}
    base = {"text_accuracy/answer": 0.5, "cer/answer": 0.5, "seconds": 1.0}
    delta = deltas(model, base)
    assert delta == pytest.approx({"text_accuracy/answer": 0.25, "cer/answer": -0.3})
    table = format_table({"metrics": model, "base_metrics": base, "delta": delta})
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "model", "base", "delta"]
    assert lines[1].split() == ["text_accuracy/answer", "0.7500", "0.5000", "+0.2500"]
    assert lines[2].split() == ["cer/answer", "0.2000", "0.5000", "-0.3000"]
    assert lines[3].split() == ["seconds", "3.0000", "1.0000"]  # timings get no delta
    assert format_table({"metrics": model}).splitlines()[0].split() == ["metric", "model"]


# --------------------------------------------------------------------------------------------
# What --ckpt / --model resolve to
# --------------------------------------------------------------------------------------------


def _fake_checkpoint(folder: Path, base: str, task: str = "ocr", name: str = "tiny") -> Path:
    """run.json + adapter/ (the resolution never opens the adapter)."""
    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / "adapter_config.json").write_text("{}")
    run = {"base_model": name, "base_model_path": base, "task": task, "config": {}}
    (folder / "run.json").write_text(json.dumps(run))
    return folder


def test_resolve_checkpoint_run_dir_and_adapter_dir(tmp_path: Path, tiny_model_dir: Path) -> None:
    _fake_checkpoint(tmp_path / "run" / "checkpoint-2", str(tiny_model_dir))
    latest = _fake_checkpoint(tmp_path / "run" / "checkpoint-10", str(tiny_model_dir), "count")
    for given in (latest, tmp_path / "run", latest / "adapter"):
        source = resolve_source(str(given), None)
        assert source.kind == "checkpoint"
        assert source.path == latest and source.adapter == latest / "adapter"
        assert source.model == source.base == str(tiny_model_dir)
        assert source.task == "count"
    bare = tmp_path / "downloaded-adapter"  # an adapter without its checkpoint: peft's record
    bare.mkdir()
    config = {"base_model_name_or_path": str(tiny_model_dir)}
    (bare / "adapter_config.json").write_text(json.dumps(config))
    source = resolve_source(str(bare), None)
    assert (source.kind, source.model, source.adapter) == ("checkpoint", str(tiny_model_dir), bare)


def test_resolve_merged_directory_names_its_base(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    source = resolve_source(str(tmp_path), None)
    assert (source.kind, source.base, source.adapter) == ("merged", None, None)
    (tmp_path / EXPORT_INFO).write_text(json.dumps({"base_model": "tiny", "task": "count"}))
    source = resolve_source(str(tmp_path), None)
    assert (source.model, source.base, source.task) == (str(tmp_path), "tiny", "count")
    # the pixel bounds the export recorded size the images of the merged and the base model
    info = {"base_model": "tiny", "min_pixels": 784, "max_pixels": 3136, "config": {}}
    (tmp_path / EXPORT_INFO).write_text(json.dumps(info))
    settings = policy_settings(EvalSettings(), resolve_source(str(tmp_path), None))
    assert (settings.min_pixels, settings.max_pixels) == (784, 3136)
    settings = policy_settings(EvalSettings(max_pixels=6272), resolve_source(str(tmp_path), None))
    assert (settings.min_pixels, settings.max_pixels) == (784, 6272)


def test_resolve_rejects_bad_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        resolve_source(str(tmp_path / "missing"), None)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        resolve_source(str(tmp_path), None)
    with pytest.raises(CheckpointError, match=r"--ckpt .* or --model"):
        resolve_source(None, None)
    moved = _fake_checkpoint(tmp_path / "a", "/nowhere/base", name="/nowhere/base")
    with pytest.raises(CheckpointError, match=r"/nowhere/base .*pass --model"):
        resolve_source(str(moved), None)
    # the resolved path is gone but the run named a hub model: that name is used
    hub = _fake_checkpoint(tmp_path / "b", "/nowhere/base", name="Qwen/Qwen2.5-VL-3B-Instruct")
    assert resolve_source(str(hub), None).model == "Qwen/Qwen2.5-VL-3B-Instruct"


def test_model_of_another_architecture_is_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    other = str(tiny_model_path(spec=OTHER_SPEC))
    ckpt = _fake_checkpoint(tmp_path / "ckpt", str(tiny_model_dir))
    with pytest.raises(BaseModelMismatch) as error:
        resolve_source(str(ckpt), other, check_same_base)
    assert str(tiny_model_dir) in str(error.value) and other in str(error.value)
    assert "hidden_size: 64 vs 32" in str(error.value)
    assert resolve_source(str(ckpt), str(tiny_model_dir)).model == str(tiny_model_dir)


# --------------------------------------------------------------------------------------------
# End to end on a checkpoint from a short training run
# --------------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_ocr_jsonl(tmp_path_factory.mktemp("data"), 5)


@pytest.fixture(scope="module")
def base_dir() -> Path:
    """The tiny model with vLLM's CPU head size, so the vLLM test can evaluate it too."""
    return tiny_model_path(spec=VLLM_TINY)


@pytest.fixture(scope="module")
def checkpoint(data_file: Path, base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two GRPO steps; the high learning rate makes the adapter clearly non-zero."""
    run = tmp_path_factory.mktemp("run")
    config = small_config(data_file, run, model=str(base_dir), save_steps=2, learning_rate=0.05)
    train(config, BACKEND)
    return run / "checkpoint-2"


@pytest.fixture(scope="module")
def compared(checkpoint: Path, data_file: Path) -> dict:
    """`evaluate.py --ckpt ... --compare-base`, default output directory."""
    argv = ["--ckpt", str(checkpoint), "--data", str(data_file), "--limit", "4"]
    argv += ["--max-new-tokens", "8", "--batch-size", "3", "--sampler", "hf", "--compare-base"]
    evaluate.main(argv)
    out = checkpoint.parent / "eval" / checkpoint.name  # outside the rotated checkpoint folder
    assert not (checkpoint / "eval").exists()
    return {
        "summary": json.loads((out / "summary.json").read_text()),
        "predictions": _read_jsonl(out / "predictions.jsonl"),
        "base_predictions": _read_jsonl(out / "base_predictions.jsonl"),
    }


def test_checkpoint_evaluation_writes_predictions_and_summary(compared: dict) -> None:
    summary = compared["summary"]
    assert (summary["source"], summary["task"], summary["num_samples"]) == ("checkpoint", "ocr", 4)
    for key in ("text_accuracy/raw", "text_accuracy/answer", "cer/answer", "exact_match/raw"):
        assert key in summary["metrics"] and key in summary["base_metrics"]
    for key in ("format_rate", "reward/ocr", "reward/format", "truncated_rate"):
        assert key in summary["metrics"]
    for key, value in summary["delta"].items():
        assert value == pytest.approx(summary["metrics"][key] - summary["base_metrics"][key])
    for records in (compared["predictions"], compared["base_predictions"]):
        assert [r["index"] for r in records] == [0, 1, 2, 3]
        assert [r["solution"] for r in records] == ["文字0", "文字1", "文字2", "文字3"]
        assert all(1 <= r["num_tokens"] <= 8 for r in records)
        for r in records:  # the per-sample numbers are the formula on the stored strings
            assert r["text_accuracy/raw"] == text_accuracy(r["prediction"].strip(), r["solution"])
    mean = sum(r["text_accuracy/answer"] for r in compared["predictions"]) / 4
    assert summary["metrics"]["text_accuracy/answer"] == pytest.approx(mean)
    texts = [r["prediction"] for r in compared["predictions"]]
    assert texts != [r["prediction"] for r in compared["base_predictions"]]  # the adapter acts


def test_checkpoint_predictions_equal_the_trainers_policy_with_the_adapter(
    compared: dict, checkpoint: Path, data_file: Path, base_dir: Path
) -> None:
    """An independent route to base + adapter: the trainer's LoRA policy with the adapter's
    tensors loaded by peft's set_peft_model_state_dict (as --resume does)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    config = json.loads((checkpoint / "run.json").read_text())["config"]
    settings = PolicySettings(
        model=str(base_dir),
        lora_r=config["lora_r"],
        lora_alpha=config["lora_alpha"],
        min_pixels=config["min_pixels"],
        max_pixels=config["max_pixels"],
    )
    policy = Policy(settings, CPU)
    set_peft_model_state_dict(
        policy.model, load_file(str(checkpoint / "adapter" / "adapter_model.safetensors"))
    )
    samples = load_samples(data_file, limit=4)
    greedy = SamplingSettings(max_new_tokens=8, greedy=True)
    ids: list[list[int]] = []
    for chunk in (samples[:3], samples[3:]):  # the evaluation's batches (--batch-size 3)
        prompts = task_prompts(policy, get_task("ocr"), chunk, evaluation=True)
        ids += TransformersSampler(policy).generate(prompts, 1, greedy).completion_ids
    assert policy.decode(ids) == [r["prediction"] for r in compared["predictions"]]


def test_plain_model_evaluation_equals_the_compared_base(
    compared: dict,
    checkpoint: Path,
    data_file: Path,
    base_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = json.loads((checkpoint / "run.json").read_text())["config"]
    monkeypatch.chdir(tmp_path)
    argv = ["--model", str(base_dir), "--data", str(data_file), "--limit", "4"]
    argv += ["--max-new-tokens", "8", "--batch-size", "3", "--sampler", "hf"]
    argv += ["--min-pixels", str(config["min_pixels"]), "--max-pixels", str(config["max_pixels"])]
    evaluate.main(argv)
    printed = capsys.readouterr().out.splitlines()
    assert str(base_dir) in printed[0] and "4 samples" in printed[0]
    assert printed[1].split() == ["metric", "model"]
    assert any(line.startswith("text_accuracy/answer ") for line in printed)
    out = tmp_path / f"eval-{base_dir.name}"  # the default output directory
    records = _read_jsonl(out / "predictions.jsonl")
    assert [r["prediction"] for r in records] == [
        r["prediction"] for r in compared["base_predictions"]
    ]


def test_adapter_on_a_different_base_names_both(checkpoint: Path) -> None:
    other = str(tiny_model_path(spec=OTHER_SPEC))
    with pytest.raises(BaseModelMismatch) as error:
        load_policy(other, checkpoint / "adapter", PolicySettings(lora_r=0), CPU)
    message = str(error.value)
    assert str(checkpoint / "adapter") in message and other in message
    assert "in_features 64, model 32" in message
    with pytest.raises(SystemExit, match="hidden_size: 64 vs 32"):
        evaluate.main(["--ckpt", str(checkpoint), "--model", other])


def test_bad_input_is_a_clear_error(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=f"--ckpt {tmp_path}/gone: no such file"):
        evaluate.main(["--ckpt", str(tmp_path / "gone")])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=f"{empty}: no samples"):
        run_evaluation(EvalSettings(ckpt=str(checkpoint), data=str(empty), sampler="hf"))
    with pytest.raises(SystemExit, match="no samples"):
        evaluate.main(["--ckpt", str(checkpoint), "--data", str(empty)])
    with pytest.raises(EvaluationError, match="--compare-base: no base model"):
        run_evaluation(EvalSettings(model="tiny", compare_base=True, sampler="hf"))
    with pytest.raises(SystemExit, match="unknown task 'nope'"):
        evaluate.main(["--ckpt", str(checkpoint), "--task", "nope"])


@pytest.mark.vllm
def test_vllm_sampler_evaluates_like_transformers(
    compared: dict, checkpoint: Path, data_file: Path, tmp_path: Path
) -> None:
    """--sampler vllm on the checkpoint: the engine gets the merged adapter, then (for
    --compare-base) the base weights; both answer as transformers does."""
    pytest.importorskip("vllm")
    settings = EvalSettings(
        ckpt=str(checkpoint),
        data=str(data_file),
        limit=4,
        max_new_tokens=8,
        sampler="vllm",
        compare_base=True,
        out=str(tmp_path),
    )
    report = run_evaluation(settings)
    assert report.summary["sampler"] == "vllm"
    for ours, theirs in (
        (report.predictions, compared["predictions"]),
        (report.base_predictions, compared["base_predictions"]),
    ):
        assert [(r["prediction"], r["num_tokens"]) for r in ours] == [
            (r["prediction"], r["num_tokens"]) for r in theirs
        ]


def test_plain_model_is_sized_by_the_task_preset_a_checkpoint_by_its_run(tmp_path: Path) -> None:
    """The base model and the checkpoint must be scored on the same pixels: a plain model takes
    the task preset's bounds (configs/ocr.yaml), a checkpoint the ones its run recorded."""
    from grpo.config import task_preset

    preset = task_preset("ocr")
    plain = policy_settings(EvalSettings(), resolve_source(None, "tiny"), preset)
    assert (plain.min_pixels, plain.max_pixels) == (200704, 1003520)
    assert (preset["min_pixels"], preset["max_pixels"]) == (200704, 1003520)
    given = policy_settings(EvalSettings(max_pixels=6272), resolve_source(None, "tiny"), preset)
    assert given.max_pixels == 6272  # the command line still wins
