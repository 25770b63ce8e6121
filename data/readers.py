"""Reading training/evaluation data in five formats into `Sample`s, validated up front.

Formats (docs/data_formats.md has one example of each):

(a) JSONL  {"query", "response", "image_path"}                       ms-swift OCR recipe
(b) folder with an index file of `image_name<TAB>text` lines      Chinese text-line OCR sets
(c) JSONL  {"messages" | "query", "images": [paths], "solution"}     ms-swift
(d) JSON/JSONL {"image", "conversations": [{"from": "human"}, {"from": "gpt"}]}  LLaVA/VLM-R1
(e) Parquet with an image column of encoded bytes + problem/solution  Hugging Face datasets
GSM8K      {"question", "answer": "reasoning...\n#### 72"}  (JSONL or Parquet)   openai/gsm8k

How a path is read: a `save_to_disk` directory or a folder of Parquet shards -> a Hugging Face
dataset (data/hf_datasets.py); another directory -> (b) (see `find_index_file`);
`.txt`/`.tsv` -> (b) with that file as the index; `.jsonl` -> one JSON object per line,
(a)/(c)/(d) told apart per record by its keys; `.json` -> a JSON array of such objects (or
JSONL); `.parquet` -> (e).
GSM8K is (a)'s text-only case whose "answer" ends with a `#### <number>` line: the solution is
that number. The first record with an "answer" field decides, per file, whether the file is
GSM8K (see `Gsm8kDetector`); a later record that disagrees is an error naming its line.

Every sample is checked before training starts, images included (decoded fully by the
function training uses, in worker processes, with the result cached on disk per data file:
data/validation.py). A bad record raises `DataError("file:line: what is wrong")` and stops the
run; with `skip_bad=True` bad records are dropped and one warning gives their count and the
first few reasons. An empty solution is a bad record unless `allow_empty_solution=True`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from data.hf_datasets import (
    is_saved_dataset,
    parquet_shards,
    parse_column_map,
    rename,
    saved_dataset_records,
)
from data.sample import DataError, ImageRef, ParquetCell, Sample, note_once
from data.validation import Check, cached_check_images, check_images, default_cache_dir

logger = logging.getLogger(__name__)

IMAGE_TAG = "<image>"
QUERY_KEYS = ("query", "problem", "question")  # first present wins
SOLUTION_KEYS = ("solution", "response", "answer")
IMAGE_KEYS = ("image_path", "images", "image")  # JSON records: at most one of these
PARQUET_IMAGE_COLUMNS = ("image", "images")
PARQUET_QUERY_COLUMNS = ("problem", "question", "query")
PARQUET_SOLUTION_COLUMNS = ("solution", "answer")
INDEX_FILE_NAMES = ("labels.txt", "label.txt", "gt.txt")
MAX_REPORTED = 5  # bad samples quoted in the skip warning / the "nothing valid" error
GSM8K_MARKER = "####"
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")  # a GSM8K final answer once commas are removed
CACHE_MIN_IMAGES = 256  # smaller sets decode in well under a second: no cache entry for them


class EmptySolution(DataError):
    """A record that parsed but whose solution is empty; carries the sample, which
    load_samples keeps when allow_empty_solution is set."""

    def __init__(self, message: str, sample: Sample) -> None:
        super().__init__(message)
        self.sample = sample


Parsed = Sample | DataError  # what a reader yields per record; the caller decides what to do


def load_samples(
    path: str | Path,
    *,
    skip_bad: bool = False,
    limit: int | None = None,
    allow_empty_solution: bool = False,
    workers: int | None = None,
    cache: bool | str | Path = True,
    split: str | None = None,
    column_map: str | dict[str, str] | None = None,
) -> list[Sample]:
    """Read and validate every sample of `path` (a data file or an OCR folder).

    limit:    stop after this many valid samples (records after them are not read or checked).
    skip_bad: drop bad records with one logged warning instead of raising on the first.
    allow_empty_solution: accept an empty/whitespace-only solution with one warning (for
              evaluation); by default it is a bad record, since a reward comparing against ""
              pays for an empty answer.
    workers:  processes decoding images (None: CPU count, at most 8; 1: this process only).
    cache:    where the image checks are cached: True -> data.validation.default_cache_dir(),
              a directory, or False for none. Only used without `limit`, for sets of at
              least CACHE_MIN_IMAGES images.
    split:    a Hugging Face dataset's split (data/hf_datasets.py); column_map: its columns
              under our names, "problem=query,image=img".
    Raises DataError for a missing/empty/unreadable file, a bad record (unless skip_bad), or
    when no valid sample remains.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    path = Path(path)
    tally = _Tally(allow_empty_solution, skip_bad, limit)
    records = _read_records(path, split, parse_column_map(column_map))
    if limit is None:
        parsed = list(records)
        tally.take(parsed, _checks(parsed, path, workers, cache))
    else:  # read only as many records as may still be needed: later ones stay unread
        while not tally.full() and (block := list(islice(records, limit - len(tally.samples)))):
            tally.take(block, check_images(_refs(block), workers))
    tally.report(path)
    return tally.samples


def _checks(
    parsed: list[Parsed], path: Path, workers: int | None, cache: bool | str | Path
) -> list[Check]:
    """Image checks of every parsed sample, through the on-disk cache when it is worth it."""
    refs = _refs(parsed)
    if cache is False or len(refs) < CACHE_MIN_IMAGES:
        return check_images(refs, workers)
    directory = default_cache_dir() if cache is True else Path(cache)
    data_file = _data_file(path) if path.is_dir() else path
    checks, hit = cached_check_images(refs, data_file, directory, workers)
    logger.info("%s: image checks %s", path, "read from the cache" if hit else "computed")
    return checks


def _refs(parsed: list[Parsed]) -> list[ImageRef]:
    """Every image of every record that parsed (an empty-solution record counts: it may be
    allowed), in order: the order of `check_images`' results."""
    return [ref for item in parsed if (s := _parsed_sample(item)) is not None for ref in s.images]


def _parsed_sample(item: Parsed) -> Sample | None:
    if isinstance(item, Sample):
        return item
    return item.sample if isinstance(item, EmptySolution) else None


class _Tally:
    """The samples kept, the bad records and the empty solutions seen so far."""

    def __init__(self, allow_empty: bool, skip_bad: bool, limit: int | None) -> None:
        self.allow_empty, self.skip_bad, self.limit = allow_empty, skip_bad, limit
        self.samples: list[Sample] = []
        self.bad: list[DataError] = []
        self.empty: list[str] = []
        self.seen = 0

    def full(self) -> bool:
        return self.limit is not None and len(self.samples) >= self.limit

    def take(self, parsed: list[Parsed], checks: list[Check]) -> None:
        """Judge records in order; `checks` are the image checks of `_refs(parsed)`."""
        pending = iter(checks)
        for item in parsed:
            if self.full():
                return
            self.seen += 1
            sample = _parsed_sample(item)
            if sample is None:
                error: DataError | None = item  # type: ignore[assignment]
            else:
                image_checks = [next(pending) for _ in sample.images]
                error = _image_error(sample, image_checks)
                if error is None and isinstance(item, EmptySolution) and not self.allow_empty:
                    error = item
            if error is not None:
                if not self.skip_bad:
                    raise error
                self.bad.append(error)
                continue
            for ref, (_, notes) in zip(sample.images, image_checks, strict=True):
                for note in notes:
                    note_once(f"{ref.where}: {note}")
            if isinstance(item, EmptySolution):
                self.empty.append(sample.where)
            self.samples.append(sample)

    def report(self, path: Path) -> None:
        """Raise if nothing is usable; else one warning each for skipped and empty ones."""
        if self.seen == 0:
            raise DataError(f"{path}: no samples: the file is empty")
        if not self.samples:
            raise DataError(
                f"{path}: no valid samples, all {self.seen} are bad; first:\n{_quote(self.bad)}"
            )
        if self.bad:
            logger.warning(
                "%s: skipped %d bad sample(s) of %d read; first %d:\n%s",
                path,
                len(self.bad),
                self.seen,
                min(len(self.bad), MAX_REPORTED),
                _quote(self.bad),
            )
        if self.empty:
            logger.warning(
                "%s: loaded %d sample(s) with an empty solution (allow_empty_solution); first: %s",
                path,
                len(self.empty),
                ", ".join(self.empty[:MAX_REPORTED]),
            )


def _image_error(sample: Sample, checks: list[Check]) -> DataError | None:
    """The DataError of the sample's first bad image, or None."""
    for ref, (problem, _) in zip(sample.images, checks, strict=True):
        if problem is not None:
            return DataError(f"{ref.where}: {problem}")
    return None


def _quote(errors: list[DataError]) -> str:
    return "\n".join(f"  {e}" for e in errors[:MAX_REPORTED])


def _data_file(folder: Path) -> Path:
    """The file whose content keys the image-check cache of a folder."""
    if is_saved_dataset(folder):
        return next(iter(sorted(folder.rglob("*.arrow"))), folder / "state.json")
    shards = sorted(folder.rglob("*.parquet"))
    return shards[0] if shards else find_index_file(folder)


def _read_records(
    path: Path, split: str | None = None, mapping: dict[str, str] | None = None
) -> Iterator[Parsed]:
    """Dispatch on what `path` is; file-level problems raise, record-level ones are yielded."""
    mapping = mapping or {}
    if is_saved_dataset(path):
        return _read_saved_dataset(path, split, mapping)
    if (shards := parquet_shards(path, split)) is not None:
        return (item for shard in shards for item in _read_parquet(shard, mapping))
    if mapping and path.suffix.lower() == ".parquet":
        return _read_parquet(path, mapping)
    if path.is_dir():
        return _read_index(find_index_file(path))
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    suffix = path.suffix.lower()
    if suffix in (".txt", ".tsv"):
        return _read_index(path)
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise DataError(
        f"{path}: unknown data format {suffix!r}; expected a folder with an index file, "
        ".txt/.tsv (index), .jsonl, .json or .parquet"
    )


def _read_saved_dataset(path: Path, split: str | None, mapping: dict[str, str]) -> Iterator[Parsed]:
    """A `save_to_disk` directory's rows, parsed like JSON records (formats a, c, GSM8K)."""
    gsm8k = Gsm8kDetector()
    for where, row in saved_dataset_records(path, split):
        try:
            yield _parse_record(rename(row, mapping, where), where, path, gsm8k)
        except DataError as e:
            yield e


# ---------------------------------------------------------------------------------------------
# JSON records: formats (a), (c), (d)


def _read_jsonl(path: Path) -> Iterator[Parsed]:
    """One JSON object per line; blank lines are ignored. Lines split on b"\\n" only, since
    json.dumps(ensure_ascii=False) may leave U+2028 inside a string."""
    gsm8k = Gsm8kDetector()
    for where, line in _text_lines(path):
        if isinstance(line, DataError):
            yield line
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            yield DataError(f"{where}: malformed JSON: {e.msg} (column {e.colno})")
            continue
        yield _parse_record(record, where, path.parent, gsm8k)


def _text_lines(path: Path) -> Iterator[tuple[str, str | DataError]]:
    """("file:line", text) for every non-blank line, split on b"\n" only; a line that is not
    UTF-8 comes as a DataError instead of text (a BOM on the first line is dropped)."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                yield where, DataError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})")
                continue
            if line.strip():
                yield where, line


def _read_json(path: Path) -> Iterator[Parsed]:
    """A JSON array of records (LLaVA style), each reported at the line where it starts;
    a .json file that does not start with '[' is read as JSONL."""
    text = _read_text(path)
    if not text.lstrip().startswith("["):
        yield from _read_jsonl(path)
        return
    decoder = json.JSONDecoder()
    gsm8k = Gsm8kDetector()
    pos = text.index("[") + 1
    while True:
        pos = _skip_separators(text, pos)
        if pos >= len(text):
            raise DataError(f"{path}:{_line_of(text, pos)}: malformed JSON: unterminated array")
        if text[pos] == "]":
            return
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:  # cannot resynchronise inside an array: stop here
            raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from e
        yield _parse_record(record, f"{path}:{_line_of(text, pos)}", path.parent, gsm8k)
        pos = end


def _skip_separators(text: str, pos: int) -> int:
    while pos < len(text) and (text[pos].isspace() or text[pos] == ","):
        pos += 1
    return pos


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from e


def _parse_record(record: Any, where: str, base: Path, gsm8k: Gsm8kDetector) -> Parsed:
    """One JSON value -> Sample, or the DataError saying what is wrong with it."""
    if not isinstance(record, dict):
        return DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    try:
        if "conversations" in record:
            return _from_conversations(record, where, base)
        if "messages" in record:
            return _from_messages(record, where, base)
        return _from_flat(record, where, base, gsm8k)
    except DataError as e:
        return e


def _from_flat(record: dict[str, Any], where: str, base: Path, gsm8k: Gsm8kDetector) -> Sample:
    """(a) {"query", "response", "image_path"}, (c) {"query", "images", "solution"} and
    GSM8K {"question", "answer"}."""
    query_key = _required_key(record, QUERY_KEYS, where)
    solution_key = _required_key(record, SOLUTION_KEYS, where)
    image_key = _image_key(record, where)
    images = _image_refs(record[image_key] if image_key else None, where, base)
    query = _query_text(record[query_key], len(images), where, query_key)
    used = {query_key, solution_key, image_key}
    solution = gsm8k.solution(record[solution_key], where, solution_key)
    return _sample(query, solution, images, record, used, where, solution_key)


def _from_messages(record: dict[str, Any], where: str, base: Path) -> Sample:
    """(c) {"messages": [{"role", "content"}...], "images", "solution"}: the last user
    message is the query; "solution", else the last assistant message, is the answer."""
    messages = record["messages"]
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise DataError(f"{where}: field 'messages' must be a list of {{role, content}} objects")
    users = [m for m in messages if m.get("role") == "user"]
    if not users:
        raise DataError(f"{where}: field 'messages' has no message with role 'user'")
    assistants = [m for m in messages if m.get("role") == "assistant"]
    field = "solution" if record.get("solution") is not None else "assistant content"
    if record.get("solution") is not None:
        solution = _solution_text(record["solution"], where, field)
    elif assistants:
        solution = _content_text(assistants[-1].get("content"), where, field)
    else:
        raise DataError(f"{where}: missing field 'solution' (and no assistant message)")
    images = _image_refs(record.get("images"), where, base)
    query = _content_text(users[-1].get("content"), where, "user content")
    query = _query_text(query, len(images), where, "messages")
    used = {"messages", "solution", "images"}
    return _sample(query, solution, images, record, used, where, field)


def _from_conversations(record: dict[str, Any], where: str, base: Path) -> Sample:
    """(d) {"image": str | [str], "conversations": [{"from": "human"|"gpt", "value"}...]}:
    the first human turn is the query, the first gpt turn after it the answer."""
    turns = record["conversations"]
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise DataError(f"{where}: field 'conversations' must be a list of {{from, value}} objects")
    speakers = [t.get("from") for t in turns]
    human = next((i for i, s in enumerate(speakers) if s in ("human", "user")), None)
    if human is None:
        raise DataError(f"{where}: field 'conversations' has no turn from 'human'")
    gpt = next((i for i, s in enumerate(speakers) if i > human and s in ("gpt", "assistant")), None)
    field = "solution" if record.get("solution") is not None else "gpt value"
    if record.get("solution") is not None:
        solution = _solution_text(record["solution"], where, field)
    elif gpt is not None:
        solution = _solution_text(turns[gpt].get("value"), where, field)
    else:
        raise DataError(f"{where}: field 'conversations' has no 'gpt' turn after the human turn")
    image_key = _image_key(record, where)
    images = _image_refs(record[image_key] if image_key else None, where, base)
    query = _query_text(turns[human].get("value"), len(images), where, "human value")
    used = {"conversations", "solution", image_key}
    return _sample(query, solution, images, record, used, where, field)


def _sample(
    query: str,
    solution: str,
    images: list[ImageRef],
    record: dict[str, Any],
    used: set[str | None],
    where: str,
    solution_field: str,
) -> Sample:
    """Build the Sample; every field of `record` not consumed goes to `columns`.
    An empty solution raises EmptySolution (load_samples decides whether it is allowed)."""
    if not query and not images:
        raise DataError(f"{where}: empty query and no image: nothing to ask")
    columns = {k: v for k, v in record.items() if k not in used}
    sample = Sample(query=query, solution=solution, images=images, columns=columns, where=where)
    if not solution.strip():
        raise EmptySolution(_empty_message(where, f"field {solution_field!r} is empty"), sample)
    return sample


def _empty_message(where: str, what: str) -> str:
    return (
        f"{where}: {what}: an empty solution makes a reward pay for an empty answer "
        "(skip_bad_samples drops it; evaluation may load it with allow_empty_solution)"
    )


def _required_key(record: dict[str, Any], keys: tuple[str, ...], where: str) -> str:
    for key in keys:
        if key in record and record[key] is not None:
            return key
    also = ", ".join(repr(k) for k in keys[1:])
    raise DataError(
        f"{where}: missing field {keys[0]!r} (also accepted: {also}); "
        f"the record has {sorted(record)}"
    )


def _image_key(record: dict[str, Any], where: str) -> str | None:
    present = [k for k in IMAGE_KEYS if record.get(k) is not None]
    if len(present) > 1:
        raise DataError(f"{where}: both {present[0]!r} and {present[1]!r} given; use one")
    return present[0] if present else None


def _query_text(value: Any, n_images: int, where: str, field: str) -> str:
    """The query with its <image> placeholders removed (the task template places images).
    When the query has placeholders, their number must match the number of images."""
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    tags = value.count(IMAGE_TAG)
    if tags and tags != n_images:
        raise DataError(f"{where}: the query has {tags} {IMAGE_TAG} tag(s) but {n_images} image(s)")
    return value.replace(IMAGE_TAG, "").strip()


def _solution_text(value: Any, where: str, field: str) -> str:
    """Solutions are compared as text; numbers (e.g. counts) are accepted and stringified."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if value is None:
        raise DataError(f"{where}: missing field {field!r}")
    raise DataError(
        f"{where}: field {field!r} must be a string or a number, got {type(value).__name__}"
    )


def _content_text(content: Any, where: str, field: str) -> str:
    """A chat message's content: a string, or a list of parts whose text parts are joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if all(isinstance(t, str) for t in texts):
            return "".join(texts)
    raise DataError(f"{where}: {field} must be a string or a list of text parts")


def _image_refs(value: Any, where: str, base: Path) -> list[ImageRef]:
    """None, one image or a list of images -> ImageRefs (opened later, during validation)."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    return [_image_ref(item, where, base) for item in items]


def _image_ref(item: Any, where: str, base: Path) -> ImageRef:
    """A path string, raw bytes, or an HF Image-feature dict {"bytes", "path"}."""
    if isinstance(item, dict):
        if item.get("bytes") is not None:
            return _image_ref(item["bytes"], where, base)
        if item.get("path") is not None:
            return _image_ref(item["path"], where, base)
        raise DataError(f"{where}: image entry {item!r} has neither 'bytes' nor 'path'")
    if isinstance(item, bytes | bytearray):
        return ImageRef(where=where, data=bytes(item))
    if isinstance(item, str):
        return ImageRef(where=where, path=_resolve(item, where, base))
    raise DataError(
        f"{where}: an image must be a path, bytes or a {{'bytes','path'}} object, "
        f"got {type(item).__name__}"
    )


def _resolve(name: str, where: str, base: Path) -> Path:
    """Relative image paths are relative to the folder of the data file that names them."""
    if not name.strip():
        raise DataError(f"{where}: empty image path")
    if name.startswith(("http://", "https://", "data:")):
        raise DataError(
            f"{where}: remote/inline image {name[:60]!r} is not supported offline; "
            "download it and give a file path"
        )
    path = Path(name).expanduser()
    return path if path.is_absolute() else base / path


@dataclass
class Gsm8kDetector:
    """Per file: are its records GSM8K's own, whose "answer" ends with '#### <number>'?

    The first record with an "answer" field decides; every later one must agree. So a GSM8K
    record that lost its '####' line is reported (file:line) instead of training on its whole
    reasoning text as the gold, and a plain {"question", "answer": "42"} file still reads as
    format (a).
    """

    first: str | None = None  # where the deciding record is
    is_gsm8k: bool = False

    def solution(self, value: Any, where: str, field: str) -> str:
        """The solution text of `value` (a record's `field`): GSM8K's final number when the
        file is GSM8K, else `value` as text."""
        if field != "answer" or not isinstance(value, str):
            return _solution_text(value, where, field)
        has_marker = GSM8K_MARKER in value
        if self.first is None:
            self.first, self.is_gsm8k = where, has_marker
        elif has_marker and not self.is_gsm8k:
            raise DataError(
                f"{where}: 'answer' has a GSM8K '{GSM8K_MARKER} <number>' line but the file's "
                f"first record ({self.first}) has none; GSM8K files need one in every record"
            )
        elif not has_marker and self.is_gsm8k:
            raise DataError(
                f"{where}: GSM8K 'answer' without its final '{GSM8K_MARKER} <number>' line "
                f"(the file is read as GSM8K because {self.first} has one)"
            )
        return gsm8k_final_number(value, where) if self.is_gsm8k else value


def gsm8k_final_number(answer: str, where: str) -> str:
    """'Natalia sold ... \n#### 1,234' -> '1234': the number after the last '####', thousands
    commas removed; DataError when it is not a number."""
    final = answer.rpartition(GSM8K_MARKER)[2].strip()
    number = final.replace(",", "")
    if not _NUMBER.fullmatch(number):
        raise DataError(
            f"{where}: GSM8K 'answer' must end with '{GSM8K_MARKER} <number>', "
            f"got '{GSM8K_MARKER} {final[:40]}'"
        )
    return number


# ---------------------------------------------------------------------------------------------
# (b) folder + index file


def find_index_file(folder: Path) -> Path:
    """The index of an OCR folder: labels.txt, label.txt or gt.txt (in this order), else the
    only *.txt whose first non-blank line holds a TAB. Several such files are ambiguous: pass
    the index file itself as the data path."""
    for name in INDEX_FILE_NAMES:
        if (folder / name).is_file():
            return folder / name
    candidates = [p for p in sorted(folder.glob("*.txt")) if _looks_like_index(p)]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise DataError(
            f"{folder}: no index file found: expected one of {', '.join(INDEX_FILE_NAMES)} or a "
            "*.txt file of 'image_name<TAB>text' lines"
        )
    names = ", ".join(p.name for p in candidates)
    raise DataError(f"{folder}: several index files ({names}); pass the one to use as the path")


def _looks_like_index(path: Path) -> bool:
    with path.open("rb") as f:
        for raw in f:
            if raw.strip():
                return b"\t" in raw
    return False


def _read_index(index: Path) -> Iterator[Parsed]:
    """`image_name<TAB>text` per line; image names are relative to the index file's folder.
    The query is left empty: the task's default query asks to read the image."""
    for where, line in _text_lines(index):
        if isinstance(line, DataError):
            yield line
            continue
        try:
            yield _index_sample(line, where, index.parent)
        except DataError as e:
            yield e


def _index_sample(line: str, where: str, base: Path) -> Sample:
    name, tab, label = line.partition("\t")
    if not tab:
        raise DataError(f"{where}: malformed line, expected 'image_name<TAB>text': {line[:60]!r}")
    if not name.strip():
        raise DataError(f"{where}: missing image name before the TAB")
    image = ImageRef(where=where, path=_resolve(name.strip(), where, base))
    sample = Sample(query="", solution=label.strip(), images=[image], columns={}, where=where)
    if not label.strip():
        raise EmptySolution(_empty_message(where, "missing text label after the TAB"), sample)
    return sample


# ---------------------------------------------------------------------------------------------
# (e) Parquet


def _read_parquet(path: Path, mapping: dict[str, str] | None = None) -> Iterator[Parsed]:
    """Rows of an HF-style Parquet file; rows are numbered from 0 like `dataset[i]`.

    Read one row group at a time, and embedded images are kept as ParquetCells (file, row
    group, row), not bytes: memory holds one row group, whatever the size of the file.
    """
    import pyarrow as pa  # imported here: only Parquet users pay for it
    import pyarrow.parquet as pq

    try:
        table_file = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read Parquet file: {e}") from e
    columns = table_file.schema_arrow.names
    mapping = mapping or {}
    query_col = _mapped_column(columns, mapping, QUERY_KEYS, path)
    query_col = query_col or _required_column(columns, PARQUET_QUERY_COLUMNS, path)
    solution_col = _mapped_column(columns, mapping, SOLUTION_KEYS, path)
    solution_col = solution_col or _required_column(columns, PARQUET_SOLUTION_COLUMNS, path)
    image_col = _mapped_column(columns, mapping, IMAGE_KEYS, path)
    image_col = image_col or next((c for c in PARQUET_IMAGE_COLUMNS if c in columns), None)
    gsm8k = Gsm8kDetector()  # openai/gsm8k's own Parquet files: question, answer
    cols = _ParquetColumns(query_col, solution_col, image_col)
    row = 0
    for group in range(table_file.num_row_groups):
        records = table_file.read_row_group(group).to_pylist()
        for in_group, record in enumerate(records):
            where = f"{path}:row {row}"
            row += 1
            try:
                yield _parquet_sample(record, where, path, cols, (group, in_group), gsm8k)
            except DataError as e:
                yield e


class _ParquetColumns:
    """Which columns of a Parquet file hold the query, the solution and the images."""

    def __init__(self, query: str, solution: str, image: str | None) -> None:
        self.query, self.solution, self.image = query, solution, image


def _parquet_sample(
    record: dict[str, Any],
    where: str,
    path: Path,
    cols: _ParquetColumns,
    position: tuple[int, int],  # (row group, row in it)
    gsm8k: Gsm8kDetector,
) -> Sample:
    images = _parquet_images(record, where, path, cols.image, *position)
    query = _query_text(record[cols.query], len(images), where, cols.query)
    solution = gsm8k.solution(record[cols.solution], where, cols.solution)
    used = {cols.query, cols.solution, cols.image}
    return _sample(query, solution, images, record, used, where, cols.solution)


def _parquet_images(
    record: dict[str, Any], where: str, path: Path, column: str | None, group: int, row: int
) -> list[ImageRef]:
    """Image cells of one row: embedded bytes become ParquetCells, paths stay paths."""
    value = record[column] if column else None
    if value is None:
        return []
    listed = isinstance(value, list)
    refs = []
    for i, item in enumerate(value if listed else [value]):
        embedded = isinstance(item, bytes | bytearray) or (
            isinstance(item, dict) and item.get("bytes") is not None
        )
        if embedded:
            cell = ParquetCell(path, group, row, column, i if listed else None)  # type: ignore[arg-type]
            refs.append(ImageRef(where=where, cell=cell))
        else:
            refs.append(_image_ref(item, where, path.parent))
    return refs


def _mapped_column(
    columns: list[str], mapping: dict[str, str], ours: tuple[str, ...], path: Path
) -> str | None:
    """The column --column-map names for one of `ours`; an error if the file lacks it."""
    for name in ours:
        if name in mapping:
            if mapping[name] not in columns:
                raise DataError(
                    f"{path}: column_map {name}={mapping[name]}: no column {mapping[name]!r}; "
                    f"the file has {columns}"
                )
            return mapping[name]
    return None


def _required_column(columns: list[str], names: tuple[str, ...], path: Path) -> str:
    found = next((c for c in names if c in columns), None)
    if found is None:
        wanted = " or ".join(repr(n) for n in names)
        raise DataError(f"{path}: missing column {wanted}; the file has {columns}")
    return found
