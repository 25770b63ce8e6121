"""How fast this machine hands a process fresh memory, against memory it already holds.

A tensor's first write to a page makes the kernel supply it (a page fault, a zeroed page); in a
virtual machine whose host backs guest memory lazily and takes freed memory back, that can cost
far more than the write. The test suite's big cases (tests/test_real_shapes_pipeline.py) touch
tens of GB of fresh memory, so this rate, not the CPU, sets their time. On this project's
2-vCPU VM the same suite took 30 min one day and 51 min the next (kernel time 8 min against
27; the Qwen2.5-VL-3B case alone 102 s against 338 s). That day a 1 GiB block was still fresh
at 2.4 GB/s but a 2 GiB one at 0.2 GB/s (6 GiB: 0.1-0.4 GB/s, against 2.2 GB/s earlier the same
day), while memory already held was rewritten at ~17 GB/s throughout; torch's
THP_MEM_ALLOC_ENABLE=1 did not change the case's time. In CI (CI set) pytest prints the 2 GiB
figure in its header (tests/conftest.py), so a slow CI run says why.

    python bench/memory_touch.py [--mib 2048]
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def touch_rates(nbytes: int) -> dict[str, float]:
    """GB/s writing `nbytes` into a new float32 tensor (fresh pages) and then again into the
    same tensor (pages the process already holds)."""
    start = time.perf_counter()
    block = torch.empty(nbytes // 4, dtype=torch.float32)  # [n]
    block.fill_(1.0)
    fresh = time.perf_counter() - start
    start = time.perf_counter()
    block.fill_(2.0)
    reused = time.perf_counter() - start
    gb = nbytes / 1e9
    return {"fresh_gb_per_s": gb / fresh, "reused_gb_per_s": gb / max(reused, 1e-9)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=2048, help="block size in MiB")
    args = parser.parse_args()
    rates = touch_rates(args.mib << 20)
    print(json.dumps({"mib": args.mib} | {k: round(v, 2) for k, v in rates.items()}))


if __name__ == "__main__":
    main()
