"""Evaluation during training, --save-best, the loggers (TensorBoard, W&B offline) and the
run report opened in headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from grpo.config import ConfigError, validate
from grpo.evaluation import EvalSettings, evaluate
from grpo.metrics import read_metrics
from grpo.trainer import train
from grpo.training_eval import higher_is_better, improves
from models import BACKEND
from tests.training_helpers import PLUGIN, small_config, write_ocr_jsonl

STEPS, EVERY = 4, 2


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("evaldata")
    return write_ocr_jsonl(root / "train", 8), write_ocr_jsonl(root / "eval", 5)


@pytest.fixture(scope="module")
def run(data: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One short run with everything on: eval every 2 steps, best kept, TensorBoard, report."""
    train_file, eval_file = data
    out = tmp_path_factory.mktemp("evalrun") / "run"
    config = small_config(
        train_file,
        out,
        max_steps=STEPS,
        eval_steps=EVERY,
        eval_data=str(eval_file),
        save_best="eval/cer/raw",
        save_steps=EVERY,
        save_total_limit=1,
        log_completions_steps=1,
        tensorboard=True,
    )
    return train(config, BACKEND)


def eval_rows(run_dir: Path) -> dict[int, dict[str, float]]:
    return {
        r["step"]: {k: v for k, v in r.items() if k.startswith("eval/")}
        for r in read_metrics(run_dir)
        if any(k.startswith("eval/") for k in r)
    }


def evaluate_py(eval_file: Path, out: Path, **source: str) -> dict[str, float]:
    settings = EvalSettings(
        data=str(eval_file),
        out=str(out),
        max_new_tokens=6,
        sampler="hf",
        rewards="test_text_hash:1.0",
        reward_plugin=[PLUGIN],
        task="ocr",
        min_pixels=28 * 28,
        max_pixels=56 * 56,
        **source,
    )
    return evaluate(settings, BACKEND).summary["metrics"]


def assert_same_metrics(logged: dict[str, float], reported: dict[str, float]) -> None:
    for name, value in reported.items():
        if name != "seconds":
            assert logged[f"eval/{name}"] == pytest.approx(value, abs=1e-6), name


def test_eval_logged_at_step_0_and_every_n_equals_evaluate_py(
    run: Path, data: tuple[Path, Path], tmp_path: Path
) -> None:
    rows = eval_rows(run)
    assert sorted(rows) == [0, 2, 4]
    assert "eval/cer/raw" in rows[0] and "eval/reward/test_text_hash" in rows[0]
    final = evaluate_py(data[1], tmp_path / "final", ckpt=str(run / f"checkpoint-{STEPS}"))
    assert_same_metrics(rows[STEPS], final)
    base = evaluate_py(data[1], tmp_path / "base", model="tiny")
    assert_same_metrics(rows[0], base)
    assert (run / "eval" / "step-0.jsonl").is_file()


def test_eval_on_start_false_skips_only_the_base_evaluation(
    data: tuple[Path, Path], tmp_path: Path
) -> None:
    train_file, eval_file = data
    config = small_config(
        train_file,
        tmp_path / "run",
        max_steps=2,
        eval_steps=1,
        eval_on_start=False,
        eval_data=str(eval_file),
    )
    run_dir = train(config, BACKEND)
    assert sorted(eval_rows(run_dir)) == [1, 2]


def test_save_best_keeps_the_best_checkpoint_beside_rotation(run: Path) -> None:
    rows = eval_rows(run)
    values = {step: m["eval/cer/raw"] for step, m in rows.items()}
    best_step = min(values, key=lambda s: (values[s], s))  # the first of equal minima wins
    kept = sorted(p.name for p in (run / "best").iterdir())
    assert kept == [f"checkpoint-{best_step}"]
    info = json.loads((run / "best" / kept[0] / "run.json").read_text())
    assert info["best"] == {"metric": "eval/cer/raw", "value": values[best_step], "step": best_step}
    assert sorted(p.name for p in run.glob("checkpoint-*")) == [f"checkpoint-{STEPS}"]


def test_better_direction_and_settings() -> None:
    assert not higher_is_better("eval/cer/raw") and higher_is_better("eval/accuracy/answer")
    assert improves("eval/accuracy/answer", 0.5, 0.4) and not improves("eval/cer/raw", 0.5, 0.4)
    assert not improves("eval/accuracy/answer", float("nan"), None)
    with pytest.raises(ConfigError, match="save_best"):
        validate(small_config(Path("x"), Path("y"), save_best="eval/cer/raw"))
    with pytest.raises(ConfigError, match="eval_fraction"):
        validate(small_config(Path("x"), Path("y"), eval_steps=1, eval_fraction=1.5))


def test_eval_fraction_holds_out_a_fixed_split(data: tuple[Path, Path], tmp_path: Path) -> None:
    from data import get_task, load_samples
    from grpo.training_eval import split_samples

    samples = load_samples(data[0])
    config = small_config(data[0], tmp_path, eval_steps=1, eval_fraction=0.25)
    kept, held = split_samples(config, get_task("ocr"), samples)
    again = split_samples(config, get_task("ocr"), samples)
    assert len(held) == 2 and len(kept) == 6 and again == (kept, held)
    assert not {s.where for s in held} & {s.where for s in kept}


def test_tensorboard_event_file_holds_every_scalar(run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    rows = read_metrics(run)
    logged = {k for r in rows for k, v in r.items() if k != "step" and v == v}
    assert logged <= tags
    cer = [(e.step, e.value) for e in events.Scalars("eval/cer/raw")]
    assert [s for s, _ in cer] == [0, 2, 4]
    assert cer[0][1] == pytest.approx(eval_rows(run)[0]["eval/cer/raw"])


def test_completions_log_prompt_image_rewards_advantage(run: Path) -> None:
    lines = (run / "completions.jsonl").read_text(encoding="utf-8").splitlines()
    record = json.loads(lines[0])
    assert {"prompt", "image", "completion", "rewards", "reward", "advantage"} <= set(record)
    assert record["image"].endswith(".png") and "test_text_hash" in record["rewards"]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(chromium() is None, reason="chromium is not installed (.ci/run installs it)")
def test_report_opens_in_headless_chromium(run: Path, tmp_path: Path) -> None:
    page = run / "report.html"
    assert page.is_file()
    text = page.read_text(encoding="utf-8")
    assert "<script" not in text and "http://" not in text.replace("http://www.w3.org", "")
    flags = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
    flags += ["--enable-logging=stderr", "--v=0", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(
        [*flags, "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    assert dom.stdout.count("<svg") >= 5 and "<path" in dom.stdout
    assert dom.stdout.count('<img src="data:image/png;base64,') >= 1
    shot = tmp_path / "report.png"
    subprocess.run(
        [*flags, "--window-size=1200,1600", f"--screenshot={shot}", page.as_uri()],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    assert shot.stat().st_size > 10_000
    print(f"report screenshot: {shot}")


def wandb_records(path: Path) -> Iterator[Any]:
    """The protobuf records of a .wandb file: a 7-byte header, then LevelDB's log format
    (32 KiB blocks of [crc32 u32, length u16, type u8] chunks: 1 full, 2 first, 3 middle,
    4 last). wandb 0.31 no longer ships a Python reader for it."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, pending = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # block trailer / padding
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def test_wandb_offline_run_holds_history_and_completions_table(
    data: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = small_config(
        data[0], tmp_path / "run", report_to=["wandb"], log_completions_steps=1, report=False
    )
    run_dir = train(config, BACKEND)
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    (history,) = offline.glob("*.wandb")
    keys = set()
    for record in wandb_records(history):
        if record.WhichOneof("record_type") == "history":
            keys |= {item.key or "/".join(item.nested_key) for item in record.history.item}
    keys = {k.split("/")[0] if k.startswith("completions/") else k for k in keys}
    assert {"reward_mean", "loss", "completions"} <= keys
    tables = list(offline.glob("files/media/table/completions_*.table.json"))
    assert tables, sorted(str(p) for p in offline.rglob("*"))[:40]
    table = json.loads(tables[0].read_text())
    assert "advantage" in table["columns"] and len(table["data"]) == 8


def test_wandb_unreachable_never_blocks_training(
    data: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wandb = pytest.importorskip("wandb")

    def refuse(*args: object, **kwargs: object) -> None:
        if kwargs.get("mode") != "offline":
            raise wandb.errors.CommError("no network")
        raise RuntimeError("offline too")

    monkeypatch.setattr(wandb, "init", refuse)
    config = small_config(data[0], tmp_path / "run", report_to=["wandb"], max_steps=1)
    with pytest.warns(UserWarning, match="W&B unreachable"):
        run_dir = train(config, BACKEND)
    assert len(read_metrics(run_dir)) == 1
    assert os.path.isdir(run_dir / "checkpoint-1")


# --------------------------------------------------------------------------------------------
# Hugging Face datasets as --data
# --------------------------------------------------------------------------------------------


def hf_dataset(n: int = 6, image: str = "image", query: str = "problem") -> Any:
    """A datasets.Dataset with an Image feature (stored as {bytes, path}) and seed columns."""
    datasets = pytest.importorskip("datasets")
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    pictures = [
        Image.fromarray(rng.integers(0, 256, (28, 56, 3), dtype=np.uint8)) for _ in range(n)
    ]
    features = datasets.Features(
        {
            image: datasets.Image(),
            query: datasets.Value("string"),
            "solution": datasets.Value("string"),
        }
    )
    rows = {image: pictures, query: ["读出文字"] * n, "solution": [f"文字{i}" for i in range(n)]}
    return datasets.Dataset.from_dict(rows, features=features)


def test_saved_dataset_and_parquet_shards_train_and_evaluate(tmp_path: Path) -> None:
    from data import load_samples

    saved = tmp_path / "saved"
    hf_dataset().save_to_disk(str(saved))
    shards = tmp_path / "hub" / "data"
    shards.mkdir(parents=True)
    dataset = hf_dataset(8, image="img", query="query")
    for i in range(2):
        dataset.shard(2, i, contiguous=True).to_parquet(
            str(shards / f"train-0000{i}-of-00002.parquet")
        )
    dataset.select(range(3)).to_parquet(str(shards / "test-00000-of-00001.parquet"))
    loaded = load_samples(saved)
    assert len(loaded) == 6 and loaded[0].solution == "文字0" and loaded[0].images[0].open()
    hub = tmp_path / "hub"
    assert len(load_samples(hub, column_map="image=img")) == 8
    assert len(load_samples(hub, split="test", column_map="image=img")) == 3
    config = small_config(
        hub, tmp_path / "run", eval_steps=2, eval_fraction=0.25, column_map="image=img"
    )
    run_dir = train(config, BACKEND)
    assert "eval/cer/raw" in read_metrics(run_dir)[0]


def test_bad_dataset_columns_name_the_dataset_and_the_column(tmp_path: Path) -> None:
    from data import load_samples
    from data.sample import DataError

    saved = tmp_path / "saved"
    hf_dataset(2, query="prompt_text").save_to_disk(str(saved))
    with pytest.raises(DataError, match=r"saved.*missing field 'query'"):
        load_samples(saved)
    with pytest.raises(DataError, match=r"saved.*no column 'nope'"):
        load_samples(saved, column_map="problem=nope")
    shards = tmp_path / "hub"
    shards.mkdir()
    hf_dataset(2).to_parquet(str(shards / "train-00000-of-00001.parquet"))
    with pytest.raises(DataError, match="no split 'validation'"):
        load_samples(shards, split="validation")
