"""Reading data files into rows, and rows into chat examples.

Formats: JSONL, JSON (a list of records), CSV/TSV (with a header), and ``LABEL TEXT`` lines.
Layouts (chosen by the task): instruction (instruction/input/output), chat (messages) and
text+label classification (label values mapped to target words).
Every bad row raises DataError naming the file, the line and the field.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")

# The column each layout reads, by role, unless the config's data.columns says otherwise.
DEFAULT_COLUMNS: dict[str, dict[str, str]] = {
    "classification": {"text": "text", "label": "label"},
    "instruction": {"instruction": "instruction", "input": "input", "output": "output"},
    "chat": {"messages": "messages"},
}


class DataError(ValueError):
    """Bad input data; the message names file, line and field."""


@dataclass
class Row:
    """One record as read from a file, with the line it starts on (1-based)."""

    line: int
    values: dict[str, Any]


@dataclass
class Example:
    """A conversation to train on; the assistant turns are the targets."""

    messages: list[dict[str, str]]
    label: str | None = None  # raw label (classification only)
    source: str = ""  # "file:line", for error messages and reports
    meta: dict[str, Any] = field(default_factory=dict)


def detect_format(path: Path) -> str:
    suffix = path.suffix.lower()
    return {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv"}.get(suffix, "label_text")


def read_rows(path: str | Path, fmt: str = "auto") -> list[Row]:
    """Read every record of a data file; raise DataError naming the file and line if bad."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    fmt = detect_format(path) if fmt == "auto" else fmt
    text = _read_text(path)
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    reader = {"jsonl": _jsonl, "json": _json, "csv": _csv, "tsv": _csv, "label_text": _label_text}[fmt]
    return reader(path, text, fmt)


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: not valid UTF-8 (byte {raw[e.start]:#x} at offset {e.start}); "
            "convert the file to UTF-8"
        ) from None


def _jsonl(path: Path, text: str, fmt: str) -> list[Row]:
    rows = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(value, dict):
            raise DataError(f"{path}:{i}: expected a JSON object, got {type(value).__name__}")
        rows.append(Row(i, value))
    return rows


def _json(path: Path, text: str, fmt: str) -> list[Row]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value.values())), list):
        value = next(iter(value.values()))  # {"data": [...]}
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(value).__name__}")
    rows = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise DataError(f"{path}: record {i}: expected an object, got {type(item).__name__}")
        rows.append(Row(i + 1, item))  # JSON lists have no useful line; we report the record index
    return rows


def _csv(path: Path, text: str, fmt: str) -> list[Row]:
    delimiter = "\t" if fmt == "tsv" else ","
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    if not reader.fieldnames:
        raise DataError(f"{path}:1: no header row")
    rows = []
    for values in reader:
        line = reader.line_num
        if None in values:
            raise DataError(f"{path}:{line}: more fields than the header has ({len(reader.fieldnames)})")
        rows.append(Row(line, dict(values)))
    return rows


def _label_text(path: Path, text: str, fmt: str) -> list[Row]:
    rows = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        label, _, rest = line.strip().partition(" ")
        if not rest.strip():
            raise DataError(f"{path}:{i}: expected 'LABEL TEXT', found no text after the label")
        rows.append(Row(i, {"label": label, "text": rest.strip()}))
    return rows


def rows_to_examples(
    rows: list[Row],
    path: str | Path,
    task: str,
    columns: dict[str, str] | None = None,
    labels: dict[str, str] | None = None,
    system_prompt: str | None = None,
) -> list[Example]:
    """Map rows onto conversations for ``task``; raise DataError on the first bad row."""
    cols = {**DEFAULT_COLUMNS[task], **(columns or {})}
    unknown = set(columns or {}) - set(DEFAULT_COLUMNS[task])
    if unknown:
        raise DataError(
            f"data.columns: {', '.join(sorted(unknown))} not used by task {task!r}; "
            f"roles are {', '.join(DEFAULT_COLUMNS[task])}"
        )
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    out = []
    for row in rows:
        where = f"{path}:{row.line}"
        if task == "classification":
            text = _field(row, cols["text"], where)
            raw = _field(row, cols["label"], where)
            if raw not in (labels or {}):
                known = ", ".join(repr(k) for k in (labels or {}))
                raise DataError(f"{where}: field {cols['label']!r}: unknown label {raw!r}; expected one of {known}")
            messages = system + [
                {"role": "user", "content": text},
                {"role": "assistant", "content": labels[raw]},  # type: ignore[index]
            ]
            out.append(Example(messages, label=raw, source=where))
        elif task == "instruction":
            instruction = _field(row, cols["instruction"], where)
            extra = row.values.get(cols["input"]) or ""
            if not isinstance(extra, str):
                raise DataError(f"{where}: field {cols['input']!r}: expected text, got {type(extra).__name__}")
            user = f"{instruction}\n\n{extra.strip()}" if extra.strip() else instruction
            messages = system + [
                {"role": "user", "content": user},
                {"role": "assistant", "content": _field(row, cols["output"], where)},
            ]
            out.append(Example(messages, source=where))
        else:
            out.append(Example(_messages(row, cols["messages"], where, system), source=where))
    return out


def _field(row: Row, name: str, where: str) -> str:
    if name not in row.values:
        have = ", ".join(repr(k) for k in row.values)
        raise DataError(f"{where}: missing field {name!r} (the row has {have}); map it with data.columns")
    value = row.values[name]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r}: expected text, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field {name!r} is empty")
    return value.strip()


def _messages(row: Row, name: str, where: str, system: list[dict[str, str]]) -> list[dict[str, str]]:
    value = row.values.get(name)
    if value is None:
        raise DataError(f"{where}: missing field {name!r}; map it with data.columns")
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {name!r}: expected a non-empty list of messages")
    messages = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: field {name}[{j}]: expected {{role, content}} with text content")
        if m.get("role") not in ROLES:
            raise DataError(f"{where}: field {name}[{j}].role: {m.get('role')!r} is not one of {', '.join(ROLES)}")
        messages.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: field {name!r}: no assistant message to train on")
    if system and messages[0]["role"] != "system":
        messages = system + messages
    return messages
