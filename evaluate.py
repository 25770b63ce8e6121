"""Evaluate a trained checkpoint, or merge its adapter into a full model.

    python evaluate.py --ckpt runs/ocr/checkpoint-100                 # task, base from run.json
    python evaluate.py --ckpt runs/ocr/checkpoint-100 --compare-base  # plus base, and deltas
    python evaluate.py --ckpt merged/                                 # a merged model directory
    python evaluate.py --model tiny --task ocr --data val.jsonl       # a plain model
    python evaluate.py export --ckpt runs/ocr/checkpoint-100 --out merged/

Metrics and outputs: grpo/evaluation.py and docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

import models  # the torchvision shim must precede transformers' imports
from grpo.checkpoint import CheckpointError, resolve_source
from grpo.evaluation import EvalSettings, evaluate, policy_settings
from models.export import (
    check_output_dir,
    check_same_base,
    export_merged,
    load_policy,
    stored_dtype,
)
from models.loading import ModelLoadError

EPILOG = """\
--ckpt accepts a checkpoint-N directory (adapter + run.json; the base model it names is
loaded, or --model, which must be the same architecture), a full fine-tuning checkpoint-N
(model/ + run.json: its model is loaded; --model, if given, must be the same architecture and
is the base --compare-base scores), a run directory (its latest checkpoint), or a merged model
directory. Without --ckpt, --model is evaluated as is.

Export (merge the LoRA adapter into the base weights, save a full model directory that
transformers and vLLM load like the original):
    python evaluate.py export --ckpt runs/ocr/checkpoint-100 --out merged/
    python evaluate.py export --help
"""


def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evaluate.py",
        description="Greedy evaluation of a checkpoint on a validation set",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--ckpt", help="checkpoint-N dir, run dir, or merged model dir")
    p.add_argument("--model", help="base model (name, path or 'tiny'); the model without --ckpt")
    p.add_argument("--task", help="task name (default: the checkpoint's task, else ocr)")
    p.add_argument("--data", help="validation data in any supported format (default: built-in)")
    p.add_argument("--limit", type=int, help="evaluate the first N samples only")
    p.add_argument("--skip-bad-samples", action="store_true", help="drop unreadable samples")
    p.add_argument("--batch-size", type=int, help="prompts per generate call (default 8/64)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--sampler", choices=["hf", "vllm"], help="default: vllm on CUDA if installed")
    p.add_argument("--compare-base", action="store_true", help="also evaluate the base model")
    p.add_argument("--out", help="output dir (default: <run>/eval/checkpoint-N or ./eval-<model>)")
    p.add_argument("--train-prompt", action="store_true", help="use the training prompt")
    p.add_argument("--rewards", help="reward means to report, 'name:w,...' (default: task's)")
    p.add_argument("--reward-plugin", action="append", default=[], help="file registering rewards")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--attn-implementation")
    p.add_argument("--min-pixels", type=int, help="default: the training run's setting")
    p.add_argument("--max-pixels", type=int, help="default: the training run's setting")
    p.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.5)
    p.add_argument("--vllm-max-model-len", type=int, default=4096)
    return p


def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evaluate.py export",
        description="Merge a checkpoint's LoRA adapter into its base model and save the full "
        "model (safetensors, config, generation config, processor, tokenizer, chat template)",
    )
    p.add_argument("--ckpt", required=True, help="checkpoint-N dir (or run dir: latest)")
    p.add_argument("--out", required=True, help="directory to write the merged model to")
    p.add_argument("--model", help="base model location, if not the one in run.json")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default: base's")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return p


def format_table(summary: dict[str, Any]) -> str:
    """The metrics as aligned text columns: metric, model[, base, delta]."""
    metrics, base = summary["metrics"], summary.get("base_metrics")
    delta = summary.get("delta", {})
    lines = [["metric", "model"] + (["base", "delta"] if base else [])]
    for name, value in metrics.items():
        row = [name, f"{value:.4f}"]
        if base:
            row += [f"{base[name]:.4f}", f"{delta[name]:+.4f}" if name in delta else ""]
        lines.append(row)
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    aligned = [
        [
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ]
        for line in lines
    ]
    return "\n".join("  ".join(cells).rstrip() for cells in aligned)


def export_checkpoint(
    ckpt: str,
    out: str,
    model: str | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Merge a checkpoint's adapter into its base and save the full model to `out`; a full
    fine-tuning checkpoint's model/ is written out the same way (nothing to merge: a copy in
    `dtype`, with export_info.json naming the base and the checkpoint).

    dtype: of the saved weights; None: the dtype the base model is stored in.
    """
    source = resolve_source(ckpt, model, check_same_base)
    if source.adapter is None and source.kind != "checkpoint":
        raise CheckpointError(f"--ckpt {ckpt}: has no adapter to merge (already a full model)")
    check_output_dir(Path(out), overwrite)  # before minutes of loading, not after
    dtype = dtype or stored_dtype(source.model)
    settings = replace(policy_settings(EvalSettings(), source), dtype=dtype)
    policy = load_policy(source.model, source.adapter, settings, torch.device("cpu"))
    info = {
        "base_model": source.run.get("base_model", source.model),
        "base_model_path": source.base or source.model,  # a full checkpoint's model/ is not
        "checkpoint": str(source.path),
        "task": source.task,
        "step": source.run.get("step"),
        "config": source.run_config,
    }
    return export_merged(policy, Path(out), info, dtype, overwrite)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["export"]:
            args = export_parser().parse_args(argv[1:])
            out = export_checkpoint(args.ckpt, args.out, args.model, args.dtype, args.overwrite)
            print(f"merged model written to {out}")
            return
        settings = EvalSettings(**vars(eval_parser().parse_args(argv)))
        report = evaluate(settings, models.BACKEND)
    # bad input (DataError, EvaluationError, unknown task are ValueErrors): message, no trace
    except (ValueError, KeyError, ModelLoadError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f"error: {e}")
    summary = report.summary
    title = summary["checkpoint"] or summary["model"]
    print(
        f"{title} | task {summary['task']} | {summary['num_samples']} samples | greedy, "
        f"{summary['sampler']}"
    )
    print(format_table(summary))
    print(f"predictions and summary.json written to {report.out_dir}")


if __name__ == "__main__":
    main()
