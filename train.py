"""Train a vision-language model with GRPO.

    python train.py --task ocr --model tiny                      # CPU demo, built-in data
    torchrun --nproc_per_node 8 train.py --task ocr --model Qwen/Qwen2.5-VL-3B-Instruct

Every field of grpo.config.TrainConfig is a flag (`--learning-rate 1e-5`); `--config f.yaml`
loads a file of them; configs/<task>.yaml holds each task's preset.
"""

from __future__ import annotations

import sys

import models  # the torchvision shim must precede transformers' imports
from grpo.config import load_config
from grpo.trainer import train


def main(argv: list[str] | None = None) -> None:
    run_dir = train(load_config(argv), models.BACKEND)
    print(f"run finished: {run_dir}")


if __name__ == "__main__":
    main(sys.argv[1:])
