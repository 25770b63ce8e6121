"""The published model shapes the real-shape tests build: one table, read by
tests/test_real_shapes.py (the built configs are the published ones), tests/shape_worker.py
(one case through the pipeline) and tests/test_real_shapes_pipeline.py (the assertions).

tests/fixtures/<name>.config.json are the models' published config.json files, copied as they
are (public facts). Each case keeps every width and head count and cuts only the layer counts.

dtype: one Qwen2.5-VL (3B) and one Qwen2.5 (0.5B) in float32, where the test's log-prob
tolerance is 1e-4 and so catches any small difference between the trainer, vLLM and the
export; the others in bfloat16, their published torch_dtype and what a GPU runs, at the bf16
tolerance (tests/test_real_shapes_pipeline.py). bf16 halves each case's memory, and on this
VM a case's time follows the fresh memory it touches (the VL-7B: 223 s at a 16.9 GiB peak in
float32, 129 s at 10.0 GiB in bf16; README "Testing without a GPU" has every case's figures).
The 72B cannot run in float32 here: its two untied 152064 x 8192 embedding matrices alone are
2.5 G parameters, 10 GB in float32 and so 20 GB for the policy and vLLM's copy; in bf16 the
whole one-layer model is ~7 GB a copy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).parent / "fixtures"


@dataclass(frozen=True)
class Shape:
    """One published model, cut to `text_layers` decoder layers (and `vision_layers` vision
    blocks for a Qwen2.5-VL; 0 for a text-only Qwen2.5)."""

    name: str  # the fixture's stem: tests/fixtures/<name>.config.json
    dtype: str
    text_layers: int
    vision_layers: int = 0
    # both halves of tests/shape_worker.py in one process: its peak (the engine's leftovers
    # plus the export's two copies) stays far below this 24 GiB machine's memory
    one_process: bool = False

    @property
    def vision(self) -> bool:
        return self.vision_layers > 0

    @property
    def fixture(self) -> Path:
        return FIXTURES / f"{self.name}.config.json"

    def published(self) -> dict[str, Any]:
        return json.loads(self.fixture.read_text())


# Vision towers keep two blocks: the first windowed, the last full attention (the published
# towers interleave the two kinds), so both attention paths run at the real width.
SHAPES = {
    shape.name: shape
    for shape in (
        Shape("qwen2.5-vl-3b-instruct", "float32", 1, 2, one_process=True),
        Shape("qwen2.5-vl-7b-instruct", "bfloat16", 1, 2),
        Shape("qwen2.5-vl-72b-instruct", "bfloat16", 1, 2),
        Shape("qwen2.5-0.5b-instruct", "float32", 2, one_process=True),
        Shape("qwen2.5-1.5b-instruct", "bfloat16", 2, one_process=True),
        Shape("qwen2.5-7b-instruct", "bfloat16", 1),
    )
}
