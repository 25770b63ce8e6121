"""Let `import torchvision` succeed next to a CPU-only torch build.

PyPI's Linux torchvision wheels are CUDA builds. Next to torch's CPU build their C extension
does not load, and torchvision's import then fails registering fake kernels for
`torchvision::nms` ("operator torchvision::nms does not exist"). transformers' image utilities,
qwen-vl-utils and vLLM's Qwen2.5-VL code all import torchvision, and only use its pure-Python
transforms. Declaring the two missing operator schemas before the first import is enough for
those; torchvision's compiled detection ops stay unavailable, which nothing here needs.

Import this module before anything that may import torchvision (models/__init__.py does).
"""

from __future__ import annotations

import importlib.util
import os

import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library: torch.library.Library | None = None  # kept alive: dropping it unregisters the ops


def _extension_loads() -> bool:
    """True when torchvision is absent or its compiled extension loads (nothing to patch)."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return True
    folder = os.path.dirname(spec.origin)
    libraries = [f for f in os.listdir(folder) if f.startswith("_C") and f.endswith(".so")]
    if not libraries:
        return True
    try:
        torch.ops.load_library(os.path.join(folder, libraries[0]))
        return True
    except (OSError, RuntimeError):
        return False


def ensure_torchvision_importable() -> None:
    """Declare torchvision's missing operator schemas when its C extension cannot load."""
    global _library
    if _library is not None or _extension_loads():
        return
    _library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS.values():
        _library.define(schema)


ensure_torchvision_importable()
