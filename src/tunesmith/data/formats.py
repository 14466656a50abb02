"""Reading data files into rows: one dict per record, with the line (or record) it came from.

Formats: JSONL, JSON (a list of records, or {"key": [records]}), CSV/TSV, Parquet, ``LABEL TEXT``
lines, plain text (one document per line), a folder of text files (a sub-folder name is the
label), and Hugging Face ``datasets`` (a folder written by ``save_to_disk``, or ``hf:<id>`` when
online).

CSV/TSV: the delimiter (``,`` tab ``;`` ``|``) is sniffed from the first 100 records, parsed
quote-aware, as the one that splits them most consistently; ``data.delimiter`` sets it ("\\t"
or "tab" for a tab), and then a file detected as text or ``LABEL TEXT`` is read as CSV.
Tab-delimited files are read without quoting, the TSV convention: real TSVs hold unbalanced
quotes in their text. A first record of column-name-like cells is a header; without one the
columns are ``column_0``, ``column_1``, ...

``LABEL TEXT``: a short label, spaces, the text; a label alone gives a row with empty text
(preparation drops and counts those).

Encodings: UTF-8, else detected (``tunesmith.data.encoding``); ``data.encoding`` sets one.

Every bad record raises DataError naming the file, the line and the field; with
``skip_bad=True`` it is skipped and counted instead.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import chain, islice
from pathlib import Path
from typing import Any

from tunesmith.data.encoding import decode, read_text  # noqa: F401 - read_text stays importable from here
from tunesmith.data.errors import DataError

FORMATS = ("auto", "jsonl", "json", "csv", "tsv", "parquet", "label_text", "text", "folder", "hf")
_LABELLED = re.compile(r"^\S{1,40} +\S")  # "LABEL TEXT": a short token, spaces, then text
_LABEL_ONLY = re.compile(r"^\S{1,40} *$")  # a label whose text is missing
DELIMITERS = (",", "\t", ";", "|")
_SNIFF_RECORDS = 100  # records the delimiter sniffer parses
_SNIFF_CHARS = 65536  # characters of the file it looks at
_HEADER_RECORDS = 20  # records below the first that header detection compares it with
csv.field_size_limit(1 << 30)  # real CSVs hold long documents in one field


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
    references: list[str] = field(default_factory=list)  # further gold answers (data.references), for generation metrics


@dataclass
class Table:
    """What a reader found: the rows, how the file was read, and skipped records."""

    path: str
    rows: list[Row]
    format: str
    encoding: str = "utf-8"
    skipped: list[str] = field(default_factory=list)  # "file:line: reason"
    encoding_confidence: float | None = None  # in [0, 1] when detected; None: valid UTF-8 or set
    encoding_set: bool = False  # the encoding came from data.encoding
    delimiter: str | None = None  # CSV/TSV only
    header: bool | None = None  # CSV/TSV only: the first record named the columns
    quoted: bool | None = None  # TSV only: fields are quoted CSV-style (as pandas writes them)
    split: str | None = None  # a Hugging Face DatasetDict: the split read
    numbering: str = "line"  # what Row.line counts: "line" (of the file) or "record" (column-form JSON, Parquet, HF, folder)
    files: dict[int, str] = field(default_factory=dict)  # a folder's records: record number -> its file, relative to path
    extracted: str | None = None  # how data.extract split fields out of a column, for describe()
    expected: dict[str, str] = field(default_factory=dict)  # extracted field -> where it was looked for (for "missing field")

    def where(self, line: int) -> str:
        """How messages name a row: "file:12" for a line, "file: record 12" for a record number,
        "folder/name.txt" for a file of a folder."""
        if line in self.files:
            return str(Path(self.path) / self.files[line])
        return f"{self.path}:{line}" if self.numbering == "line" else f"{self.path}: record {line}"

    @property
    def columns(self) -> list[str]:
        seen: dict[str, None] = {}
        for row in self.rows[:200]:
            seen.update(dict.fromkeys(row.values))
        return list(seen)

    def describe(self) -> str:
        """How the file was read, for the console and the report, e.g.
        ``csv, delimiter ',', no header: columns column_0..column_2; encoding cp1252 (detected, ...)``."""
        parts = [self.format]
        if self.delimiter is not None:
            parts.append(f"delimiter {self.delimiter!r}" + (", quoted fields" if self.quoted else ""))
        if self.split is not None:
            parts.append(f"split {self.split!r}")
        if self.header is not None:
            parts.append(f"{'header' if self.header else 'no header'}: columns {_column_list(self.columns)}")
        extracted = f"; {self.extracted}" if self.extracted else ""
        if self.format in ("parquet", "hf"):  # binary: no text encoding
            return ", ".join(parts) + extracted
        return ", ".join(parts) + ("; " if self.header is not None else ", ") + self._describe_encoding() + extracted

    def _describe_encoding(self) -> str:
        """The encoding, and where it came from when it was not plain UTF-8."""
        if self.encoding_set:
            return f"encoding {self.encoding} (set by data.encoding)"
        if self.encoding_confidence is None:
            return self.encoding
        return (f"encoding {self.encoding} (detected, confidence {self.encoding_confidence:.2f}; "
                "set data.encoding to override)")


def _column_list(names: list[str]) -> str:
    """``column_0..column_2`` for generated names, else the names (the first 8)."""
    if len(names) > 1 and names == [f"column_{j}" for j in range(len(names))]:
        return f"column_0..column_{len(names) - 1}"
    shown = ", ".join(names[:8])
    return shown + (f", ... ({len(names)} in all)" if len(names) > 8 else "")


def detect_format(path: Path) -> str:
    """The format of ``path`` from its extension, or from its first lines when it has none."""
    if path.is_dir():
        saved = ("dataset_info.json", "state.json", "dataset_dict.json")  # Dataset / DatasetDict.save_to_disk
        return "hf" if any((path / name).is_file() for name in saved) else "folder"
    suffix = path.suffix.lower()
    known = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".txt": None}
    if known.get(suffix):
        return known[suffix]  # type: ignore[return-value]
    with path.open("rb") as f:
        head = f.read(65536).decode("utf-8", errors="replace")
    lines = [ln for ln in head.splitlines()[:50] if ln.strip()]
    if lines and lines[0].lstrip().startswith("{"):
        return "jsonl"
    if lines and sum("\t" in ln for ln in lines) >= 0.9 * len(lines):
        return "tsv"
    return "label_text" if _looks_labelled(lines) else "text"


def _looks_labelled(lines: list[str]) -> bool:
    """Whether short lines read as ``LABEL TEXT``: a few distinct first tokens, then text.

    A label alone on a line is allowed now and then (its text is missing), if it is a label
    seen with text elsewhere."""
    if not lines or max(len(ln) for ln in lines) >= 2000:  # labelled sentences, not whole documents
        return False
    full = [ln for ln in lines if _LABELLED.match(ln)]
    bare = [ln.strip() for ln in lines if not _LABELLED.match(ln)]
    labels = {ln.split(None, 1)[0] for ln in full}
    if not full or len(bare) > max(1, len(lines) // 10) or not all(_LABEL_ONLY.match(b) and b in labels for b in bare):
        return False
    return len(labels) <= min(20, max(2, len(lines) // 3))  # few distinct first tokens: they are labels


def read_table(path: str | Path, fmt: str = "auto", skip_bad: bool = False,
               delimiter: str | None = None, encoding: str | None = None, split: str | None = None) -> Table:
    """Read every record of a data file or folder (see the module docstring for formats).

    ``delimiter`` forces the CSV delimiter ("\\t" or "tab" mean a tab), ``encoding`` the text
    encoding (a Python codec name); both are the ``data.delimiter``/``data.encoding`` settings.
    ``split``: for a Hugging Face DatasetDict, the split to read (the role the file plays)."""
    if isinstance(path, str) and path.startswith("hf:"):
        return _hf(path[3:], path, split)
    p = Path(path)
    if not p.exists():
        raise DataError(f"{path}: file not found")
    if fmt not in FORMATS:
        raise DataError(f"{p}: unknown format {fmt!r} (data.format is one of {', '.join(FORMATS)})")
    forced = _parse_delimiter(delimiter, p) if delimiter is not None else None
    if fmt == "auto":
        fmt = detect_format(p)
        if forced is not None and fmt in ("text", "label_text", "tsv"):  # a delimiter was set: the file is delimited
            fmt = "tsv" if forced == "\t" else "csv"
    if fmt == "folder":
        return _folder(p, encoding)
    if fmt == "hf":
        return _hf(str(p), str(p), split)
    if fmt == "parquet":
        return _parquet(p)
    decoded = decode(p, encoding)
    if not decoded.text.strip():
        raise DataError(f"{p}: the file is empty")
    table = Table(str(p), [], fmt, decoded.encoding, encoding_confidence=decoded.confidence,
                  encoding_set=encoding is not None)
    try:
        if fmt in ("csv", "tsv"):
            _csv(p, decoded.text, table, skip_bad, forced)
        else:
            reader = {"jsonl": _jsonl, "json": _json, "label_text": _label_text, "text": _text}[fmt]
            reader(p, decoded.text, table, skip_bad)
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


def _parse_delimiter(value: str, path: Path) -> str:
    """The one-character delimiter that ``data.delimiter`` names ("\\t" and "tab" are a tab)."""
    named = {"\\t": "\t", "tab": "\t"}
    delimiter = named.get(value.strip().lower(), value)
    if len(delimiter) != 1 or delimiter in "\"\r\n":
        raise DataError(f"{path}: data.delimiter must be one character such as ',' or ';' (or 'tab'), got {value!r}")
    return delimiter


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
    """A JSON list of records (or {"key": [records]}): each row carries the line its record starts
    on; the column form {"text": [...], "label": [...]}: rows carry their record number."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    lines = _array_lines(text)
    if isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value.values())), list):
        value = next(iter(value.values()))  # {"data": [...]}
    if isinstance(value, dict) and value and all(isinstance(v, list) for v in value.values()):
        keys = list(value)  # column-oriented {"text": [...], "label": [...]}
        value = [dict(zip(keys, vals)) for vals in zip(*value.values())]
        lines = None
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON list of records, {{\"key\": [records]}} or columns "
                        f"{{\"text\": [...], \"label\": [...]}}, got {type(value).__name__}")
    if lines is None or len(lines) != len(value):
        table.numbering = "record"
        lines = list(range(1, len(value) + 1))
    for line, item in zip(lines, value):
        if isinstance(item, dict):
            table.rows.append(Row(line, item))
        else:
            _bad(table, skip, f"{table.where(line)}: expected an object, got {type(item).__name__}")


def _array_lines(text: str) -> list[int] | None:
    """The line each element of the top-level JSON array (or of a one-key object's array) starts
    on; None when the text has no such array."""
    decoder = json.JSONDecoder()
    ws = re.compile(r"\s*")
    i = ws.match(text, 0).end()
    try:
        if text[i] == "{":  # {"data": [...]}: step over the key to its array
            i = ws.match(text, decoder.raw_decode(text, ws.match(text, i + 1).end())[1]).end()
            i = ws.match(text, i + 1).end() if text[i] == ":" else -1
        if i < 0 or text[i] != "[":
            return None
        out, line, at = [], 1, 0
        i = ws.match(text, i + 1).end()
        while text[i] != "]":
            line += text.count("\n", at, i)
            at = i
            out.append(line)
            i = ws.match(text, decoder.raw_decode(text, i)[1]).end()
            if text[i] == ",":
                i = ws.match(text, i + 1).end()
        return out
    except (IndexError, json.JSONDecodeError):
        return None


# ----------------------------------------------------------------------------------------------
# CSV / TSV


def _dialect(delimiter: str, quoted: bool | None = None) -> type[csv.Dialect]:
    """Excel's CSV dialect with ``delimiter``. A tab means TSV, read without quoting unless
    ``quoted`` (as pandas and Excel write TSV: fields holding a tab, a newline or a quote quoted)."""

    class dialect(csv.excel):  # noqa: N801 - a csv dialect is a class
        pass

    dialect.delimiter = delimiter
    if delimiter == "\t" and not quoted:  # TSV convention: a quote is just a character (real TSVs have unbalanced ones)
        dialect.quoting = csv.QUOTE_NONE
    return dialect


def _tsv_is_quoted(sample: str) -> bool:
    """Whether a tab-separated sample uses CSV quoting: some field opens with a quote, and reading
    quotes as quoting splits the records more consistently than reading them as text (SMS Spam's
    unbalanced quotes in text read worse quoted, a pandas-written TSV better)."""
    if not re.search(r'(^|\t)"', sample, re.MULTILINE):
        return False
    return _delimiter_score(sample, "\t", quoted=True) > _delimiter_score(sample, "\t", quoted=False)


def sniff_delimiter(sample: str, default: str) -> str:
    """The delimiter among ``, \\t ; |`` that splits the sample's first records most consistently.

    Each candidate parses the first 100 records quote-aware (as the file will be read, so
    quoted delimiters, ``""`` escapes and line breaks inside quotes count right) and scores
    the share of records with the modal field count, which must be above 1; ties go to
    more fields, then to ``default``. ``default`` when no candidate splits the records."""
    scores = {d: _delimiter_score(sample, d) for d in DELIMITERS}
    best = max(DELIMITERS, key=lambda d: (*scores[d], d == default))
    return best if scores[best][1] > 1 else default


def _delimiter_score(sample: str, delimiter: str, quoted: bool | None = None) -> tuple[float, int]:
    """(share of records with the modal field count, that count); (0, 0) when it is 1 or less."""
    counts = _field_counts(sample, delimiter, quoted)
    fields = [c for c in counts if c is not None]
    if not fields:
        return 0.0, 0
    tally = Counter(fields)
    modal = max(tally, key=lambda n: (tally[n], n))
    if modal <= 1:
        return 0.0, 0
    return tally[modal] / len(counts), modal


def _field_counts(sample: str, delimiter: str, quoted: bool | None = None) -> list[int | None]:
    """Fields in each of the sample's first records; None for a record that breaks the quoting
    rules under this delimiter (e.g. ``"a","b"`` split on ';'), which is a sign it is wrong."""
    reader = csv.reader(io.StringIO(sample, newline=""), _dialect(delimiter, quoted), strict=True)
    counts: list[int | None] = []
    ended = False
    while len(counts) <= _SNIFF_RECORDS:
        try:
            record = next(reader)
        except StopIteration:
            ended = True
            break
        except csv.Error:
            counts.append(None)
            continue
        if any(v.strip() for v in record):  # blank lines say nothing
            counts.append(len(record))
    if len(counts) > _SNIFF_RECORDS or (ended and len(counts) > 1 and not sample.endswith(("\n", "\r"))):
        counts.pop()  # the sample may cut the last record short
    return counts


def _choose_delimiter(sample: str, fmt: str) -> str:
    """The delimiter to read with: a tab for a TSV that tabs split, else the sniffed one."""
    if fmt == "tsv" and _delimiter_score(sample, "\t")[1] > 1:
        return "\t"
    return sniff_delimiter(sample, "\t" if fmt == "tsv" else ",")


def _records(reader: Any) -> Iterator[tuple[int, list[str]]]:
    """(line the record starts on, values) for each non-blank record."""
    while True:
        start = reader.line_num + 1
        try:
            values = next(reader)
        except StopIteration:
            return
        if values:  # a record of empty fields (";;;") is an empty row, counted downstream; a blank line is nothing
            yield start, values


def _csv(path: Path, text: str, table: Table, skip: bool, delimiter: str | None = None) -> None:
    """CSV/TSV records as rows named by the header, or ``column_0``... when there is none."""
    table.delimiter = delimiter or _choose_delimiter(text[:_SNIFF_CHARS], table.format)
    if table.delimiter == "\t":
        table.quoted = _tsv_is_quoted(text[:_SNIFF_CHARS])
    records = _records(csv.reader(io.StringIO(text, newline=""), _dialect(table.delimiter, table.quoted)))
    head = list(islice(records, _HEADER_RECORDS + 1))
    if not head:
        raise DataError(f"{path}: no records found")
    table.header = _has_header([values for _, values in head])
    first = head[0][1]
    names = [c.strip() or f"column_{j}" for j, c in enumerate(first)] if table.header else [f"column_{j}" for j in range(len(first))]
    for line, values in chain(head[1:] if table.header else head, records):
        if len(values) != len(names):
            what = "the header has" if table.header else "the first record has"
            _bad(table, skip, f"{path}:{line}: {len(values)} fields, {what} {len(names)}")
            continue
        table.rows.append(Row(line, dict(zip(names, values))))


def _has_header(records: list[list[str]]) -> bool:
    """Whether the first record names the columns.

    Column names are short, not numbers, and unique; a known name settles it. Otherwise, as
    ``csv.Sniffer.has_header`` does but on the records as parsed (its own re-sniffing can pick
    another delimiter), each column votes: a numeric column, or one of fixed-width values,
    under a first cell that does not fit it says header; one that fits says data."""
    first = [c.strip() for c in records[0]]
    named = [c.lower() for c in first if c]
    if any(_is_number(c) or len(c.split()) > 3 for c in first) or len(set(named)) < len(named):
        return False  # a number, a sentence or a repeated value is data, not a column name
    if any(c in _KNOWN_COLUMNS for c in named):
        return True
    body = [r for r in records[1:] if len(r) == len(first)]
    votes = 0
    for j, name in enumerate(first):
        column = [r[j].strip() for r in body if r[j].strip()]
        if not column:
            continue
        if all(_is_number(v) for v in column):
            votes += 1  # numbers under a name
        elif len({len(v) for v in column}) == 1:
            votes += 1 if len(name) != len(column[0]) else -1
    return votes > 0


def _is_number(value: str) -> bool:
    """Whether ``value`` reads as a number (an int or a float)."""
    try:
        float(value)
    except ValueError:
        return False
    return True


# column names that, seen in a first line, mean the line is a header
_KNOWN_COLUMNS = {"text", "label", "sms", "instruction", "input", "output", "response", "prompt", "completion",
                  "question", "answer", "messages", "sentence", "review", "category", "intent", "target", "class",
                  "title", "description", "content", "body", "summary", "context", "document", "headline",
                  "premise", "hypothesis", "sentence1", "sentence2", "sentiment", "topic", "labels", "id"}


# ----------------------------------------------------------------------------------------------
# Line formats, Parquet, folders, Hugging Face


def _label_text(path: Path, text: str, table: Table, skip: bool) -> None:
    """``LABEL TEXT`` lines, split on the first run of whitespace; a label alone has text ""."""
    for i, line in enumerate(text.splitlines(), start=1):
        parts = line.split(None, 1)
        if parts:
            table.rows.append(Row(i, {"label": parts[0], "text": parts[1].strip() if len(parts) > 1 else ""}))


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
    return Table(str(path), [Row(i, r) for i, r in enumerate(records, start=1)], "parquet", "binary", numbering="record")


def _folder(path: Path, encoding: str | None = None) -> Table:
    """One row per text file; files in sub-folders take the sub-folder's name as their label."""
    rows, names = [], {}
    found: dict[str, float | None] = {}  # encoding -> lowest confidence
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    for i, f in enumerate(files, start=1):
        names[i] = str(f.relative_to(path))
        decoded = decode(f, encoding)
        seen = found.get(decoded.encoding, decoded.confidence)
        found[decoded.encoding] = None if seen is None or decoded.confidence is None else min(seen, decoded.confidence)
        values: dict[str, Any] = {"text": decoded.text.strip(), "file": str(f.relative_to(path))}
        if f.parent != path:
            values["label"] = f.parent.name
        if values["text"]:
            rows.append(Row(i, values))
    if not rows:
        raise DataError(f"{path}: folder holds no non-empty text files")
    name = next(iter(found)) if len(found) == 1 else "mixed (" + ", ".join(sorted(found)) + ")"
    known = [c for c in found.values() if c is not None]
    return Table(str(path), rows, "folder", name, encoding_confidence=min(known) if known else None, numbering="record",
                 encoding_set=encoding is not None, files=names)


def _hf(name: str, shown: str, split: str | None = None) -> Table:
    """A Hugging Face dataset saved with ``save_to_disk``, or a hub id (needs the network). Of a
    DatasetDict, the split named ``split`` (the role the file plays: train, validation, test), or
    its only split; which one was read is recorded."""
    import datasets

    try:
        ds: Any = datasets.load_from_disk(name) if Path(name).is_dir() else datasets.load_dataset(name)
    except Exception as e:  # datasets raises many types: name the source and the cause
        raise DataError(f"{shown}: could not load the Hugging Face dataset ({e})") from None
    chosen = None
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        aliases = {"validation": ("validation", "valid", "val", "dev"), "test": ("test",), "train": ("train",)}
        chosen = next((n for n in aliases.get(split or "train", (split,)) if n in ds), None)
        if chosen is None and len(names) == 1:
            chosen = names[0]
        if chosen is None:
            raise DataError(f"{shown}: a DatasetDict with splits {names} and none for {split or 'train'!r}; point "
                            f"data.{split or 'train'} at one split's folder, e.g. {Path(shown) / names[0]}")
        ds = ds[chosen]
    return Table(shown, [Row(i, dict(r)) for i, r in enumerate(ds, start=1)], "hf", "arrow", split=chosen,
                 numbering="record")
