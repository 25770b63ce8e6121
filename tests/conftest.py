"""Shared fixtures: the tiny offline Qwen2.5-VL and small images."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from PIL import Image

import models  # noqa: F401  (installs the torchvision shim before anything imports it)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The cached tiny checkpoint directory (built on first use, ~20 s)."""
    from models.tiny import tiny_model_path

    return tiny_model_path()


@pytest.fixture
def images() -> list[Image.Image]:
    """Three RGB images of different sizes and contents."""
    gen = torch.Generator().manual_seed(0)
    sizes = [(120, 60), (56, 90), (84, 84)]
    out = []
    for w, h in sizes:
        pixels = torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8)
        out.append(Image.fromarray(pixels.numpy(), "RGB"))
    return out


def pytest_report_header() -> str | None:
    """In CI (CI set), the machine's fresh-memory rate (bench/memory_touch.py): on a VM whose
    host backs memory lazily it, not the CPU, sets the big cases' time. Not measured in a
    developer's runs: on a slow host the 2 GiB probe itself takes ~17 s."""
    if not os.environ.get("CI"):
        return None
    from bench.memory_touch import touch_rates

    rates = touch_rates(2 << 30)  # past the ~1 GiB a slow host still had at hand
    return (
        f"memory: fresh pages (2 GiB) {rates['fresh_gb_per_s']:.2f} GB/s, pages already held "
        f"{rates['reused_gb_per_s']:.1f} GB/s (bench/memory_touch.py)"
    )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Peak RSS and time of each real-shape case (tests/test_real_shapes_pipeline.py), in the
    log without -s."""
    from tests.shape_report import LINES

    if LINES:
        terminalreporter.section("real model shapes: peak memory and time")
        for line in LINES:
            terminalreporter.write_line(line)
