"""Reading data files into rows: one dict per record, with the line (or record) it came from.

Formats: JSONL, JSON (a list of records, or {"key": [records]}), CSV/TSV with any delimiter,
with or without a header (sniffed), Parquet, ``LABEL TEXT`` lines, plain text (one document
per line), a folder of text files (a sub-folder name is the label), and Hugging Face
``datasets`` (a folder written by ``save_to_disk``, or ``hf:<id>`` when online).
Text files are read as UTF-8, else in the encoding ``charset-normalizer`` detects; the
encoding used is reported, so a fallback is never silent.
Every bad record raises DataError naming the file, the line and the field; with
``skip_bad=True`` it is skipped and counted instead.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMATS = ("auto", "jsonl", "json", "csv", "tsv", "parquet", "label_text", "text", "folder", "hf")
_LABEL_TEXT = re.compile(r"^\S{1,40} \S")  # "LABEL TEXT": a short token, one space, then text
csv.field_size_limit(1 << 30)  # real CSVs hold long documents in one field


class DataError(ValueError):
    """Bad input data; the message names file, line and field."""


@dataclass
class Row:
    """One record as read from a file, with the line it starts on (1-based)."""

    line: int
    values: dict[str, Any]


@dataclass
class Example:
    """A conversation to train on (its assistant turns are the targets), or raw ``text``."""

    messages: list[dict[str, str]]
    label: str | None = None  # raw label (classification only)
    source: str = ""  # "file:line", for error messages and reports
    meta: dict[str, Any] = field(default_factory=dict)
    text: str | None = None  # raw-text language modelling: every token is a target


@dataclass
class Table:
    """What a reader found: the rows, the format and encoding used, and skipped records."""

    path: str
    rows: list[Row]
    format: str
    encoding: str = "utf-8"
    skipped: list[str] = field(default_factory=list)  # "file:line: reason"

    @property
    def columns(self) -> list[str]:
        seen: dict[str, None] = {}
        for row in self.rows[:200]:
            seen.update(dict.fromkeys(row.values))
        return list(seen)


def detect_format(path: Path) -> str:
    """The format of ``path`` from its extension, or from its first lines when it has none."""
    if path.is_dir():
        return "hf" if (path / "dataset_info.json").is_file() or (path / "state.json").is_file() else "folder"
    suffix = path.suffix.lower()
    known = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".txt": None}
    if known.get(suffix):
        return known[suffix]  # type: ignore[return-value]
    head = path.read_bytes()[:65536].decode("utf-8", errors="replace")
    lines = [ln for ln in head.splitlines()[:50] if ln.strip()]
    if lines and lines[0].lstrip().startswith("{"):
        return "jsonl"
    if lines and sum("\t" in ln for ln in lines) >= 0.9 * len(lines):
        return "tsv"
    short = lines and max(len(ln) for ln in lines) < 2000  # labelled sentences, not whole documents
    if short and sum(bool(_LABEL_TEXT.match(ln)) for ln in lines) == len(lines):
        labels = {ln.split(" ", 1)[0] for ln in lines}
        if len(labels) <= min(20, max(2, len(lines) // 3)):  # few distinct first tokens: they are labels
            return "label_text"
    return "text"


def read_table(path: str | Path, fmt: str = "auto", skip_bad: bool = False) -> Table:
    """Read every record of a data file or folder (see the module docstring for formats)."""
    if isinstance(path, str) and path.startswith("hf:"):
        return _hf(path[3:], path)
    p = Path(path)
    if not p.exists():
        raise DataError(f"{path}: file not found")
    fmt = detect_format(p) if fmt == "auto" else fmt
    if fmt == "folder":
        return _folder(p)
    if fmt == "hf":
        return _hf(str(p), str(p))
    if fmt == "parquet":
        return _parquet(p)
    text, encoding = read_text(p)
    if not text.strip():
        raise DataError(f"{p}: the file is empty")
    table = Table(str(p), [], fmt, encoding)
    reader = {"jsonl": _jsonl, "json": _json, "csv": _csv, "tsv": _csv, "label_text": _label_text, "text": _text}[fmt]
    try:
        reader(p, text, table, skip_bad)
    except csv.Error as e:  # e.g. a NUL byte inside a CSV field
        raise DataError(f"{p}: not readable as {fmt.upper()} ({e})") from None
    except RecursionError:  # JSON nested deeper than Python's parser allows
        raise DataError(f"{p}: JSON nested too deeply to read") from None
    if not table.rows:
        raise DataError(f"{p}: no records found ({len(table.skipped)} skipped)")
    return table


def read_rows(path: str | Path, fmt: str = "auto") -> list[Row]:
    """The rows of a data file (DataError on the first bad record)."""
    return read_table(path, fmt).rows


def read_text(path: Path) -> tuple[str, str]:
    """The file's text and the encoding used: UTF-8, else the detected one."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig"), "utf-8"
    except UnicodeDecodeError as e:
        first_bad = raw[: e.start].count(b"\n") + 1
    if b"\x00" in raw[:8192]:
        raise DataError(f"{path}: binary data (NUL bytes), not a text file")
    from charset_normalizer import from_bytes

    best = from_bytes(raw).best()
    if best is None or best.encoding in ("utf_8", "ascii"):
        raise DataError(f"{path}:{first_bad}: not valid UTF-8 and no other encoding fits; convert the file to UTF-8")
    return str(best), best.encoding


def _bad(table: Table, skip: bool, message: str) -> None:
    if not skip:
        raise DataError(message)
    table.skipped.append(message)


def _jsonl(path: Path, text: str, table: Table, skip: bool) -> None:
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            _bad(table, skip, f"{path}:{i}: invalid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(value, dict):
            _bad(table, skip, f"{path}:{i}: expected a JSON object, got {type(value).__name__}")
            continue
        table.rows.append(Row(i, value))


def _json(path: Path, text: str, table: Table, skip: bool) -> None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value.values())), list):
        value = next(iter(value.values()))  # {"data": [...]}
    if isinstance(value, dict) and value and all(isinstance(v, list) for v in value.values()):
        keys = list(value)  # column-oriented {"text": [...], "label": [...]}
        value = [dict(zip(keys, vals)) for vals in zip(*value.values())]
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(value).__name__}")
    for i, item in enumerate(value, start=1):
        if isinstance(item, dict):
            table.rows.append(Row(i, item))  # JSON lists have no useful line: the record number
        else:
            _bad(table, skip, f"{path}: record {i}: expected an object, got {type(item).__name__}")


def _csv(path: Path, text: str, table: Table, skip: bool) -> None:
    sample = text[:65536]
    first = sample.split("\n", 1)[0]
    delimiter = max("\t,;|", key=first.count) if any(d in first for d in "\t,;|") else ("\t" if table.format == "tsv" else ",")

    class dialect(csv.excel):  # noqa: N801 - a csv dialect is a class
        pass

    dialect.delimiter = delimiter
    if delimiter == "\t":  # TSV convention: no quoting; a quote is just a character
        dialect.quoting = csv.QUOTE_NONE
    lines = list(csv.reader(io.StringIO(text, newline=""), dialect))
    if not lines:
        raise DataError(f"{path}: no records found")
    header = _has_header(sample, lines)
    names = [c.strip() or f"column_{j}" for j, c in enumerate(lines[0])] if header else [f"column_{j}" for j in range(len(lines[0]))]
    reader = csv.reader(io.StringIO(text, newline=""), dialect)
    if header:
        next(reader)
    for values in reader:
        line = reader.line_num
        if not values or not any(v.strip() for v in values):
            continue
        if len(values) != len(names):
            _bad(table, skip, f"{path}:{line}: {len(values)} fields, the header has {len(names)}")
            continue
        table.rows.append(Row(line, dict(zip(names, values))))


def _has_header(sample: str, lines: list[list[str]]) -> bool:
    first = [c.strip().lower() for c in lines[0]]
    if any(len(c.split()) > 3 for c in first):  # a sentence is data, not a column name
        return False
    if any(c in _KNOWN_COLUMNS for c in first):
        return True
    try:
        return csv.Sniffer().has_header(sample)
    except csv.Error:
        return False


# column names that, seen in a first line, mean the line is a header
_KNOWN_COLUMNS = {"text", "label", "sms", "instruction", "input", "output", "response", "prompt", "completion",
                  "question", "answer", "messages", "sentence", "review", "category", "intent", "target", "class"}


def _label_text(path: Path, text: str, table: Table, skip: bool) -> None:
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        label, _, rest = line.strip().partition(" ")
        if not rest.strip():
            _bad(table, skip, f"{path}:{i}: expected 'LABEL TEXT', found no text after the label")
            continue
        table.rows.append(Row(i, {"label": label, "text": rest.strip()}))


def _text(path: Path, text: str, table: Table, skip: bool) -> None:
    for i, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            table.rows.append(Row(i, {"text": line.strip()}))


def _parquet(path: Path) -> Table:
    import pyarrow.parquet as pq

    try:
        records = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a bad file
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    return Table(str(path), [Row(i, r) for i, r in enumerate(records, start=1)], "parquet", "binary")


def _folder(path: Path) -> Table:
    """One row per text file; files in sub-folders take the sub-folder's name as their label."""
    rows = []
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    for i, f in enumerate(files, start=1):
        text, _ = read_text(f)
        values: dict[str, Any] = {"text": text.strip(), "file": str(f.relative_to(path))}
        if f.parent != path:
            values["label"] = f.parent.name
        if values["text"]:
            rows.append(Row(i, values))
    if not rows:
        raise DataError(f"{path}: folder holds no non-empty text files")
    return Table(str(path), rows, "folder")


def _hf(name: str, shown: str) -> Table:
    """A Hugging Face dataset saved with ``save_to_disk``, or a hub id (needs the network)."""
    import datasets

    try:
        ds: Any = datasets.load_from_disk(name) if Path(name).is_dir() else datasets.load_dataset(name)
    except Exception as e:  # datasets raises many types: name the source and the cause
        raise DataError(f"{shown}: could not load the Hugging Face dataset ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    return Table(shown, [Row(i, dict(r)) for i, r in enumerate(ds, start=1)], "hf", "arrow")
