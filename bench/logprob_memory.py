"""Peak memory of the completion log-prob computation: chunked `token_logprobs` vs the naive
full-vocabulary float32 log_softmax.

Both variants score rows x tokens completion tokens against the real Qwen2.5 vocabulary
(151,936) and run forward + backward of sum(logp):

- chunked: models.logprobs.token_logprobs (float32 logits of chunk_tokens tokens at a time,
  recomputed in backward), as the trainer runs it;
- naive: logits = hidden @ W^T over every token, log_softmax(logits.float() / T), gather, as
  models.logprobs.naive_completion_logprobs does after the model's forward.

Each measurement runs in a fresh subprocess: peak RSS (VmHWM) minus the RSS just
before the computation, with the inputs already allocated. The naive variant keeps several
float32 [rows, tokens, V] tensors alive (~0.6 GiB per row of 1024 tokens each), so it is
measured at as many rows as fit in --budget-gib and extrapolated linearly to --rows; the
extrapolation is labelled as such. The hidden size only sets the inputs' size, not the
[tokens, V] logits that dominate: 64 (the tiny model) keeps the run short on a CPU.

    python bench/logprob_memory.py                 # 16 x 1024 tokens, hidden 64
    python bench/logprob_memory.py --hidden 2048   # Qwen2.5-VL-3B's width (slow on a CPU)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

GIB = 1024**3
MIB = 1024**2
NAIVE_FULL_TENSORS = 4  # logits, logits / T, log_softmax output, its gradient (measured)


@dataclass(frozen=True)
class Setup:
    rows: int
    tokens: int
    vocab: int
    hidden: int
    chunk_tokens: int
    temperature: float
    weight_grad: bool


def run_variant(variant: str, setup: Setup) -> dict:
    """Measure one variant in this process; call in a fresh process only."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from grpo.host_heap import peak_rss_bytes, rss_bytes
    from models.logprobs import token_logprobs

    gen = torch.Generator().manual_seed(0)
    shape = (setup.rows, setup.tokens)
    hidden = torch.randn(*shape, setup.hidden, generator=gen).requires_grad_()  # [R, T, H]
    weight = (0.02 * torch.randn(setup.vocab, setup.hidden, generator=gen)).requires_grad_(
        setup.weight_grad
    )  # [V, H]
    targets = torch.randint(0, setup.vocab, shape, generator=gen)  # [R, T]
    mask = torch.ones(shape)  # [R, T]: every token scored, the worst case

    peak_before, baseline = peak_rss_bytes(), rss_bytes()
    start = time.perf_counter()
    if variant == "chunked":
        logp = token_logprobs(
            hidden, weight, targets, mask, setup.temperature, chunk_tokens=setup.chunk_tokens
        ).logp  # [R, T]
    else:
        logits = hidden @ weight.T  # [R, T, V]
        logp_all = F.log_softmax(logits.float() / setup.temperature, dim=-1)  # [R, T, V]
        logp = logp_all.gather(-1, targets[..., None]).squeeze(-1) * mask  # [R, T]
    logp.sum().backward()
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes()
    return {
        "variant": variant,
        **asdict(setup),
        "measured": True,
        "peak_delta_mib": round((peak - baseline) / MIB, 1),
        "baseline_rss_mib": round(baseline / MIB, 1),
        "peak_exceeded_baseline_high_water": peak > peak_before,
        "seconds": round(seconds, 2),
        "torch_threads": torch.get_num_threads(),
    }


def measure(variant: str, setup: Setup) -> dict:
    """Run `variant` in a fresh interpreter and return its JSON record."""
    command = [sys.executable, os.path.abspath(__file__), "--worker", variant]
    for key, value in asdict(setup).items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            command += [flag] if value else []
        else:
            command += [flag, str(value)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{variant} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def naive_rows_within(budget_bytes: float, setup: Setup) -> list[int]:
    """Row counts (powers of two up to setup.rows) whose naive run fits in the budget."""
    per_row = NAIVE_FULL_TENSORS * setup.tokens * setup.vocab * 4
    rows, r = [], 1
    while r <= setup.rows and r * per_row <= budget_bytes:
        rows.append(r)
        r *= 2
    if setup.rows not in rows and setup.rows * per_row <= budget_bytes:
        rows.append(setup.rows)
    return rows


def linear_fit(xs: list[int], ys: list[float]) -> tuple[float, float]:
    """Least-squares (a, b) of y = a + b * x."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else my / mx
    return my - b * mx, b


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=1024, help="completion tokens per row")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--chunk-tokens", type=int, default=1024)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument(
        "--weight-grad",
        action="store_true",
        help="also differentiate w.r.t. the output projection (frozen under LoRA: off)",
    )
    parser.add_argument(
        "--budget-gib", type=float, default=14.0, help="largest naive run to attempt"
    )
    parser.add_argument("--worker", choices=["chunked", "naive"], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup = Setup(
        args.rows,
        args.tokens,
        args.vocab,
        args.hidden,
        args.chunk_tokens,
        args.temperature,
        args.weight_grad,
    )
    if args.worker:
        print(json.dumps(run_variant(args.worker, setup)), flush=True)
        return

    def at(rows: int) -> Setup:
        return Setup(**{**asdict(setup), "rows": rows})

    naive_rows = naive_rows_within(args.budget_gib * GIB, setup)
    records = []
    for rows in sorted({*naive_rows, setup.rows}):
        records.append(measure("chunked", at(rows)))
        print(json.dumps(records[-1]), flush=True)
    for rows in naive_rows:
        records.append(measure("naive", at(rows)))
        print(json.dumps(records[-1]), flush=True)
    naive = [r for r in records if r["variant"] == "naive"]
    if naive and naive[-1]["rows"] != setup.rows:
        xs, ys = [r["rows"] for r in naive], [r["peak_delta_mib"] for r in naive]
        a, b = linear_fit(xs, ys)
        records.append(
            {
                "variant": "naive",
                **asdict(setup),
                "measured": False,
                "extrapolated_from_rows": xs,
                "fit_mib": f"{a:.1f} + {b:.1f} * rows",
                "peak_delta_mib": round(a + b * setup.rows, 1),
            }
        )
        print(json.dumps(records[-1]), flush=True)
    print_table(records, setup)
    from bench.record import append_result

    for record in records:
        append_result("logprob_memory", record)


def print_table(records: list[dict], setup: Setup) -> None:
    full = setup.rows * setup.tokens * setup.vocab * 4 / GIB
    print(
        f"\nforward+backward log-probs of {setup.rows} x {setup.tokens} completion tokens, "
        f"vocab {setup.vocab}, hidden {setup.hidden}, chunk_tokens {setup.chunk_tokens}, "
        f"grad w.r.t. {'hidden and weight' if setup.weight_grad else 'hidden only'}; "
        f"one float32 [{setup.rows}, {setup.tokens}, V] tensor = {full:.2f} GiB"
    )
    print(f"{'variant':<8} {'rows':>5} {'peak - baseline':>16} {'seconds':>8}  note")
    for r in records:
        note = (
            "measured"
            if r["measured"]
            else (f"EXTRAPOLATED linearly from rows {r['extrapolated_from_rows']}")
        )
        if r["measured"] and not r["peak_exceeded_baseline_high_water"]:
            note += " (lower bound: peak did not pass the earlier high-water mark)"
        seconds = f"{r['seconds']:.1f}" if "seconds" in r else "-"
        delta = f"{r['peak_delta_mib'] / 1024:.2f} GiB"
        print(f"{r['variant']:<8} {r['rows']:>5} {delta:>16} {seconds:>8}  {note}")


if __name__ == "__main__":
    main()
