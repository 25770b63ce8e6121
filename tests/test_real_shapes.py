"""The published Qwen2.5-VL architectures (3B, 7B, 72B), built few layers deep.

tests/fixtures/qwen2.5-vl-*-instruct.config.json are the models' published config.json files;
models/tiny.py shaped_model_path builds a checkpoint with exactly those shapes (widths, heads
and KV heads, head_dim 128, mrope_section, tied or untied embeddings, vocabulary, vision
tower), cut to few layers, random weights, the real tokenizer. Here: the built configs are the
published ones. The full pipeline per shape (a train step with each sampler, sync, export
reloaded in transformers and vLLM) is on branch `shapes` until it fits this machine: its 3B
case was killed at 10.3 GB while vLLM loaded the checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from models.tiny import shaped_config

FIXTURES = Path(__file__).parent / "fixtures"
# (fixture name, dtype, text layers)
SHAPES = {
    "3b": ("float32", 2),
    "7b": ("float32", 2),
    "72b": ("bfloat16", 1),
}
BF16_TIE = 0.1  # logits; bf16 keeps 8 bits of mantissa: a 0.1 gap at |logit| ~ 10 is 1 ulp-ish


def published(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"qwen2.5-vl-{name}-instruct.config.json").read_text())


@pytest.mark.parametrize("name", list(SHAPES))
def test_the_built_config_is_the_published_one_with_fewer_layers(name: str) -> None:
    source = published(name)
    config = shaped_config(source, text_layers=2, vision_layers=2)
    text, vision = config.text_config, config.vision_config
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "rms_norm_eps",
        "max_position_embeddings",
    ):
        assert getattr(text, key) == source[key], key
    assert text.num_hidden_layers == 2 and vision.depth == 2
    assert text.hidden_size // text.num_attention_heads == 128  # head_dim
    assert (
        text.rope_parameters["mrope_section"]
        == [16, 24, 24]
        == source["rope_scaling"]["mrope_section"]
    )
    assert text.rope_parameters["rope_theta"] == source["rope_theta"] == 1e6
    assert config.tie_word_embeddings is source["tie_word_embeddings"] is (name == "3b")
    assert text.vocab_size == (151936 if name == "3b" else 152064)
    for key in ("hidden_size", "num_heads", "intermediate_size", "window_size", "patch_size"):
        assert getattr(vision, key) == source["vision_config"][key], key
    assert vision.hidden_size == 1280 and vision.num_heads == 16 and vision.window_size == 112
    assert vision.out_hidden_size == text.hidden_size
    assert vision.fullatt_block_indexes == [1]  # one windowed block, then a full-attention one
