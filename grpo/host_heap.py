"""On the CPU the host heap is the device memory: glibc's malloc kept from sitting on what
torch frees (--cpu-lean-heap), and what the process holds (rss_bytes, peak_rss_bytes).

glibc serves an allocation of at least M_MMAP_THRESHOLD bytes with a mapping of its own, which
free() hands straight back to the kernel; smaller ones come from its arenas, which keep freed
memory for later requests. The threshold starts at 128 KiB, but by default it rises to the
size of each mapped block that is freed, up to 32 MiB. A training step allocates and frees
tensors of every size, so after the first one almost every activation lives in the arenas,
fragmented by size, and the process stays resident well above what it holds: a 2-prompt x 4
SmolLM2-135M LoRA step peaked at 2.16 GB with the default and 1.77 GB with the threshold
fixed, where the tensors alive at the peak add up to about 1.7 GB.

Setting the threshold explicitly also turns its growth off (mallopt(3)). Large tensors then
cost one mmap/munmap pair and their first-touch page faults each, and that is not cheap: the
same SmolLM2 step took 37.9 s against 28.3 s (bench/host_heap.py; 1 MiB and larger fixed
thresholds, malloc_trim between phases and fewer arenas keep the speed but save <7%). So the
trainer fixes it only under --cpu-lean-heap, for a CPU run short of memory and for the
plan check (bench/plan_check.py), which compares the plan with what torch holds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import resource

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # mallopt's parameter number (glibc malloc.h)
MMAP_THRESHOLD_BYTES = 128 << 10  # glibc's starting value, kept: 1 MiB saved little (2.05 GB)


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """mallopt(M_MMAP_THRESHOLD, threshold) in this process; False where the C library is not
    glibc (nothing changes then: musl and macOS's allocators have no such knob)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    done = bool(mallopt(M_MMAP_THRESHOLD, threshold))
    if not done:
        log.warning("mallopt(M_MMAP_THRESHOLD, %d) refused; the heap keeps its default", threshold)
    return done


def rss_bytes() -> int:
    """This process's resident set now (/proc/self/statm's second field, in pages; Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's own peak resident set: /proc/self/status VmHWM (Linux).

    Not getrusage's ru_maxrss: Linux carries a parent's high-water mark into its child across
    fork (or vfork, as Python's subprocess uses) and exec, so a worker started by a 3 GB
    process reports at least 3 GB however little it touches. VmHWM belongs to the address
    space exec made. ru_maxrss only where /proc is absent."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
