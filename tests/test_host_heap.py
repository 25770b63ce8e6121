"""grpo/host_heap.py: with glibc's mmap threshold fixed, memory torch frees leaves the process.

Each case runs in a fresh interpreter (the threshold is process-wide and only ever set): it
frees one 16 MiB tensor (under glibc's default that raises the threshold to 16 MiB), then
allocates 96 tensors of 8 MiB, frees all but the last and reports how much of the 768 MiB
stayed resident. The default keeps them in its heap below the live one; the fixed threshold
maps each on its own and unmaps it on free.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from tests.launch import ROOT

SCRIPT = """
import json, sys, torch
from grpo import host_heap
fixed = host_heap.fix_mmap_threshold() if sys.argv[1] == "fixed" else None

rss = host_heap.rss_bytes

torch.ones(4 << 20).sum()  # 16 MiB, mapped and freed
before = rss()
blocks = [torch.ones(2 << 20) for _ in range(96)]  # 96 x 8 MiB, every page touched
peak = rss()
del blocks[:-1]
print(json.dumps({"fixed": fixed, "grown": peak - before, "kept": rss() - before}))
"""


def freed_and_kept(arm: str) -> dict:
    command = [sys.executable, "-c", SCRIPT, arm]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_tensors_leave_the_process_only_with_the_threshold_fixed() -> None:
    fixed, default = freed_and_kept("fixed"), freed_and_kept("default")
    assert fixed["fixed"] is True
    for case in (fixed, default):  # the blocks were resident: the measure can see them
        assert case["grown"] > 700 * 2**20, case
    assert fixed["kept"] < 64 * 2**20, fixed  # the one live block, 8 MiB
    assert default["kept"] > 600 * 2**20, default  # what the fix is for
