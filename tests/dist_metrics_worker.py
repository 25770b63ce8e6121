"""Run by test_metrics under torchrun: ranks report different metric keys and NaN."""

from __future__ import annotations

import json
import math
import sys

from grpo import distributed
from grpo.metrics import reduce_metrics
from tests.launch import cleanup_checked


def main(out: str) -> None:
    info = distributed.init_distributed()
    metrics = {
        "reward_mean": 1.0 + info.rank,
        "length_max": float(info.rank),
        "length_min": float(info.rank),
        "kl": math.nan if info.rank == 0 else 0.5,
    }
    if info.rank == 1:
        metrics["loss"] = 3.0  # rank 0 had no row with signal, so no loss statistics
    reduced = reduce_metrics(metrics)
    with open(f"{out}.rank{info.rank}", "w") as f:
        json.dump(reduced, f)
    cleanup_checked()


if __name__ == "__main__":
    main(sys.argv[1])
