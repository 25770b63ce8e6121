"""How fast are the rewards? Prints figures; asserts nothing.

    python bench/rewards.py [--quick]

1. Weighted edit distance, pairs per second, by line length: the Python DP, the NumPy
   row DP and the dispatcher `weighted_edit_distance` (strips common affixes, then picks),
   next to rapidfuzz's C++ unweighted Levenshtein for scale. "noisy" pairs are a reference
   and a copy with ~10% of characters edited (a policy that mostly reads the line right);
   "random" pairs share nothing (a policy that writes garbage; the DP's worst case).
2. Every built-in reward on a GRPO-sized batch (16 completions), milliseconds per call.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

# This file is called rewards.py too: put the repository first so `import rewards` finds
# the package, not this script.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rapidfuzz.distance import Levenshtein

from bench.record import append_result
from rewards import get_reward
from rewards.edit_distance import (
    ImportantChars,
    _distance_numpy,
    _distance_python,
    weighted_edit_distance,
)
from rewards.ocr import DEFAULT_IMPORTANT_CHARS

ALPHABET = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可也你" + (
    "abcdefghijklmnopqrstuvwxyz0123456789¥$.,:- "
)
WEIGHT = ImportantChars(DEFAULT_IMPORTANT_CHARS, 2.0)


def noisy_copy(text: str, rate: float, rng: random.Random) -> str:
    """text with about `rate` of its characters substituted, deleted or duplicated."""
    out = []
    for c in text:
        roll = rng.random()
        if roll < rate / 3:
            out.append(rng.choice(ALPHABET))
        elif roll < 2 * rate / 3:
            continue
        elif roll < rate:
            out.append(c + c)
        else:
            out.append(c)
    return "".join(out)


def make_pairs(length: int, count: int, kind: str, rng: random.Random) -> list[tuple[str, str]]:
    pairs = []
    for _ in range(count):
        ref = "".join(rng.choices(ALPHABET, k=length))
        other = (
            noisy_copy(ref, 0.1, rng)
            if kind == "noisy"
            else "".join(rng.choices(ALPHABET, k=length))
        )
        pairs.append((other, ref))
    return pairs


def pairs_per_second(fn: Callable[[str, str], float], pairs: list[tuple[str, str]]) -> float:
    """Best of three passes over the pairs."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for a, b in pairs:
            fn(a, b)
        best = min(best, time.perf_counter() - start)
    return len(pairs) / best


def bench_edit_distance(quick: bool) -> None:
    rng = random.Random(0)
    implementations: dict[str, Callable[[str, str], float]] = {
        "python DP": lambda a, b: _distance_python(a, b, WEIGHT),
        "numpy DP": lambda a, b: _distance_numpy(a, b, WEIGHT),
        "dispatcher": lambda a, b: weighted_edit_distance(a, b, WEIGHT),
        "rapidfuzz (unweighted)": Levenshtein.distance,
    }
    print("weighted edit distance, pairs/s (higher is better)")
    print(f"{'length':>6} {'pairs':>6}  " + "".join(f"{name:>24}" for name in implementations))
    for length in [10, 20, 40, 80, 200] + ([] if quick else [1000]):
        for kind in ("noisy", "random"):
            count = max(3, (2000 if quick else 20000) // (length * length) * 10)
            pairs = make_pairs(length, count, kind, rng)
            rates = [pairs_per_second(fn, pairs) for fn in implementations.values()]
            label = f"{length:>6} {kind:>6}  "
            print(label + "".join(f"{rate:>24,.0f}" for rate in rates))
            rows = dict(zip(implementations, (round(r) for r in rates), strict=True))
            append_result("edit_distance", {"length": length, "kind": kind, "pairs_per_s": rows})


def bench_rewards() -> None:
    rng = random.Random(1)
    batch = 16
    lines = ["".join(rng.choices(ALPHABET, k=30)) for _ in range(batch)]
    cases = {
        "ocr": (
            [f"<think>reading</think><answer>{noisy_copy(t, 0.1, rng)}</answer>" for t in lines],
            lines,
        ),
        "format": (["<think>x</think><answer>1</answer>"] * batch, ["1"] * batch),
        "format_strict": (["<think>\nx\n</think>\n<answer>\n1\n</answer>"] * batch, ["1"] * batch),
        "math": (
            [rf"<answer>\frac{{{i}}}{{{i + 1}}}</answer>" for i in range(batch)],
            [f"{i}/{i + 1}" for i in range(batch)],
        ),
        "count": ([f"<answer>{i % 5}</answer>" for i in range(batch)], ["3"] * batch),
        "boxed": ([rf"so \boxed{{{i}}}" for i in range(batch)], ["#### 7"] * batch),
        "content": (
            [f"<answer>It weighs {i} kg and costs ¥30</answer>" for i in range(batch)],
            ["It weighs 3 kg and costs ¥30"] * batch,
        ),
    }
    print(f"\nbuilt-in rewards, ms per batch of {batch} (lower is better)")
    for name, (completions, solutions) in cases.items():
        fn = get_reward(name)
        fn(completions, solution=solutions)  # warm up (math-verify's first parse is slow)
        runs = 5
        start = time.perf_counter()
        for _ in range(runs):
            fn(completions, solution=solutions)
        ms = (time.perf_counter() - start) / runs * 1e3
        print(f"{name:>14}: {ms:8.2f} ms")
        append_result("rewards", {"reward": name, "batch": batch, "ms_per_batch": round(ms, 3)})


def main() -> None:
    quick = "--quick" in sys.argv[1:]
    bench_edit_distance(quick)
    bench_rewards()


if __name__ == "__main__":
    main()
