"""Any preference data users bring -> {prompt, chosen, rejected} -> validated -> tokenized pairs -> batches.

Formats are detected from the columns (after the user's ``data.columns`` mapping):

- standard: ``prompt``, ``chosen``, ``rejected`` strings;
- conversational: the same keys holding ``[{role, content}, ...]`` lists, rendered with the tokenizer's chat template;
- implicit: only ``chosen`` and ``rejected``, full transcripts sharing a prefix (strings as in Anthropic HH-RLHF, or
  message lists as in UltraFeedback binarized); the shared prefix becomes the prompt;
- sharegpt: LLaMA-Factory's preference files, ``conversations`` of ``{from, value}`` turns and ``chosen``/``rejected``
  as single ``{from, value}`` messages, with an optional ``system`` column.

An optional ``margin`` column is kept (the reward loss subtracts it). Rows that can't be used are skipped and
counted with the reason, or refused at the first one (``data.on_bad_rows=error``); the report says which rows.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .tiny import resolve_dataset

LOCAL_KINDS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
ROLE_NAMES = ("prompt", "chosen", "rejected", "margin", "system")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "function_call": "assistant", "observation": "tool", "tool": "tool"}
# A plain template for tokenizers that have none: readable, and it puts the end-of-sequence token after answers.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}System: {{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n\n"
    "{% else %}Assistant: {{ m['content'] }}{{ eos_token if eos_token else '' }}"
    "{% if not loop.last %}\n\n{% endif %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant: {% endif %}"
)


class DataError(ValueError):
    """A user error in the data: the message names the file, row or column and what would fix it."""


class RowError(ValueError):
    def __init__(self, column: str, reason: str):
        super().__init__(f"column '{column}': {reason}")
        self.column, self.reason = column, reason


@dataclass
class Pair:
    """One tokenized preference pair; the prompt is stored once (the shared-prompt path needs exactly this)."""
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: float = 0.0
    row: int = 0  # 1-based row in the source, for messages

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


@dataclass
class DataReport:
    source: str
    format: str
    total_rows: int = 0
    usable: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> count
    dropped_rows: dict = field(default_factory=dict)  # reason -> first few 1-based row numbers
    truncated_prompts: int = 0
    truncated_answers: int = 0  # items where truncation cut into an answer
    lengths: list = field(default_factory=list)  # tokens of each item before truncation (see lengths_are)
    max_length: int = 0
    # What the numbers count and mean, in the words of the task that made the report (a pair task's by default):
    unit: str = "pairs"  # what one usable item is
    lengths_are: str = "prompt + longer answer"  # what one entry of ``lengths`` measures
    answer_cut: str = "the cut removes part of where chosen and rejected differ"  # what a cut answer costs

    def drop(self, reason: str, row: int) -> None:
        self.dropped[reason] += 1
        self.dropped_rows.setdefault(reason, [])
        if len(self.dropped_rows[reason]) < 5:
            self.dropped_rows[reason].append(row)

    def summary(self) -> str:
        lines = [f"{self.source}: format {self.format}, {self.total_rows} rows, {self.usable} usable {self.unit}"]
        for reason, n in self.dropped.most_common():
            rows = ", ".join(map(str, self.dropped_rows[reason]))
            lines.append(f"  skipped {n} row(s): {reason} (rows {rows}{', ...' if n > 5 else ''})")
        if self.truncated_prompts:
            lines.append(f"  {self.truncated_prompts} prompt(s) cut from the left to max_prompt_length")
        if self.truncated_answers:
            share = self.truncated_answers / max(self.usable, 1)
            lines.append(f"  {self.truncated_answers} {self.unit.rstrip('s')}(s) ({share:.0%}) had answers cut to "
                         f"max_length ({self.max_length}); {self.answer_cut}")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"source": self.source, "format": self.format, "total_rows": self.total_rows, "usable": self.usable,
                "dropped": dict(self.dropped), "dropped_rows": self.dropped_rows,
                "truncated_prompts": self.truncated_prompts, "truncated_answers": self.truncated_answers,
                "max_length": self.max_length, "unit": self.unit}


# ----------------------------------------------------------------------------------------------------------------
# Loading rows

# What a file of each kind must hold, for messages that say how to fix one
FILE_SHAPES = {".jsonl": "one JSON object per line, with prompt, chosen and rejected keys",
               ".json": "a list of JSON objects with prompt, chosen and rejected keys (or one object per line)",
               ".csv": "a header line naming the columns (e.g. prompt,chosen,rejected) and one row per pair; fields "
                       "holding commas, quotes or line breaks go in double quotes",
               ".parquet": "a table with prompt, chosen and rejected columns"}


def _json_kind(value: Any) -> str:
    """A parsed value's name in JSON's own terms (users know their file, not Python's types)."""
    kinds = {dict: "object", list: "list", str: "string", bool: "true/false", type(None): "null"}
    return kinds.get(type(value), "number")


def _check_text(path: Path) -> None:
    """Refuse by name what the readers would turn into a confusing error or a crash: an empty or whitespace-only
    file (``datasets``' JSON reader raised a bare StopIteration), UTF-16/32 or other non-UTF-8 text (Arrow took the
    bytes and failed only when rows were read back), binary data. Streams the file: a data file may not fit in memory.
    A UTF-8 byte-order mark (Excel and Notepad write one) is fine: the readers drop it."""
    import codecs

    shape = FILE_SHAPES[path.suffix.lower()]
    with open(path, "rb") as f:
        head = f.read(4)
        for mark, name in ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
                           (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16")):
            if head.startswith(mark):
                raise DataError(f"{path}: the file is {name} text; save it as UTF-8 (e.g. your editor's Save As, "
                                "encoding UTF-8)")
        f.seek(len(codecs.BOM_UTF8) if head.startswith(codecs.BOM_UTF8) else 0)
        decoder = codecs.getincrementaldecoder("utf-8")()
        blank, line = True, 1
        while chunk := f.read(1 << 20):
            nul = chunk.find(b"\0")
            if nul >= 0:
                at = line + chunk.count(b"\n", 0, nul)
                raise DataError(f"{path}: line {at} holds a NUL byte, so this is not a text file (binary, compressed, "
                                f"or UTF-16 without a byte-order mark). It needs to be UTF-8 text: {shape}")
            pending = len(decoder.getstate()[0])  # bytes of a character cut by the previous chunk
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError as e:
                at = line + chunk.count(b"\n", 0, max(e.start - pending, 0))
                raise DataError(f"{path}: line {at} is not UTF-8 text (byte 0x{e.object[e.start]:02x}; Latin-1 or "
                                "Windows-1252 perhaps); save the file as UTF-8") from None
            blank = blank and not text.strip()
            line += chunk.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise DataError(f"{path}: the file ends in the middle of a UTF-8 character (cut off?); save it again "
                            "as UTF-8") from None
    if blank:
        what = "empty" if path.stat().st_size == 0 else "only whitespace"
        raise DataError(f"{path}: the file is {what}; it needs {shape}")


def _json_wrapper_key(value: Any) -> str | None:
    """The key of a .json object that only wraps the rows, as in ``{"data": [{...}, ...]}`` (what ``datasets``
    calls a field); None for an object that is itself one row."""
    if isinstance(value, dict) and len(value) == 1:
        key, rows = next(iter(value.items()))
        if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
            return key
    return None


def _json_diagnose(path: Path) -> str | None:
    """Re-read a JSON/JSONL file with the standard parser to name the line that breaks it, and the shapes that parse
    but hold no rows (an empty list, a list of numbers: Arrow would read those as a 'text' column). Returns the key
    of an object that wraps the rows (see :func:`_json_wrapper_key`)."""
    _check_text(path)
    text = path.read_text(encoding="utf-8-sig")
    shape = FILE_SHAPES[path.suffix.lower()]
    if path.suffix.lower() == ".json" and text.lstrip().startswith(("[", "{")):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            if not (e.msg == "Extra data" and text.lstrip().startswith("{")):
                raise DataError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}. The file "
                                f"needs to hold {shape}") from None
            value = None  # JSON Lines in a file named .json: checked line by line below
        if isinstance(value, list):
            if not value:
                raise DataError(f"{path}: the file holds an empty list; it needs {shape}")
            bad = next((i for i, r in enumerate(value, 1) if not isinstance(r, dict)), None)
            if bad:
                raise DataError(f"{path}: item {bad} of the list is a JSON {_json_kind(value[bad - 1])}, not an "
                                f"object; the file needs {shape}")
            return None
        if isinstance(value, dict):
            if not value:
                raise DataError(f"{path}: the file holds an empty object; it needs {shape}")
            return _json_wrapper_key(value)
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            hint = f"the file needs {shape}"
            if path.suffix.lower() == ".jsonl" and text.lstrip().startswith(("[", "{")):
                try:
                    json.loads(text)
                    hint = ("the file is one JSON document over several lines: name it .json, or put one object on "
                            "each line")
                except json.JSONDecodeError:
                    pass
            raise DataError(f"{path}: line {lineno} is not valid JSON ({e.msg} at column {e.colno}); {hint}") from None
        if not isinstance(value, dict):
            raise DataError(f"{path}: line {lineno} is a JSON {_json_kind(value)}, not an object; the file needs "
                            f"{shape}")
    return None


def _read_json_rows(path: Path, field: str | None = None) -> list[dict]:
    """Plain-Python fallback for JSON files whose rows mix types (Arrow can't hold those; we report them per row).
    Runs after :func:`_json_diagnose`, so the file parses and every row is an object."""
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        return json.loads(text)
    if path.suffix.lower() == ".json" and text.lstrip().startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:  # JSON Lines in a file named .json
            pass
        else:
            return obj[field] if field else [obj]
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _load_file(path: Path) -> list[dict]:
    """One local file's rows; every way a file can be malformed ends in a DataError that names it."""
    import datasets

    suffix = path.suffix.lower()
    kind = LOCAL_KINDS.get(suffix)
    if kind is None:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; use .jsonl, .json, .csv or .parquet")
    name, field = {"json": "JSON", "csv": "CSV", "parquet": "Parquet"}[kind], None
    if kind == "json":
        field = _json_diagnose(path)
    elif kind == "csv":
        _check_text(path)
    elif path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty; it needs {FILE_SHAPES[suffix]}")
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train", **({"field": field} if field else {}))
    except datasets.exceptions.DatasetGenerationError as e:
        if kind == "json":
            return _read_json_rows(path, field)  # mixed types across rows: validate them one by one
        raise DataError(f"{path}: could not be read as {name} ({str(e.__cause__ or e).strip()}); the file needs "
                        f"{FILE_SHAPES[suffix]}") from None
    except ValueError as e:  # datasets' words for a file with no rows, Arrow's for a damaged Parquet file
        reason = "the file has no rows" if "corresponds to no data" in str(e) else \
            f"could not be read as {name} ({str(e).strip()})"
        raise DataError(f"{path}: {reason}; it needs {FILE_SHAPES[suffix]}") from None
    return ds.to_list()


# How far a dataset folder is searched for data files: a sharded dataset has hundreds of files a few levels down;
# a folder past these bounds is not a dataset (dataset=/ walked the whole filesystem).
MAX_FOLDER_ENTRIES = 10_000
MAX_FOLDER_DEPTH = 6


def _folder_files(path: Path) -> tuple[list[Path], str]:
    """The data files of a folder and their one reader kind (json, csv, parquet), or a DataError naming the folder."""
    files = _data_files(path)
    if not files:
        raise DataError(f"{path}: folder has no .jsonl, .json, .csv or .parquet files")
    kinds = {LOCAL_KINDS[p.suffix.lower()] for p in files}
    if len(kinds) > 1:
        raise DataError(f"{path}: folder mixes file types ({', '.join(sorted(kinds))}); keep one kind")
    return files, kinds.pop()


def _data_files(path: Path) -> list[Path]:
    """The data files under a folder, sorted; DataError naming the folder when it holds more than
    MAX_FOLDER_ENTRIES files and folders, or folders deeper than MAX_FOLDER_DEPTH."""
    files, seen = [], 0
    for root, dirs, names in os.walk(path):
        seen += len(dirs) + len(names)
        depth = len(Path(root).relative_to(path).parts)
        if seen > MAX_FOLDER_ENTRIES or (dirs and depth >= MAX_FOLDER_DEPTH):
            too = f"more than {MAX_FOLDER_ENTRIES:,} entries" if seen > MAX_FOLDER_ENTRIES else \
                f"folders more than {MAX_FOLDER_DEPTH} levels deep"
            raise DataError(f"{path}: this folder holds {too}, too many to be a dataset; point dataset at the "
                            "folder of the data files, or at one file")
        files += [Path(root) / n for n in names if Path(n).suffix.lower() in LOCAL_KINDS]
    return sorted(files)


def _saved_dataset(path: Path) -> bool:
    """Whether a folder is one ``save_to_disk`` wrote (a Dataset or a DatasetDict), read with ``load_from_disk``."""
    return any((path / name).is_file() for name in ("dataset_dict.json", "dataset_info.json", "state.json"))


@contextlib.contextmanager
def _dataset_errors(source: str, split: str):
    """The readers' and the hub's exceptions as one DataError naming the source (DataErrors pass as they are)."""
    import datasets

    try:
        yield
    except DataError:
        raise
    except ValueError as e:  # datasets' wording for unknown splits and the like
        raise DataError(f"dataset '{source}' (split '{split}'): {e}") from None
    except (FileNotFoundError, ConnectionError, OSError) as e:
        raise DataError(f"dataset '{source}' could not be loaded: {e}. Check the path, or the hub id and your "
                        "network (HF_HUB_OFFLINE=1 uses only the local cache)") from None
    except datasets.exceptions.DatasetGenerationError as e:
        raise DataError(f"dataset '{source}' could not be read: {e.__cause__ or e}") from None


def load_rows(source: str, split: str = "train", trust_remote_code: bool = False) -> list[dict]:
    """Rows of a local file/folder or hub dataset as plain dicts (``datasets`` does the reading and caching)."""
    import datasets

    source = resolve_dataset(source)
    path = Path(source).expanduser()
    with _dataset_errors(source, split):
        if path.is_file():
            return _load_file(path)
        elif path.is_dir():
            if _saved_dataset(path):
                ds = datasets.load_from_disk(str(path))
                if isinstance(ds, datasets.DatasetDict):
                    ds = _pick_split(ds, split, str(path))
            else:
                files, kind = _folder_files(path)
                for p in files:  # one empty or non-UTF-8 file would break the reader for all
                    if p.suffix.lower() != ".parquet":
                        _check_text(p)
                ds = datasets.load_dataset(kind, data_files=[str(p) for p in files], split="train")
        elif path.suffix.lower() in LOCAL_KINDS or source.startswith((".", "/", "~")):
            raise DataError(f"dataset file '{source}' does not exist")
        else:
            ds = datasets.load_dataset(source, split=split, trust_remote_code=trust_remote_code) \
                if trust_remote_code else datasets.load_dataset(source, split=split)
    return ds.to_list()


# ----------------------------------------------------------------------------------------------------------------
# The first rows only: what the app's data check reads. A whole file in Python lists, tokenized, took the app from
# 0.5 to 2.8 GB for a 21 MB upload (20 GB for 200 MB); a bounded sample costs the same whatever the file's size.

MAX_ITEM_BYTES = 16 << 20  # one JSON item larger than this is refused rather than read into memory whole


def sample_rows(source: str, limit: int, split: str = "train", trust_remote_code: bool = False
                ) -> tuple[list[dict], int | None]:
    """The first ``limit`` rows of a dataset, and how many it has (None where that is unknown without reading it
    all: a hub dataset without split sizes, a folder of files). Memory is bounded by ``limit``, not by the file:
    local files are streamed (the rest only counted), a hub dataset is streamed and stops after ``limit`` rows.
    A malformed file fails with :func:`load_rows`' messages where the first rows show it."""
    import datasets

    source = resolve_dataset(source)
    path = Path(source).expanduser()
    with _dataset_errors(source, split):
        if path.is_file():
            return _sample_file(path, limit)
        if path.is_dir() and _saved_dataset(path):
            ds = datasets.load_from_disk(str(path))  # memory-mapped: selecting rows reads only those
            if isinstance(ds, datasets.DatasetDict):
                ds = _pick_split(ds, split, str(path))
            return ds.select(range(min(limit, len(ds)))).to_list(), len(ds)
        if path.is_dir():
            files, _ = _folder_files(path)
            rows, total = [], 0
            for f in files:
                got, n = _sample_file(f, limit - len(rows)) if len(rows) < limit else ([], None)
                rows += got
                total = None if total is None or n is None else total + n
            return rows, total
        if path.suffix.lower() in LOCAL_KINDS or source.startswith((".", "/", "~")):
            raise DataError(f"dataset file '{source}' does not exist")
        extra = {"trust_remote_code": True} if trust_remote_code else {}
        ds = datasets.load_dataset(source, split=split, streaming=True, **extra)
        rows = [dict(r) for _, r in zip(range(limit), ds)]
        sizes = getattr(ds.info, "splits", None) or {}
        total = sizes[split].num_examples if split in sizes and sizes[split].num_examples else None
        return rows, total


def _sample_file(path: Path, limit: int) -> tuple[list[dict], int]:
    """One local file's first ``limit`` rows and its row count, streamed."""
    suffix = path.suffix.lower()
    kind = LOCAL_KINDS.get(suffix)
    if kind is None:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; use .jsonl, .json, .csv or .parquet")
    if kind == "parquet":
        return _sample_parquet(path, limit)
    _check_text(path)  # streamed: encodings, NUL bytes, an empty file, in load_rows' words
    if kind == "csv":
        return _sample_csv(path, limit)
    with open(path, encoding="utf-8-sig") as f:
        first = ""
        while not first and (chunk := f.read(4096)):
            first = chunk.lstrip()[:1]
    if suffix == ".json" and first == "[":
        return _sample_json_list(path, limit)
    rows, total = _sample_json_lines(path, limit)
    if suffix == ".json" and total == 1 and (key := _json_wrapper_key(rows[0])):
        return rows[0][key][:limit], len(rows[0][key])  # {"data": [...]} on one line
    return rows, total


def _sample_json_lines(path: Path, limit: int) -> tuple[list[dict], int]:
    """JSON Lines (or one JSON document over several lines, in a .json file: read whole, up to MAX_ITEM_BYTES)."""
    rows, total = [], 0
    shape = FILE_SHAPES[path.suffix.lower()]
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            total += 1
            if len(rows) >= limit:
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                if total == 1 and path.suffix.lower() == ".json":
                    return _sample_json_document(path, limit)
                raise DataError(f"{path}: line {lineno} is not valid JSON ({e.msg} at column {e.colno}); the file "
                                f"needs {shape}") from None
            if not isinstance(value, dict):
                raise DataError(f"{path}: line {lineno} is a JSON {_json_kind(value)}, not an object; the file needs "
                                f"{shape}")
            rows.append(value)
    return rows, total


def _sample_json_document(path: Path, limit: int) -> tuple[list[dict], int]:
    """A .json file holding one object over several lines: one row, or a wrapper of the rows."""
    if path.stat().st_size > MAX_ITEM_BYTES:
        raise DataError(f"{path}: one JSON object of {path.stat().st_size >> 20} MB is more than the data check reads "
                        "at once; save the rows as JSON Lines (.jsonl, one object per line)")
    _json_diagnose(path)
    value = json.loads(path.read_text(encoding="utf-8-sig"))
    key = _json_wrapper_key(value)
    rows = value[key] if key else [value]
    return rows[:limit], len(rows)


def _sample_json_list(path: Path, limit: int) -> tuple[list[dict], int]:
    """A .json list of objects, read item by item from a 1 MB window: the first ``limit`` kept, the rest counted."""
    import re

    decoder, space, shape = json.JSONDecoder(), re.compile(r"\s*"), FILE_SHAPES[".json"]
    rows, total = [], 0
    with open(path, encoding="utf-8-sig") as f:
        buf, pos = "", 0

        def refill() -> bool:
            nonlocal buf, pos
            more = f.read(1 << 20)
            buf, pos = buf[pos:] + more, 0
            return bool(more)

        def next_char() -> str:
            nonlocal pos
            while True:
                pos = space.match(buf, pos).end()
                if pos < len(buf):
                    return buf[pos]
                if not refill():
                    return ""

        next_char()
        pos += 1  # the "[" (_sample_file looked)
        if next_char() == "]":
            raise DataError(f"{path}: the file holds an empty list; it needs {shape}")
        while True:
            while True:
                try:
                    value, pos = decoder.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError as e:  # cut by the window, or broken
                    if len(buf) - pos > MAX_ITEM_BYTES:
                        big = f"is larger than {MAX_ITEM_BYTES >> 20} MB or not valid JSON"
                        raise DataError(f"{path}: item {total + 1} of the list {big}; the file needs {shape}") from None
                    if not refill():
                        raise DataError(f"{path}: item {total + 1} of the list is not valid JSON ({e.msg}); the file "
                                        f"needs {shape}") from None
            total += 1
            if not isinstance(value, dict):
                raise DataError(f"{path}: item {total} of the list is a JSON {_json_kind(value)}, not an object; the "
                                f"file needs {shape}")
            if len(rows) < limit:
                rows.append(value)
            after = next_char()
            if after == "]":
                return rows, total
            if after != ",":
                raise DataError(f"{path}: invalid JSON after item {total} of the list (expected ',' or ']'); the "
                                f"file needs {shape}")
            pos += 1
            next_char()


def _sample_csv(path: Path, limit: int) -> tuple[list[dict], int]:
    """The first rows as ``datasets`` reads a CSV (pandas: numbers and booleans typed, empty fields null)."""
    import pandas as pd

    try:
        frame = pd.read_csv(path, nrows=limit, encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file has no rows; it needs {FILE_SHAPES['.csv']}") from None
    except (pd.errors.ParserError, ValueError) as e:
        raise DataError(f"{path}: could not be read as CSV ({str(e).strip()}); the file needs "
                        f"{FILE_SHAPES['.csv']}") from None
    rows = frame.astype(object).where(frame.notna(), None).to_dict("records")
    try:  # counted in chunks of one column: the parse is the reader's, the memory one chunk's
        total = sum(len(chunk) for chunk in pd.read_csv(path, usecols=[0], chunksize=50_000, encoding="utf-8-sig"))
    except (pd.errors.ParserError, ValueError) as e:
        raise DataError(f"{path}: could not be read as CSV past its first rows ({str(e).strip()}); the file needs "
                        f"{FILE_SHAPES['.csv']}") from None
    if not rows:
        raise DataError(f"{path}: the file has no rows; it needs {FILE_SHAPES['.csv']}")
    return rows, max(total, len(rows))


def _sample_parquet(path: Path, limit: int) -> tuple[list[dict], int]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
        batch = next(table.iter_batches(batch_size=limit), None)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: could not be read as Parquet ({str(e).strip()}); it needs "
                        f"{FILE_SHAPES['.parquet']}") from None
    if batch is None or not table.metadata.num_rows:
        raise DataError(f"{path}: the file has no rows; it needs {FILE_SHAPES['.parquet']}")
    return batch.to_pylist(), table.metadata.num_rows


def _pick_split(dd, split: str, source: str):
    if split in dd:
        return dd[split]
    raise DataError(f"dataset '{source}' has no split '{split}'; it has {', '.join(dd)} (set dataset_split=...)")


# ----------------------------------------------------------------------------------------------------------------
# Formats

def apply_column_mapping(rows: list[dict], columns: dict, source: str) -> list[dict]:
    if not columns or not rows:
        return rows
    present = set(rows[0])
    for role, col in columns.items():
        if col not in present:
            raise DataError(f"{source}: data.columns.{role}={col} names a column that does not exist; columns are "
                            f"{', '.join(sorted(present))}")
    rename = {col: role for role, col in columns.items()}
    return [{rename.get(k, k): v for k, v in row.items()} for row in rows]


def detect_format(rows: list[dict], source: str) -> str:
    if not rows:
        raise DataError(f"{source}: the dataset has no rows")
    cols = set(rows[0])
    if {"conversations", "chosen", "rejected"} <= cols:
        return "sharegpt"
    if {"chosen", "rejected"} <= cols:
        sample = next((r for r in rows if r.get("chosen") is not None), rows[0])
        conversational = isinstance(sample.get("chosen"), (list, dict))
        if "prompt" in cols:
            return "conversational" if conversational else "standard"
        return "implicit_conversational" if conversational else "implicit"
    missing = [c for c in ("chosen", "rejected") if c not in cols]
    raise DataError(f"{source}: no '{missing[0]}' column. Columns are {', '.join(sorted(cols))}. Preference data "
                    "needs prompt/chosen/rejected (or conversations/chosen/rejected); map yours with e.g. "
                    f"data.columns.{missing[0]}=<your column>")


def _text(row: dict, col: str) -> str:
    value = row.get(col)
    if value is None:
        raise RowError(col, "is missing or null")
    if not isinstance(value, str):
        raise RowError(col, f"must be text, got {type(value).__name__}")
    if not value.strip():
        raise RowError(col, "is empty")
    return value


def _messages(value: Any, col: str, default_role: str | None = None) -> list[dict]:
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, str) and default_role:
        value = [{"role": default_role, "content": value}]
    if not isinstance(value, list) or not value:
        raise RowError(col, "must be a non-empty list of {role, content} messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise RowError(col, f"message {i} is not an object")
        if "from" in m and "value" in m:  # ShareGPT turns
            role = SHAREGPT_ROLES.get(str(m["from"]).lower())
            if role is None:
                raise RowError(col, f"message {i} has unknown speaker '{m['from']}'")
            m = {"role": role, "content": m["value"]}
        if "role" not in m or "content" not in m:
            raise RowError(col, f"message {i} needs 'role' and 'content' keys")
        if not isinstance(m["content"], str):
            raise RowError(col, f"message {i} content must be text")
        out.append({"role": str(m["role"]), "content": m["content"]})
    if not any(m["content"].strip() for m in out):
        raise RowError(col, "is empty")
    return out


def _split_text_prefix(chosen: str, rejected: str) -> tuple[str, str, str]:
    """HH-RLHF style: the prompt is the shared prefix, cut after the last 'Assistant:' marker if there is one."""
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    prefix = chosen[:n]
    marker = prefix.rfind("Assistant:")
    if marker >= 0:
        n = marker + len("Assistant:")
    else:
        while n > 0 and not chosen[n - 1].isspace():  # never split a word
            n -= 1
    if n == 0:
        raise RowError("chosen", "shares no prompt with 'rejected'; add a prompt column")
    return chosen[:n], chosen[n:], rejected[n:]


def _shared_turns(chosen: list[dict], rejected: list[dict]) -> int:
    """How many leading messages the two transcripts share (always leaving each at least one of its own)."""
    k = 0
    while k < min(len(chosen), len(rejected)) - 1 and chosen[k] == rejected[k]:
        k += 1
    return k


def normalize_row(row: dict, fmt: str) -> dict:
    """One raw row -> {prompt, chosen, rejected, margin}; prompt/answers are text or message lists."""
    margin = row.get("margin", 0.0)
    if margin is None:
        margin = 0.0
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise RowError("margin", f"must be a number, got {margin!r}")
    if fmt == "standard":
        prompt, chosen, rejected = _text(row, "prompt"), _text(row, "chosen"), _text(row, "rejected")
        if isinstance(row.get("system"), str) and row["system"].strip():
            prompt = row["system"].rstrip() + "\n\n" + prompt
    elif fmt == "implicit":
        prompt, chosen, rejected = _split_text_prefix(_text(row, "chosen"), _text(row, "rejected"))
    elif fmt in ("conversational", "sharegpt", "implicit_conversational"):
        chosen = _messages(row.get("chosen"), "chosen", default_role="assistant")
        rejected = _messages(row.get("rejected"), "rejected", default_role="assistant")
        k = _shared_turns(chosen, rejected)
        if fmt == "implicit_conversational":
            if k == 0:
                raise RowError("chosen", "shares no prompt turns with 'rejected'; add a prompt column")
            prompt = chosen[:k]
        else:
            col = "conversations" if fmt == "sharegpt" else "prompt"
            prompt = _messages(row.get(col), col, default_role="user")
            # UltraFeedback binarized: a prompt column *and* answers that repeat the conversation before them
            if k:
                prompt = chosen[:k] if chosen[k - 1] == prompt[-1] else prompt + chosen[:k]
        chosen, rejected = chosen[k:], rejected[k:]
        system = row.get("system")
        if isinstance(system, str) and system.strip() and prompt[0]["role"] != "system":
            prompt = [{"role": "system", "content": system}] + prompt
    else:
        raise ValueError(fmt)
    if chosen == rejected:
        raise RowError("chosen", "is identical to 'rejected' (nothing to learn from)")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "margin": float(margin)}


# ----------------------------------------------------------------------------------------------------------------
# Rendering and tokenizing

def ensure_chat_template(tokenizer, override: str | None = None) -> None:
    if override:
        tokenizer.chat_template = override
    elif not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE


def render(pair: dict, tokenizer) -> tuple[str, str, str, bool]:
    """Text of prompt, chosen and rejected as the model sees them; the flag says a chat template was applied."""
    prompt, (chosen, rejected), templated = render_answers(pair["prompt"], {"chosen": pair["chosen"],
                                                                           "rejected": pair["rejected"]}, tokenizer)
    return prompt, chosen, rejected, templated


def render_answers(prompt, answers: dict, tokenizer) -> tuple[str, list[str], bool]:
    """Text of a prompt and of each answer after it (``answers``: column name -> answer), as the model sees them;
    the flag says a chat template was applied (message lists). Each answer's text is what the template adds after
    the rendered prompt, so the answer tokens are exactly the ones that carry loss."""
    if isinstance(prompt, str):
        return prompt, list(answers.values()), False
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    out = []
    for side, answer in answers.items():
        full = tokenizer.apply_chat_template(prompt + answer, tokenize=False)
        if not full.startswith(prompt_text):
            raise RowError(side, "the chat template renders prompt + answer so that it does not start with the "
                                 "rendered prompt; set data.chat_template to a template that appends answers")
        out.append(full[len(prompt_text):])
    return prompt_text, out, True


def tokenize_rendered(tokenizer, texts: list[tuple[str, str, str, bool]]) -> list[tuple[list, list, list]]:
    """:func:`tokenize_answers` for (prompt, chosen, rejected, templated) texts."""
    return [(p, c, r) for p, (c, r) in tokenize_answers(tokenizer, [(t[0], [t[1], t[2]], t[3]) for t in texts])]


def tokenize_answers(tokenizer, texts: list[tuple[str, list[str], bool]]) -> list[tuple[list, list[list]]]:
    """Batched tokenization of (prompt, answers, templated): prompts keep the tokenizer's special tokens unless a
    template already wrote them; plain-text answers get the eos token appended so the model learns to stop."""
    def ids(strings, special):
        return tokenizer(strings, add_special_tokens=special)["input_ids"] if strings else []

    plain_prompts = iter(ids([t[0] for t in texts if not t[2]], True))
    tmpl_prompts = iter(ids([t[0] for t in texts if t[2]], False))
    answers = iter(ids([a for t in texts for a in t[1]], False))
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = []
    for _, answer_texts, templated in texts:
        prompt = list(next(tmpl_prompts) if templated else next(plain_prompts))
        out.append((prompt, [list(next(answers)) + ([] if templated else eos) for _ in answer_texts]))
    return out


def truncate(prompt: list, chosen: list, rejected: list, max_length: int, max_prompt_length: int):
    """Prompts lose tokens from the left (keeping the question's end), answers from the right."""
    cut_prompt = len(prompt) > max_prompt_length
    if cut_prompt:
        prompt = prompt[-max_prompt_length:]
    room = max_length - len(prompt)
    cut_answer = len(chosen) > room or len(rejected) > room
    return prompt, chosen[:room], rejected[:room], cut_prompt, cut_answer


def display_pieces(tokenizer, parts: list[tuple[list[int], str]]) -> list[list]:
    """``[[text, kind], ...]`` of token runs as the app's data doctor shows them, kind ``prompt`` (no loss),
    ``loss`` (tokens that carry the loss) or ``cut`` (removed by truncation); empty runs are left out. Each run is
    decoded on its own, at the token boundaries the data path cut it at."""
    return [[tokenizer.decode(ids), kind] for ids, kind in parts if ids]


@dataclass
class PreferenceData:
    train: list[Pair]
    eval: list[Pair]
    report: DataReport
    eval_report: DataReport | None
    examples: list[dict]  # first rendered pairs, for the app's preview


def prepare(rows: list[dict], tokenizer, *, source: str, columns: dict, max_length: int, max_prompt_length: int,
            on_bad_rows: str = "skip", n_examples: int = 3) -> tuple[list[Pair], DataReport, list[dict]]:
    """Validate, render and tokenize rows. Returns usable pairs, the report, and a few rendered examples."""
    rows = apply_column_mapping(rows, columns, source)
    fmt = detect_format(rows, source)
    report = DataReport(source=source, format=fmt, total_rows=len(rows), max_length=max_length)
    rendered, row_ids, margins = [], [], []
    for i, row in enumerate(rows, 1):
        try:
            pair = normalize_row(row, fmt)
            rendered.append(render(pair, tokenizer))
        except RowError as e:
            if on_bad_rows == "error":
                raise DataError(f"{source}: row {i}, {e}. Fix the row, or set data.on_bad_rows=skip to skip "
                                "rows like it") from None
            report.drop(str(e), i)
            continue
        row_ids.append(i)
        margins.append(pair["margin"])
    pairs, examples = [], []
    for (p, c, r), i, m, texts in zip(tokenize_rendered(tokenizer, rendered) if rendered else [], row_ids, margins,
                                      rendered):
        report.lengths.append(len(p) + max(len(c), len(r)))
        if not c or not r:
            reason = "answer is empty after tokenization"
        elif c == r:
            reason = "chosen and rejected tokenize identically"
        else:
            reason = None
        if reason is None:
            p2, c2, r2, cut_p, cut_a = truncate(p, c, r, max_length, max_prompt_length)
            if c2 == r2:
                reason = (f"chosen and rejected are identical within max_length ({max_length}); raise max_length "
                          "or max_prompt_length")
        if reason:
            if on_bad_rows == "error":
                raise DataError(f"{source}: row {i}: {reason}. Set data.on_bad_rows=skip to skip rows like it")
            report.drop(reason, i)
            continue
        report.truncated_prompts += cut_p
        report.truncated_answers += cut_a
        pairs.append(Pair(p2, c2, r2, margin=m, row=i))
        if len(examples) < n_examples:
            head = p[:len(p) - len(p2)]  # what the left cut took from the prompt
            sides = [{"name": name, "tokens": len(p2) + len(kept), "loss_tokens": len(kept),
                      "pieces": display_pieces(tokenizer, [(head, "cut"), (p2, "prompt"), (kept, "loss"),
                                                           (full[len(kept):], "cut")])}
                     for name, full, kept in (("chosen", c, c2), ("rejected", r, r2))]
            note = f"prompt {len(p2)} tokens" + (" · chat template applied" if texts[3] else "")
            examples.append({"row": i, "prompt": texts[0], "chosen": texts[1], "rejected": texts[2],
                             "prompt_tokens": len(p2), "chosen_tokens": len(c2), "rejected_tokens": len(r2),
                             "truncated": bool(cut_p or cut_a), "templated": texts[3], "note": note, "sides": sides})
    report.usable = len(pairs)
    return pairs, report, examples


def prepare_pairs(rows: list[dict], tokenizer, *, source: str, cfg, n_examples: int = 3):
    """:func:`prepare` with the config's data settings: what the pair tasks (dpo, reward) read rows with."""
    return prepare(rows, tokenizer, source=source, columns=cfg.data.columns, max_length=cfg.max_length,
                   max_prompt_length=cfg.max_prompt_length, on_bad_rows=cfg.data.on_bad_rows, n_examples=n_examples)


def load_preference_data(cfg, tokenizer) -> PreferenceData:
    """The whole data path for a pair run: train pairs, eval pairs (given or held out), reports."""
    return load_task_data(cfg, tokenizer, functools.partial(prepare_pairs, cfg=cfg), unit="pairs")


def has_named_splits(source: str) -> bool:
    """Whether ``dataset_split``/``eval_split`` choose anything in ``source``: a hub dataset or a saved DatasetDict
    folder has named splits; a local file or a folder of files is one split, whatever the names say."""
    path = Path(resolve_dataset(source)).expanduser()
    if path.is_file():
        return False
    if path.is_dir():
        return (path / "dataset_dict.json").is_file()
    return True


def load_task_data(cfg, tokenizer, prepare_rows, unit: str) -> PreferenceData:
    """Any task's data path: rows -> ``prepare_rows(rows, tokenizer, source=...)`` -> (items, report, examples),
    for the training data and a given eval dataset; else part of the training rows is held out for eval. Items that
    came from the same source row (KTO's desirable and undesirable halves of a pair) stay on the same side."""
    ensure_chat_template(tokenizer, cfg.data.chat_template)
    source = cfg.dataset
    rows = load_rows(source, cfg.dataset_split, cfg.trust_remote_code)
    train, report, examples = prepare_rows(rows, tokenizer, source=source)
    if not train:
        raise DataError(f"{source}: no usable {unit}.\n{report.summary()}")
    eval_items, eval_report = [], None
    if cfg.eval_split and not cfg.eval_dataset and not has_named_splits(source):
        # a local file (or folder of files) is one split: "its" eval split would be the training rows again
        logging.getLogger("lowrank_pref").warning(
            "eval_split=%s does not apply to %s, which has no named splits: holding out data.eval_fraction of it "
            "for eval instead (set eval_dataset to a separate eval file, or eval_split=null to silence this)",
            cfg.eval_split, source)
    elif cfg.eval_dataset or cfg.eval_split:
        eval_source = cfg.eval_dataset or source
        eval_rows = load_rows(eval_source, cfg.eval_split or "train", cfg.trust_remote_code)
        eval_items, eval_report, _ = prepare_rows(eval_rows, tokenizer, source=eval_source)
    groups: dict[int, list[int]] = {}
    for i, item in enumerate(train):
        groups.setdefault(item.row, []).append(i)
    keys = list(groups)
    rng = random.Random(cfg.seed)
    order = list(range(len(keys)))
    rng.shuffle(order)
    if not eval_items and cfg.data.eval_fraction > 0 and len(keys) >= 4:
        n_eval = min(cfg.data.eval_max_pairs, max(1, round(len(keys) * cfg.data.eval_fraction)))
        eval_items = [train[i] for k in sorted(order[:n_eval]) for i in groups[keys[k]]]
        order = order[n_eval:]
    train = [train[i] for k in sorted(order) for i in groups[keys[k]]]
    if cfg.data.max_pairs:
        train = train[: cfg.data.max_pairs]
    return PreferenceData(train, eval_items, report, eval_report, examples)


# ----------------------------------------------------------------------------------------------------------------
# Batches

def row_lengths(pairs: list[Pair], shared: bool) -> list[int]:
    """Lengths of the rows these pairs become before padding: one ``[prompt | chosen | rejected]`` row per pair
    (:func:`collate_shared`), or ``prompt+chosen`` and ``prompt+rejected`` (:func:`collate`). A micro-batch is
    ``len(rows) * max(rows)`` positions padded."""
    if shared:
        return [p.num_tokens for p in pairs]
    return [len(p.prompt_ids) + len(a) for p in pairs for a in (p.chosen_ids, p.rejected_ids)]


def collate(pairs: list[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """Two rows per pair, ``[prompt+chosen ...; prompt+rejected ...]``, right-padded.

    ``completion_mask[i, t]`` is 1 where token t of row i is an answer token (the ones that carry loss).
    """
    rows = [(p.prompt_ids + getattr(p, side), [0] * len(p.prompt_ids) + [1] * len(getattr(p, side)))
            for side in ("chosen_ids", "rejected_ids") for p in pairs]
    return {**collate_rows(rows, pad_id), "margin": torch.tensor([p.margin for p in pairs], dtype=torch.float32)}


def collate_rows(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """(token ids, loss mask) rows -> right-padded ``input_ids``, ``attention_mask``, ``completion_mask`` (N, T), as
    ``logps.sequence_logps`` reads them."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, mask) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        completion_mask[i, : len(ids)] = torch.tensor(mask)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def collate_shared(pairs: list[Pair], pad_id: int) -> dict:
    """One row per pair, ``[prompt | chosen | rejected]``: the prompt goes through the model once, not twice.

    ``allowed`` (B, T, T) says which key each query may attend to: causal, except that rejected tokens do not see
    the chosen ones; ``position_ids`` restart after the prompt for the rejected answer, so each answer sees exactly
    what it would see in its own sequence. ``chosen_index``/``rejected_index`` are flat (row * T + position)
    indices of the hidden states that predict ``chosen_targets``/``rejected_targets``: answer token j is predicted
    at the position before it, and the first token of both answers at the last prompt position. ``*_rows`` give
    each target's pair; ``*_last`` the position the reward model scores. Padding positions attend to themselves only
    (an all-masked row would be NaN). ``layout`` lists each row's (prompt, chosen, rejected) lengths, from which
    ``model.shared_prompt_sdpa`` computes the same attention without the dense mask.
    """
    width = max(p.num_tokens for p in pairs)
    n = len(pairs)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    allowed = torch.eye(width, dtype=torch.bool).repeat(n, 1, 1)
    index, targets, rows, last = ({"chosen": [], "rejected": []} for _ in range(4))
    for b, p in enumerate(pairs):
        P, C, R = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
        T = P + C + R
        input_ids[b, :T] = torch.tensor(p.prompt_ids + p.chosen_ids + p.rejected_ids)
        position_ids[b, :P + C] = torch.arange(P + C)
        position_ids[b, P + C:T] = torch.arange(P, P + R)
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        mask[P + C:, P:P + C] = False
        allowed[b, :T, :T] = mask
        start = 0 if P else 1  # with no prompt the first answer token has nothing before it (as in collate)
        for side, answer, offset in (("chosen", p.chosen_ids, P), ("rejected", p.rejected_ids, P + C)):
            # the reward model reads the last token that isn't padding, as transformers' pooling does on
            # [prompt + answer] (where eos is the pad token, a trailing eos counts as padding)
            end = max((i for i, t in enumerate(p.prompt_ids + answer) if t != pad_id), default=0)
            last[side].append(b * width + (end if end < P else offset + end - P))
            for j in range(start, len(answer)):
                index[side].append(b * width + (P - 1 if j == 0 else offset + j - 1))
                targets[side].append(answer[j])
                rows[side].append(b)
    out = {"input_ids": input_ids, "position_ids": position_ids, "allowed": allowed,
           "layout": [(len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)) for p in pairs],
           "margin": torch.tensor([p.margin for p in pairs], dtype=torch.float32)}
    for side in ("chosen", "rejected"):
        out[f"{side}_last"] = torch.tensor(last[side], dtype=torch.long)
        out[f"{side}_index"] = torch.tensor(index[side], dtype=torch.long)
        out[f"{side}_targets"] = torch.tensor(targets[side], dtype=torch.long)
        out[f"{side}_rows"] = torch.tensor(rows[side], dtype=torch.long)
    return out
