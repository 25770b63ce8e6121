"""models/tokenizer_cache.py: a cached load is indistinguishable from a fresh one, and each
caller's copy is its own."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from models import tokenizer_cache
from models.tiny import tiny_model_path, tokenizer_path
from models.tokenizer_cache import (
    cached_load,
    load_auto_processor,
    load_tokenizer,
    tokenizer_loads_cached,
    tokenizers_passed_by_reference,
)

TEXT = "你好 world 123 <|im_start|>user\nhi<|im_end|>\t  é"


@pytest.fixture()
def tokenizer_dir(tmp_path: Path) -> Path:
    """A private copy of the offline Qwen2.5 tokenizer: a test may edit its files."""
    return Path(shutil.copytree(tokenizer_path(), tmp_path / "tokenizer"))


def fresh(path: Path, **kwargs: Any) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, **kwargs)


def test_a_cached_load_is_a_fresh_load(tokenizer_dir: Path) -> None:
    load_tokenizer(tokenizer_dir, padding_side="left")  # fills the cache
    cached, want = load_tokenizer(tokenizer_dir, padding_side="left"), fresh(tokenizer_dir)
    assert type(cached) is type(want) and cached.padding_side == "left"
    assert cached(TEXT).input_ids == want(TEXT).input_ids
    assert cached.decode(cached(TEXT).input_ids) == want.decode(want(TEXT).input_ids)
    assert cached.get_vocab() == want.get_vocab() and len(cached) == len(want)
    assert cached.special_tokens_map == want.special_tokens_map
    assert cached.chat_template == want.chat_template


def test_each_copy_is_its_own(tokenizer_dir: Path) -> None:
    a, b = load_tokenizer(tokenizer_dir), load_tokenizer(tokenizer_dir)
    assert a is not b
    a.padding_side, b.padding_side = "left", "right"
    a.pad_token = "<|im_end|>"
    c = load_tokenizer(tokenizer_dir)
    assert c.padding_side == fresh(tokenizer_dir).padding_side
    assert c.pad_token == fresh(tokenizer_dir).pad_token != "<|im_end|>"
    # the shared Rust backend: padding is set per call, so each copy pads its own way
    left = a(["hi", "hello there friend"], padding=True).input_ids
    right = b(["hi", "hello there friend"], padding=True).input_ids
    assert left[0][0] == a.pad_token_id and right[0][-1] == b.pad_token_id
    assert left[0][-1] != a.pad_token_id and right[0][0] != b.pad_token_id


def test_a_changed_file_is_read_again(tokenizer_dir: Path) -> None:
    assert load_tokenizer(tokenizer_dir).model_max_length != 77
    config_file = tokenizer_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "model_max_length": 77}))
    assert load_tokenizer(tokenizer_dir).model_max_length == 77


def test_a_processor_copy_keeps_its_own_image_sizes() -> None:
    path = tiny_model_path()
    a = load_auto_processor(path)
    a.image_processor.size = {"shortest_edge": 28 * 28, "longest_edge": 56 * 56}
    a.tokenizer.padding_side = "left"
    b = load_auto_processor(path)
    assert b.image_processor.size != a.image_processor.size
    assert b.tokenizer.padding_side == fresh(path).padding_side
    assert b.tokenizer(TEXT).input_ids == a.tokenizer(TEXT).input_ids


def test_what_cannot_be_keyed_is_loaded_every_time(tmp_path: Path) -> None:
    calls: list[Any] = []

    def load(path: Any, **kwargs: Any) -> dict:
        calls.append(path)
        return {"path": path}

    cached_load("fake", load, "Qwen/Qwen2.5-VL-3B-Instruct")  # a hub id: not a directory
    cached_load("fake", load, "Qwen/Qwen2.5-VL-3B-Instruct")
    cached_load("fake", load, tmp_path, tokenizer=object())  # an object argument
    cached_load("fake", load, tmp_path, tokenizer=object())
    assert len(calls) == 4
    cached_load("fake", load, tmp_path, padding_side="left")
    cached_load("fake", load, tmp_path, padding_side="left")
    cached_load("fake", load, tmp_path, padding_side="right")
    assert len(calls) == 6


def test_other_libraries_loads_go_through_the_cache_only_within(tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    original = AutoTokenizer.__dict__["from_pretrained"]
    before = len(tokenizer_cache._LOADED)
    with tokenizer_loads_cached():
        a = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False)
        b = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False)
    assert a is not b and a(TEXT).input_ids == b(TEXT).input_ids
    assert len(tokenizer_cache._LOADED) == before + 1  # one parse for the two loads
    with pytest.raises(RuntimeError), tokenizer_loads_cached():
        raise RuntimeError("engine failed")
    assert AutoTokenizer.__dict__["from_pretrained"] is original


def test_tokenizers_passed_by_reference_only_within(tokenizer_dir: Path) -> None:
    """Engine start-up shares the tokenizer where transformers would deep-copy it; outside,
    and after an error inside, deepcopy copies again."""
    tokenizer = load_tokenizer(tokenizer_dir)
    with tokenizers_passed_by_reference():
        assert copy.deepcopy({"tokenizer": tokenizer})["tokenizer"] is tokenizer
    with pytest.raises(RuntimeError), tokenizers_passed_by_reference():
        raise RuntimeError("engine failed")
    copied = copy.deepcopy(tokenizer)
    assert copied is not tokenizer and copied.encode("你好 world") == tokenizer.encode("你好 world")
