"""Hugging Face datasets as --data: a `save_to_disk` directory, or a folder of Parquet shards.

- `Dataset.save_to_disk(dir)` (state.json + *.arrow) or `DatasetDict.save_to_disk(dir)`
  (dataset_dict.json + one such directory per split): read with `datasets.load_from_disk`;
  image columns are read undecoded ({"bytes", "path"} dicts, as datasets stores them).
- a folder of Parquet shards as the hub stores them (`data/train-00000-of-00002.parquet`,
  ...): the shards of the split, in name order, each read lazily like one .parquet file.

The split: --data-split, else "train" when there is one, else the only one. The seeds' column
names are recognised as in the JSON formats (image/problem/solution, messages/images/solution,
query/response/image_path, question/answer of GSM8K); `--column-map problem=query,image=img`
names the dataset's columns for the others (our name=their column).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data.sample import DataError

OUR_NAMES = ("problem", "query", "question", "solution", "response", "answer", "image",
             "images", "image_path", "messages")  # fmt: skip


def parse_column_map(spec: str | dict[str, str] | None) -> dict[str, str]:
    """'problem=query,image=img' -> {"problem": "query", "image": "img"} (ours -> theirs)."""
    if not spec:
        return {}
    if isinstance(spec, dict):
        return dict(spec)
    mapping = {}
    for part in spec.split(","):
        ours, eq, theirs = part.partition("=")
        if not eq or not ours.strip() or not theirs.strip():
            raise DataError(f"column_map {spec!r}: expected 'ours=theirs,...', got {part!r}")
        if ours.strip() not in OUR_NAMES:
            raise DataError(f"column_map {spec!r}: {ours.strip()!r} is not one of {OUR_NAMES}")
        mapping[ours.strip()] = theirs.strip()
    return mapping


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (
        (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
    )


def parquet_shards(path: Path, split: str | None) -> list[Path] | None:
    """The split's Parquet shards of a folder (None: not a folder of Parquet files)."""
    if not path.is_dir():
        return None
    files = sorted(path.rglob("*.parquet"))
    if not files:
        return None
    splits = sorted({f.name.split("-")[0] for f in files if "-" in f.name})
    chosen = choose_split(path, splits, split) if splits else None
    if chosen is None:
        return files
    return [f for f in files if f.name.startswith(f"{chosen}-")]


def choose_split(path: Path, splits: list[str], wanted: str | None) -> str:
    if wanted is not None:
        if wanted not in splits:
            raise DataError(f"{path}: no split {wanted!r}; the dataset has {splits}")
        return wanted
    if "train" in splits:
        return "train"
    if len(splits) == 1:
        return splits[0]
    raise DataError(f"{path}: several splits {splits}; choose one with --data-split")


def rename(record: dict[str, Any], mapping: dict[str, str], where: str) -> dict[str, Any]:
    """The record with the mapped columns under our names (a missing one is an error)."""
    if not mapping:
        return record
    out = {k: v for k, v in record.items() if k not in mapping.values()}
    for ours, theirs in mapping.items():
        if theirs not in record:
            raise DataError(
                f"{where}: column_map {ours}={theirs}: no column {theirs!r}; the dataset has "
                f"{sorted(record)}"
            )
        out[ours] = record[theirs]
    return out


def saved_dataset_records(path: Path, split: str | None) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) of a save_to_disk directory's split; images undecoded, PIL ones as bytes."""
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"{path}: a saved Hugging Face dataset needs `pip install datasets`") from e
    try:
        loaded = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot load the saved dataset: {e}") from e
    name = path.name
    if isinstance(loaded, datasets.DatasetDict):
        name = choose_split(path, sorted(loaded), split)
        loaded = loaded[name]
    for column, feature in loaded.features.items():
        if isinstance(feature, datasets.Image):
            loaded = loaded.cast_column(column, datasets.Image(decode=False))
    for i, row in enumerate(loaded):
        yield f"{path}[{name}]:row {i}", {k: pil_to_bytes(v) for k, v in row.items()}


def pil_to_bytes(value: Any) -> Any:
    """A PIL image (or a list of them) as PNG bytes; anything else unchanged."""
    if isinstance(value, list):
        return [pil_to_bytes(v) for v in value]
    if hasattr(value, "save") and hasattr(value, "mode"):  # a PIL.Image without importing PIL
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return buffer.getvalue()
    return value
