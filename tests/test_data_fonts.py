"""data.fonts: a real CJK font is found offline and draws glyphs, not .notdef boxes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from data import fonts
from data.fonts import find_cjk_font, has_glyph, load_cjk_font
from data.synthetic_ocr import CHINESE_WORDS, LATIN_WORDS


def render(char: str, size: int = 32) -> np.ndarray:
    """[size*2, size*2] uint8 ink of `char` drawn black on white (ink = 255 - pixel)."""
    image = Image.new("L", (size * 2, size * 2), 255)
    ImageDraw.Draw(image).text((4, 4), char, font=load_cjk_font(size), fill=0)
    return 255 - np.asarray(image)


def test_font_file_exists():
    path = find_cjk_font()
    assert path.is_file() and path.suffix.lower() in (".otf", ".ttf", ".ttc")


def test_cjk_character_has_ink_and_is_not_the_notdef_box():
    zi = render("字")
    assert (zi > 128).sum() > 30  # real strokes, not a few stray pixels
    for missing in ("\ue000", "\U0010ffff"):  # private-use / noncharacter: .notdef
        assert not np.array_equal(zi, render(missing))
    assert not np.array_equal(zi, render("文"))  # distinct characters, distinct glyphs


def test_has_glyph():
    font = load_cjk_font(24)
    assert has_glyph(font, "字") and has_glyph(font, "A") and has_glyph(font, "¥")
    assert not has_glyph(font, "\ue000")
    assert has_glyph(font, " ")  # whitespace has no ink by design


def test_every_character_the_ocr_generator_uses_renders():
    font = load_cjk_font(24)
    text = "".join(CHINESE_WORDS) + "".join(LATIN_WORDS) + "0123456789¥%.月日"
    assert fonts.missing_glyphs(font, text) == []


def test_missing_font_error_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(fonts, "_pypi_font", lambda: None)
    monkeypatch.setattr(fonts, "_DEBIAN_FONTS", ((tmp_path / "absent.ttc", 2),))
    with pytest.raises(RuntimeError, match="pip install pylopdf-fonts-zh-cn"):
        find_cjk_font()


def test_debian_fallback_and_face_index(monkeypatch, tmp_path):
    collection = tmp_path / "NotoSansCJK-Regular.ttc"
    collection.write_bytes(b"")
    monkeypatch.setattr(fonts, "_pypi_font", lambda: None)
    monkeypatch.setattr(fonts, "_DEBIAN_FONTS", ((collection, 2),))
    assert find_cjk_font() == collection
    assert fonts.font_face_index(collection) == 2
    assert fonts.font_face_index(Path("NotoSansSC-Regular.otf")) == 0
