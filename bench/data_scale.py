"""How long does loading a large data set take, and how much memory? Prints figures; asserts
nothing.

    python bench/data_scale.py [--sizes 20000,100000] [--workers 2] [--dir DIR]

For each size it builds (once, into DIR or a temporary folder) a format-(a) JSONL naming small
text-line PNGs and a Parquet file embedding the same PNGs (row groups of 1,000), then times
`load_samples` in a fresh process each time:

- first start: empty image-check cache, images decoded by `--workers` processes;
- restart:     the cache written by the first start (no image is decoded);
- serial:      one process, no cache (the old behaviour), for the 20k JSONL only.

Figures: seconds per 1,000 images, and peak RSS of the loading process and of its workers
(resource.getrusage; Linux reports kilobytes). The last line is one JSON object of them all.
Linux keeps the parent's peak across fork+exec in ru_maxrss, so data sets are built and
measured in child processes and this one stays small; the workers' figure still includes the
loading process's size when it started them (an upper bound), VmHWM is the loader's own.
Images are 24 distinct renders of data/synthetic_ocr.py, hard-linked under 100k names, so
100k lines take seconds to build; decoding cost is per file either way.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.record import append_result
from grpo import host_heap

DISTINCT = 24
ROW_GROUP = 1000


def build(folder: Path, n: int) -> tuple[Path, Path]:
    """(JSONL, Parquet) with `n` lines each under `folder`; reused if already there."""
    jsonl, parquet = folder / f"train_{n}.jsonl", folder / f"train_{n}.parquet"
    if jsonl.is_file() and parquet.is_file():
        return jsonl, parquet
    seeds = _renders(folder / "renders")
    images = folder / f"images_{n}"
    images.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        source, text = seeds[i % len(seeds)]
        target = images / f"{i:06d}.png"
        if not target.exists():
            try:
                os.link(source, target)
            except OSError:  # another file system: copy instead
                shutil.copyfile(source, target)
        records.append({"query": "<image>read", "response": text, "image_path": str(target)})
    with jsonl.open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    _write_parquet(parquet, records)
    return jsonl, parquet


def _renders(folder: Path) -> list[tuple[Path, str]]:
    from data.synthetic_ocr import generate_ocr_dataset

    jsonl = folder / "train.jsonl"
    if not jsonl.is_file():
        generate_ocr_dataset(folder, n=DISTINCT, seed=0)
    lines = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    return [(folder / r["image_path"], r["response"]) for r in lines]


def _write_parquet(path: Path, records: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cache: dict[str, bytes] = {}
    schema = None
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".parquet", delete=False) as tmp:
        writer = None
        for start in range(0, len(records), ROW_GROUP):
            chunk = records[start : start + ROW_GROUP]
            images = []
            for r in chunk:
                real = os.path.realpath(r["image_path"])
                cache.setdefault(real, Path(real).read_bytes())
                images.append({"bytes": cache[real], "path": Path(r["image_path"]).name})
            table = pa.table(
                {
                    "image": images,
                    "problem": [r["query"] for r in chunk],
                    "solution": [r["response"] for r in chunk],
                }
            )
            schema = schema or table.schema
            writer = writer or pq.ParquetWriter(tmp.name, schema)
            writer.write_table(table, row_group_size=ROW_GROUP)
        writer.close()
    os.replace(tmp.name, path)


def measure(path: Path, workers: int, cache: str) -> dict:
    """Run in a fresh process: load `path`, report time and peak RSS."""
    from data import load_samples

    start = time.perf_counter()
    samples = load_samples(path, workers=workers, cache=False if cache == "off" else cache)
    seconds = time.perf_counter() - start
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # includes the parent's
    workers_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    n = sum(len(s.images) for s in samples)
    return {
        "images": n,
        "seconds": seconds,
        "peak_rss_mb": own,
        "vm_hwm_mb": host_heap.peak_rss_bytes() / 2**20,
        "worker_peak_rss_mb": workers_rss,
    }


def run(path: Path, workers: int, cache: str) -> dict:
    command = [sys.executable, __file__, "--measure", str(path), "--workers", str(workers)]
    out = subprocess.run([*command, "--cache", cache], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(name: str, figures: dict) -> None:
    per_k = figures["seconds"] / figures["images"] * 1000
    print(
        f"{name:<34} {figures['images']:>7} images  {figures['seconds']:7.2f} s  "
        f"{per_k:6.3f} s/1k  RSS {figures['peak_rss_mb']:5.0f} MB "
        f"(VmHWM {figures['vm_hwm_mb']:5.0f})  "
        f"workers <= {figures['worker_peak_rss_mb']:4.0f} MB",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="20000,100000")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache", default="off", help=argparse.SUPPRESS)
    parser.add_argument("--build", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure is not None:
        print(json.dumps(measure(args.measure, args.workers, args.cache)))
        return
    if args.build is not None:
        print(json.dumps([str(p) for p in build(args.dir, args.build)]))
        return
    folder = args.dir or Path(tempfile.mkdtemp(prefix="vlgrpo-data-scale-"))
    results: dict[str, dict] = {}
    for n in (int(s) for s in args.sizes.split(",")):
        start = time.perf_counter()
        command = [sys.executable, __file__, "--build", str(n), "--dir", str(folder)]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        jsonl, parquet = (Path(p) for p in json.loads(out.strip().splitlines()[-1]))
        print(f"built {n} lines in {time.perf_counter() - start:.1f} s under {folder}", flush=True)
        if n == 20000:
            results[f"jsonl_{n}_serial_nocache"] = run(jsonl, 1, "off")
            report(f"jsonl {n} serial, no cache", results[f"jsonl_{n}_serial_nocache"])
        for kind, path in (("jsonl", jsonl), ("parquet", parquet)):
            cache = folder / f"cache_{kind}_{n}"
            shutil.rmtree(cache, ignore_errors=True)
            for phase in ("first", "restart"):
                key = f"{kind}_{n}_{phase}"
                results[key] = run(path, args.workers, str(cache))
                report(f"{kind} {n} {phase} ({args.workers} workers)", results[key])
    line = {"bench": "data_scale", "workers": args.workers, **results}
    print(json.dumps(line))
    append_result("data_scale", {k: v for k, v in line.items() if k != "bench"})


if __name__ == "__main__":
    main()
