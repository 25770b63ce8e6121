"""Where the numbers of a run go: JSONL on disk, TensorBoard, a progress bar, a reward plot.

Only rank 0 writes. Per-step metrics are averaged across ranks first (`reduce_metrics`).
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from grpo import distributed


class Stopwatch:
    """Seconds spent per named phase of a step: `with timer("sample"): ...` adds to
    `timer.seconds["sample"]` (phases may nest and repeat)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        tic = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - tic


def mean_of(dicts: list[dict[str, float]]) -> dict[str, float]:
    """Key-wise mean of dicts that share their keys (those of the first)."""
    return {k: sum(d[k] for d in dicts) / len(dicts) for k in dicts[0]}


def reduce_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Average metrics over ranks; keys ending in _max / _min take the max / min instead.

    A rank may lack a key (no row with signal: no loss statistics) or hold NaN: the mean is
    over the ranks that have a finite value, NaN when none has.
    """
    if not distributed.is_distributed() or distributed.get_world_size() == 1:
        return metrics
    key_sets: list[list[str]] = [[] for _ in range(distributed.get_world_size())]
    dist.all_gather_object(key_sets, sorted(metrics))
    keys = sorted(set().union(*key_sets))
    out: dict[str, float] = {}
    for suffix, op, fill in (
        ("_max", dist.ReduceOp.MAX, -math.inf),
        ("_min", dist.ReduceOp.MIN, math.inf),
    ):
        chosen = [k for k in keys if k.endswith(suffix)]
        values = torch.tensor(
            [_finite_or(metrics.get(k), fill) for k in chosen], dtype=torch.float64
        )  # [K]
        dist.all_reduce(values, op=op)
        out.update(
            {
                k: v if math.isfinite(v) else math.nan
                for k, v in zip(chosen, values.tolist(), strict=True)
            }
        )
    chosen = [k for k in keys if k not in out]
    present = torch.tensor(
        [_finite_or(metrics.get(k), math.nan) for k in chosen], dtype=torch.float64
    )  # [K]
    sums = torch.stack([present.nan_to_num(0.0), (~present.isnan()).double()])  # [2, K]
    dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    out.update(
        {
            k: (s / c if c else math.nan)
            for k, s, c in zip(chosen, sums[0].tolist(), sums[1].tolist(), strict=True)
        }
    )
    return out


def _finite_or(value: float | None, fallback: float) -> float:
    return value if value is not None and math.isfinite(value) else fallback


class MetricsLogger:
    """Rank 0's logs in the run dir: metrics.jsonl and completions.jsonl (always), TensorBoard
    (on by default: every scalar), W&B (--report-to wandb: grpo/wandb_log.py) and report.html
    (grpo/report.py, rebuilt by `saved` and `close`)."""

    def __init__(
        self, run_dir: Path, enabled: bool, tensorboard: bool, config: Any | None = None
    ) -> None:
        self.enabled = enabled
        self.run_dir = run_dir
        self.writer = None
        self.wandb = None
        self.report = enabled and (config is None or config.report)
        if enabled and tensorboard:
            self.writer = tensorboard_writer(run_dir)
        if enabled and config is not None and "wandb" in config.report_to:
            from grpo.wandb_log import start_wandb

            self.wandb = start_wandb(run_dir, config)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with (self.run_dir / "metrics.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        finite = {k: v for k, v in metrics.items() if math.isfinite(v)}
        if self.writer is not None:
            for key, value in finite.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()  # readable while the run goes on
        if self.wandb is not None:
            self.wandb.log(finite, step=step)

    def completions(self, step: int, records: list[dict[str, Any]]) -> None:
        """Every completion to completions.jsonl (and a W&B table); a few prompts with image
        thumbnails to report_samples.jsonl for the report."""
        if not self.enabled:
            return
        public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in records]
        with (self.run_dir / "completions.jsonl").open("a", encoding="utf-8") as f:
            for record in public:
                f.write(json.dumps({"step": step, **record}, ensure_ascii=False) + "\n")
        if self.report:
            from grpo.report import SAMPLES_FILE, sample_entries

            with (self.run_dir / SAMPLES_FILE).open("a", encoding="utf-8") as f:
                for entry in sample_entries(step, records):
                    f.write(json.dumps(entry, ensure_ascii=False) + "\n")
        if self.wandb is not None:
            from grpo.wandb_log import completions_table

            self.wandb.log({"completions": completions_table(step, public)}, step=step)

    def saved(self) -> None:
        """A checkpoint was written: rebuild report.html."""
        if self.report:
            from grpo.report import write_report

            write_report(self.run_dir)

    def close(self) -> None:
        self.saved()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def tensorboard_writer(run_dir: Path) -> Any | None:
    """A SummaryWriter on <run>/tensorboard, or None with a warning if tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # in install_requires, but a hand-made environment may lack it
        import warnings

        warnings.warn("tensorboard is not installed: logging to JSONL only", stacklevel=3)
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def cut_logs_back(run_dir: Path, step: int) -> None:
    """Keep only the lines of metrics.jsonl and completions.jsonl up to `step`.

    A run killed after logging steps its last checkpoint does not hold redoes them on resume;
    without this they would appear twice. A line cut short by the kill is dropped too. Each
    file is replaced by rename, so a kill here leaves the old file or the new one.
    """
    for name in ("metrics.jsonl", "completions.jsonl", "report_samples.jsonl"):
        path = run_dir / name
        if not path.is_file():
            continue
        kept = [line for line in path.read_text(encoding="utf-8").splitlines() if _upto(line, step)]
        tmp = path.with_name(f".{name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        tmp.replace(path)


def _upto(line: str, step: int) -> bool:
    try:
        return json.loads(line)["step"] <= step
    except (ValueError, KeyError, TypeError):  # torn by a kill, or not a record
        return False


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_rewards(run_dir: Path) -> Path | None:
    """reward_curve.png: mean reward per step (and per reward function), with a moving average."""
    rows = [r for r in read_metrics(run_dir) if "reward_mean" in r]  # not eval-only rows
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    per_function = sorted(k for k in rows[0] if k.startswith("reward/") and k.endswith("_mean"))
    keys = ["reward_mean", *per_function]
    for key in keys:
        values = [r.get(key, float("nan")) for r in rows]
        ax.plot(steps, values, label=key, linewidth=1.5 if key == "reward_mean" else 0.8)
    window = max(1, len(rows) // 10)
    if window > 1:
        values = [r["reward_mean"] for r in rows]
        smooth = [
            sum(values[max(0, i - window + 1) : i + 1])
            / len(values[max(0, i - window + 1) : i + 1])
            for i in range(len(values))
        ]
        ax.plot(steps, smooth, "k--", label=f"reward_mean (moving avg {window})")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    out = run_dir / "reward_curve.png"
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
