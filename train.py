"""Train a vision-language model with GRPO.

    python train.py --task ocr --model tiny                      # CPU demo, built-in data
    torchrun --nproc_per_node 8 train.py --task ocr --model Qwen/Qwen2.5-VL-3B-Instruct

Every field of grpo.config.TrainConfig is a flag (`--learning-rate 1e-5`); `--config f.yaml`
loads a file of them; configs/<task>.yaml holds each task's preset.

A mistake in the settings, data, rewards or run directory ends the program with one line,
`error: <file:line or field>: <what is wrong>`, and exit status 1; `--debug` shows the
traceback instead.
"""

from __future__ import annotations

import sys

import models  # the torchvision shim must precede transformers' imports
from grpo import distributed
from grpo.config import load_config
from grpo.trainer import train
from models.loading import ModelLoadError
from rewards import PluginError, RewardError

# The errors that mean "the input is wrong" rather than "the program is wrong". ValueError
# covers ConfigError, DataError and CheckpointError; KeyError an unknown task or reward.
USER_ERRORS = (
    ValueError,
    KeyError,
    FileNotFoundError,
    FileExistsError,
    ModelLoadError,
    PluginError,
    RewardError,
)


def one_line(error: BaseException) -> str:
    """The message of `error` on one line (a KeyError's str() would add quotes)."""
    text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return " | ".join(part.strip() for part in str(text).splitlines() if part.strip())


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        run_dir = train(load_config(argv), models.BACKEND)
    except USER_ERRORS as e:
        if debug:
            raise
        sys.exit(f"error: {one_line(e)}")
    # train() has returned, so its trainer (which holds the process group) is gone
    distributed.cleanup()
    print(f"run finished: {run_dir}")


if __name__ == "__main__":
    main()
