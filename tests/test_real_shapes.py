"""The published Qwen2.5-VL (3B, 7B, 72B) and Qwen2.5 (0.5B, 1.5B, 7B) architectures, built
few layers deep: the built configs are the published ones with fewer layers.

tests/shape_cases.py holds the table and reads the fixtures (the models' published
config.json files); models/tiny.py shaped_model_path builds a checkpoint with exactly those
shapes (widths, heads and KV heads, head_dim, mrope_section, tied or untied embeddings,
vocabulary, vision tower), random weights, the real tokenizer. Each one through training,
sync and export: tests/test_real_shapes_pipeline.py.
"""

from __future__ import annotations

import pytest

from models.tiny import shaped_config, shaped_model_path
from tests.shape_cases import SHAPES, Shape

TEXT_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "rms_norm_eps",
    "max_position_embeddings",
)
VL = [s for s in SHAPES.values() if s.vision]
TEXT = [s for s in SHAPES.values() if not s.vision]


@pytest.mark.parametrize("shape", VL, ids=lambda s: s.name)
def test_the_built_vl_config_is_the_published_one_with_fewer_layers(shape: Shape) -> None:
    source = shape.published()
    config = shaped_config(source, text_layers=2, vision_layers=2)
    text, vision = config.text_config, config.vision_config
    for key in TEXT_KEYS:
        assert getattr(text, key) == source[key], key
    assert text.num_hidden_layers == 2 and vision.depth == 2
    assert text.hidden_size // text.num_attention_heads == 128  # head_dim
    assert (
        text.rope_parameters["mrope_section"]
        == [16, 24, 24]
        == source["rope_scaling"]["mrope_section"]
    )
    assert text.rope_parameters["rope_theta"] == source["rope_theta"] == 1e6
    three_b = shape.name == "qwen2.5-vl-3b-instruct"
    assert config.tie_word_embeddings is source["tie_word_embeddings"] is three_b
    assert text.vocab_size == (151936 if three_b else 152064)
    for key in ("hidden_size", "num_heads", "intermediate_size", "window_size", "patch_size"):
        assert getattr(vision, key) == source["vision_config"][key], key
    assert vision.hidden_size == 1280 and vision.num_heads == 16 and vision.window_size == 112
    assert vision.out_hidden_size == text.hidden_size
    assert vision.fullatt_block_indexes == [1]  # one windowed block, then a full-attention one


@pytest.mark.parametrize("shape", TEXT, ids=lambda s: s.name)
def test_the_built_text_config_is_the_published_one_with_fewer_layers(shape: Shape) -> None:
    source = shape.published()
    config = shaped_config(source, text_layers=2, vision_layers=0)
    assert type(config).__name__ == "Qwen2Config" and config.num_hidden_layers == 2
    for key in (*TEXT_KEYS, "tie_word_embeddings"):
        assert getattr(config, key) == source[key], key
    assert config.rope_parameters["rope_theta"] == source["rope_theta"] == 1e6
    assert config.layer_types == ["full_attention"] * 2  # use_sliding_window is false
    big = shape.name == "qwen2.5-7b-instruct"
    assert config.tie_word_embeddings is not big
    assert config.vocab_size == (152064 if big else 151936)
    head_dim = {"qwen2.5-0.5b-instruct": 64}.get(shape.name, 128)
    assert config.hidden_size // config.num_attention_heads == head_dim


def test_a_text_config_refuses_vision_layers() -> None:
    with pytest.raises(ValueError, match="vision_layers=2"):
        shaped_config(SHAPES["qwen2.5-0.5b-instruct"].published(), 1, 2)


def narrowed(name: str) -> dict:
    """A published config with its widths cut (vocabulary kept): cheap to build, same code."""
    source = SHAPES[name].published()
    source |= {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4}
    source["num_key_value_heads"] = 2
    if "vision_config" in source:
        vision = source["vision_config"]
        vision |= {"hidden_size": 64, "intermediate_size": 128, "num_heads": 2}
        vision["out_hidden_size"] = 128
    return source


@pytest.mark.parametrize("name", ["qwen2.5-0.5b-instruct", "qwen2.5-vl-7b-instruct"])
def test_a_built_checkpoint_has_each_weight_drawn_as_transformers_would(name: str) -> None:
    """Built on the meta device and filled once (models/tiny.py fill_random): norms 1, biases
    0, the other weights N(0, 0.02^2), tied embeddings one tensor; reloaded by transformers
    without a missing or newly initialised weight."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2_5_VLForConditionalGeneration

    source = narrowed(name)
    path = shaped_model_path(source, 1, 2 if "vision_config" in source else 0)
    kind = Qwen2_5_VLForConditionalGeneration if "vision_config" in source else AutoModelForCausalLM
    model, info = kind.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    tied = source["tie_word_embeddings"]
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert (embed.data_ptr() == head.data_ptr()) is tied
    drawn = []
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if "Norm" in type(module).__name__:
                assert torch.equal(param, torch.ones_like(param)), (module_name, param_name)
            elif param_name == "bias":
                assert not param.any(), module_name
            else:
                drawn.append(param.detach().flatten())
    weights = torch.cat(drawn)
    assert abs(weights.mean().item()) < 1e-3 and weights.std().item() == pytest.approx(0.02, 0.01)
    assert len({round(w.std().item(), 2) for w in drawn}) == 1  # every tensor, not an average
