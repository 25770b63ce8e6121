"""Append a benchmark's result to bench/results.jsonl, stamped with the commit and the machine.

Every bench script calls `append_result(bench, record)` once per result it prints, so the file
is a history: a regression shows as a diff between two commits' lines on the same machine.
One line is

    {"bench": ..., "commit": <git rev-parse HEAD>, "dirty": bool, "time": ISO-8601 UTC,
     "machine": {"nproc", "cpu", "torch", "load"}, **record}

Set BENCH_RESULTS to another path (or to "" to record nothing, e.g. in tests).
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results.jsonl"


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    return done.stdout.strip()


# stamped when the bench starts (it imports this module), not when it ends: a long bench must
# not take the commit that HEAD moved to meanwhile
COMMIT = _git("rev-parse", "HEAD")
# bench/results.jsonl itself left out: the benches append to it, so it is dirty after any run
DIRTY = bool(
    _git(
        "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench/results.jsonl"
    )
)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("" where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def machine() -> dict[str, Any]:
    """nproc, CPU model, torch version and the 1-minute load average (benches share cores)."""
    import torch

    return {
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "load_1min": round(os.getloadavg()[0], 2),
    }


def append_result(bench: str, record: dict[str, Any]) -> dict[str, Any]:
    """Stamp `record` and append it as one JSON line; returns the stamped line."""
    line = {
        "bench": bench,
        "commit": COMMIT,
        "dirty": DIRTY,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        **record,
    }
    target = os.environ.get("BENCH_RESULTS", str(RESULTS))
    if target:
        with open(target, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
    return line
