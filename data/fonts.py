"""Finding a CJK font that works offline, and checking that it really draws a character.

Search order (first hit wins):
1. the PyPI package `pylopdf-fonts-zh-cn` (Noto Sans SC, SIL OFL), a declared dependency;
2. Debian `fonts-noto-cjk`: NotoSansCJK-Regular.ttc, face 2 (Simplified Chinese);
3. Debian `fonts-wqy-microhei`: wqy-microhei.ttc, face 0.

A font that lacks a character draws its `.notdef` glyph (an empty box in Noto) instead of
failing, so "the text rendered" is checked by comparing a character's bitmap with the bitmap
of a code point no font assigns (U+10FFFF): equal bitmaps mean the glyph is missing.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

from PIL import ImageFont

# (path, face index inside a .ttc collection) for the Debian packages, in preference order.
_DEBIAN_FONTS: tuple[tuple[Path, int], ...] = (
    (Path("/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc"), 2),
    (Path("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc"), 0),
)
_PYPI_PACKAGE = "pylopdf_fonts_zh_cn"
_PYPI_FONT_FILE = "NotoSansSC-Regular.otf"
_UNASSIGNED = "\U0010ffff"  # a noncharacter: every font falls back to .notdef for it


def _pypi_font() -> Path | None:
    """The Noto Sans SC file shipped by pylopdf-fonts-zh-cn, if that package is installed."""
    spec = importlib.util.find_spec(_PYPI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / _PYPI_FONT_FILE
        if candidate.is_file():
            return candidate
    return None


def find_cjk_font() -> Path:
    """Path of a font file with Simplified Chinese and Latin glyphs; RuntimeError if none."""
    found = _pypi_font()
    if found is not None:
        return found
    for path, _ in _DEBIAN_FONTS:
        if path.is_file():
            return path
    raise RuntimeError(
        "No CJK font found. Install one of: `pip install pylopdf-fonts-zh-cn` (Noto Sans SC), "
        "`apt-get install fonts-noto-cjk`, or `apt-get install fonts-wqy-microhei`."
    )


def font_face_index(path: Path) -> int:
    """Which face of a font collection (.ttc) holds Simplified Chinese; 0 for single fonts."""
    for known, index in _DEBIAN_FONTS:
        if path.name == known.name:
            return index
    return 0


@lru_cache(maxsize=64)
def load_cjk_font(size: int) -> ImageFont.FreeTypeFont:
    """The CJK font at `size` pixels, cached because generators ask for a few sizes many times.

    The BASIC layout engine is used so that output does not depend on whether PIL was built
    with libraqm: synthetic images must be byte-identical for a seed.
    """
    path = find_cjk_font()
    return ImageFont.truetype(
        str(path), size, index=font_face_index(path), layout_engine=ImageFont.Layout.BASIC
    )


def _bitmap(font: ImageFont.FreeTypeFont, char: str) -> tuple[tuple[int, int], bytes]:
    mask = font.getmask(char)
    return mask.size, bytes(mask)


def has_glyph(font: ImageFont.FreeTypeFont, char: str) -> bool:
    """True when `char` draws ink and not the font's .notdef glyph.

    Whitespace has no ink by design and counts as present.
    """
    if char.isspace():
        return True
    size, pixels = _bitmap(font, char)
    if not any(pixels):
        return False
    return (size, pixels) != _bitmap(font, _UNASSIGNED)


def missing_glyphs(font: ImageFont.FreeTypeFont, text: str) -> list[str]:
    """The distinct characters of `text` the font cannot draw, in first-seen order."""
    return [c for c in dict.fromkeys(text) if not has_glyph(font, c)]
