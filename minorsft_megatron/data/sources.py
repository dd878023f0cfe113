"""Where SFT records are read from: the file containers, each giving its records in order with their place.

  .jsonl, .jsonl.gz   one JSON object per line                        place: FILE:LINE
  .json               a JSON list of objects (or JSON lines)           place: FILE:LINE (where the object starts)
  .parquet            one record per row                               place: FILE: row N (from 0, as df.iloc[N])
  a directory         a Hugging Face `datasets` save_to_disk output    place: DIR[SPLIT]: row N (as ds[N])
                      (extra `data`; read locally, no network)

A record is handed on as JSON text (bytes: the worker parses it, so a malformed or duplicate-keyed object is
that record's error) or as a row dict (Parquet, Arrow; null fields are left out, as an absent key).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import zlib
from dataclasses import dataclass

from minorsft_megatron.errors import UserError

ROW_BATCH = 1024
BOM = "\ufeff".encode()
"""A UTF-8 byte-order mark, which some editors put at the start of a file: not part of the first record."""
CONTAINERS = ("jsonl", "jsonl.gz", "json", "parquet", "hf_dataset")


class SourceError(UserError):
    """An input that cannot be read as records; one line naming it."""


@dataclass(frozen=True)
class Source:
    path: str
    container: str
    """One of CONTAINERS."""
    split: str | None = None
    """The split read from a Hugging Face DatasetDict directory."""

    @property
    def label(self) -> str:
        return f"{self.path}[{self.split}]" if self.split else self.path

    def place(self, number: int) -> str:
        """Where record `number` (a line, or a row for Parquet and Arrow) is, for messages."""
        return f"{self.label}: row {number}" if self.container in ("parquet", "hf_dataset") else f"{self.path}:{number}"


def open_source(path: str, split: str | None = None) -> Source:
    """The source at `path`, checked readable; `split` chooses among a DatasetDict's splits."""
    if os.path.isdir(path):
        return Source(path, "hf_dataset", _hf_split(path, split))
    if not os.path.isfile(path):
        raise SourceError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise SourceError(f"{path}: the file is empty")
    name = path.lower()
    container = next((c for c in ("jsonl.gz", "parquet", "json") if name.endswith("." + c)), "jsonl")
    if container == "parquet":
        _require_module("pyarrow", path, "Parquet")
    return Source(path, container)


def _require_module(module: str, path: str, what: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise SourceError(f"{path}: reading {what} needs the '{module}' package: pip install 'minorsft-megatron[data]'")


def _hf_split(path: str, split: str | None) -> str | None:
    if os.path.isfile(os.path.join(path, "state.json")):
        if split is not None:
            raise SourceError(f"{path}: --split {split}: this dataset directory holds a single split")
        return None
    if not os.path.isfile(os.path.join(path, "dataset_dict.json")):
        raise SourceError(f"{path}: a directory, but not one written by datasets' save_to_disk (no state.json or "
                          "dataset_dict.json)")
    try:
        with open(os.path.join(path, "dataset_dict.json"), encoding="utf-8") as f:
            splits = list(json.load(f)["splits"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SourceError(f"{path}: dataset_dict.json is damaged ({type(err).__name__}: {err})")
    if split is None and len(splits) == 1:
        return splits[0]
    if split not in splits:
        raise SourceError(f"{path}: choose a split with --split ({', '.join(splits)})" if split is None else
                          f"{path}: --split {split}: no such split ({', '.join(splits)})")
    return split


def records(source: Source):
    """(line or row number, record) in file order: bytes of JSON text, or a row dict."""
    if source.container in ("jsonl", "jsonl.gz"):
        opener = gzip.open if source.container == "jsonl.gz" else open
        try:
            with opener(source.path, "rb") as f:
                for number, line in enumerate(f, start=1):
                    yield number, line.removeprefix(BOM) if number == 1 else line
        except (OSError, EOFError, zlib.error) as err:  # a truncated, damaged or non-gzip .gz
            raise SourceError(f"{source.path}: cannot be read: {err}")
    elif source.container == "json":
        yield from _json_list(source.path)
    else:
        yield from _rows(source)


def _json_list(path: str):
    """The objects of a JSON list, as JSON text, with the line each starts on; a file not starting with '[' is
    read as JSON lines. The list's structure must parse; each object is then checked as a record."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.removeprefix(BOM).decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise SourceError(f"{path}:{line}: invalid UTF-8 at byte {err.start}")
    at = len(text) - len(text.lstrip())
    if not text.startswith("[", at):
        yield from enumerate(text.encode("utf-8").splitlines(keepends=True), start=1)
        return
    decoder, line, counted = json.JSONDecoder(object_pairs_hook=lambda pairs: None), 1, 0
    at += 1
    while True:
        at = _skip_space(text, at)
        if text.startswith("]", at):
            _check_nothing_after(path, text, at + 1)
            return
        line += text.count("\n", counted, at)
        counted = at
        try:
            _, end = decoder.raw_decode(text, at)
        except json.JSONDecodeError as err:
            raise SourceError(f"{path}:{err.lineno}: malformed JSON list: {err.msg} at column {err.colno}")
        yield line, text[at:end].encode("utf-8")
        at = _skip_space(text, end)
        if text.startswith(",", at):
            at += 1
        elif not text.startswith("]", at):
            raise SourceError(f"{path}:{line + text.count(chr(10), counted, end)}: malformed JSON list: expected ',' "
                              "or ']' after an element")


def _check_nothing_after(path: str, text: str, at: int) -> None:
    """Only whitespace may follow the list (`cat a.json b.json` would otherwise lose b's records)."""
    rest = _skip_space(text, at)
    if rest < len(text):
        line = text.count("\n", 0, rest) + 1
        raise SourceError(f"{path}:{line}: malformed JSON list: more text after the list's closing ']'")


def _skip_space(text: str, at: int) -> int:
    while at < len(text) and text[at] in " \t\r\n":
        at += 1
    return at


def _rows(source: Source):
    """Rows of a Parquet file or a datasets directory as dicts, null fields left out."""
    batches = _parquet_batches(source.path) if source.container == "parquet" else _dataset_batches(source)
    number = 0
    for batch in batches:
        for row in batch:
            yield number, _without_nulls(row)
            number += 1


def _parquet_batches(path: str):
    import pyarrow
    import pyarrow.parquet as pq

    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=ROW_BATCH):
            yield batch.to_pylist()
    except (pyarrow.ArrowException, OSError) as err:
        raise SourceError(f"{path}: not a readable Parquet file: {str(err).splitlines()[0]}")


def _dataset_batches(source: Source):
    _require_module("datasets", source.path, "a Hugging Face datasets directory")
    import datasets

    try:
        dataset = datasets.load_from_disk(source.path)
        if source.split is not None:
            dataset = dataset[source.split]
        table = dataset.data.table if hasattr(dataset.data, "table") else dataset.data
    except Exception as err:  # datasets raises many kinds for a damaged directory
        raise SourceError(f"{source.label}: not a readable datasets directory: {str(err).splitlines()[0]}")
    for batch in table.to_batches(max_chunksize=ROW_BATCH):
        yield batch.to_pylist()


def _without_nulls(value):
    """Arrow gives every struct field of a column, null where a record had none: drop them, as absent keys."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def files_of(source: Source) -> list[str]:
    """The files whose bytes make the source (a datasets directory: all of them, in name order)."""
    if source.container != "hf_dataset":
        return [source.path]
    found = []
    for root, dirs, names in os.walk(source.path):
        dirs.sort()
        found += [os.path.join(root, name) for name in sorted(names)]
    return found


def sha256(source: Source) -> str:
    """SHA-256 of the source's bytes (a directory: its files' relative names and bytes)."""
    from minorsft_megatron.data.tokenizer import update_from_file

    files = files_of(source)
    digest = hashlib.sha256()
    for path in files:
        if len(files) > 1:
            digest.update(os.path.relpath(path, source.path).encode() + b"\0")
        update_from_file(digest, path)
    return digest.hexdigest()


def size(source: Source) -> int:
    return sum(os.path.getsize(path) for path in files_of(source))
