"""Fields marked inside a text: ``data.extract`` splits one column into columns of their own.

Some data sets keep several fields in one text. AESLC publishes each e-mail as one file: the body,
then a line ``@subject`` and the subject, then ``@ann0``..``@ann2`` lines, each followed by another
annotator's subject. Anthropic's HH-RLHF keeps a whole conversation in one string of
``\\n\\nHuman: `` / ``\\n\\nAssistant: `` turns. Two ways to split such a text (the column
``data.extract.column``; a folder's files and plain-text lines are read into ``text``):

- ``regex``: a Python regular expression searched in the text; each named group becomes a column
  (a group that took no part in the match is left out of the row). ``(?s)`` lets ``.`` cross lines.
- ``markers`` and ``turns``: a marker counts at the start of a line (after any indentation);
  whitespace around it in the config is ignored, so ``"\\n\\nHuman: "`` is the marker ``Human:``,
  and a marker ending in a letter or digit does not match a longer word (``@ann1`` is not
  ``@ann10``). The text after a marker, up to the next marker, is its value. A field marker
  (``markers``: marker -> field) appears at most once per text; an absent one leaves its field out
  of the row (a role that needs it then fails as a "missing field", naming the marker). Turn markers
  (``turns``: marker -> chat role) repeat: in order, they become the ``messages`` column. The text
  before the first marker becomes the field ``before`` names; when ``before`` is not set, that
  text must be blank.

Values are stripped of surrounding whitespace. The marked column is replaced by its fields (so
that layout detection, and ``tunesmith generate``, never take the unsplit text for a prompt); the
row's other columns are kept. A text that
cannot be split (the regex does not match, a field marker repeats, text before the first marker
without ``before``, no such column in the row, a value that is not text) is a bad row: a DataError
naming the file, the row and what was expected; with ``skip_bad`` it is skipped and counted in
``Table.skipped``, as the readers do.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.config import DataConfig, ExtractConfig
from tunesmith.data.formats import DataError, Row, Table, read_table

__all__ = ["extract_fields", "read_data"]


def read_data(path: str | Path, data: DataConfig, *, skip_bad: bool, split: str | None = None,
              fmt: str | None = None) -> Table:
    """Read a data file or folder as ``data`` says (format, delimiter, encoding), then split the
    fields ``data.extract`` marks inside a column. ``fmt`` overrides ``data.format`` (``"auto"``
    for input files that need not be in the training data's format)."""
    table = read_table(path, fmt or data.format, skip_bad=skip_bad, delimiter=data.delimiter,
                       encoding=data.encoding, split=split)
    return extract_fields(table, data.extract, skip_bad) if data.extract is not None else table


@dataclass(frozen=True)
class _Marker:
    text: str  # as matched at a line's start: the configured marker without surrounding whitespace
    name: str  # the field it starts, or the chat role of a turn
    turn: bool


def extract_fields(table: Table, spec: ExtractConfig, skip_bad: bool = False) -> Table:
    """``table`` with the fields marked inside column ``spec.column`` added to each row (see the
    module docstring). Raises DataError for a column no row has (a setting's typo, listing the
    columns) and, unless ``skip_bad``, for the first text that cannot be split."""
    if spec.column not in table.columns:
        close = difflib.get_close_matches(spec.column, table.columns, n=1)
        raise DataError(f"data.extract.column: no column {spec.column!r} in {table.path}"
                        + (f" (did you mean {close[0]!r}?)" if close else "")
                        + f"; columns: {', '.join(map(repr, table.columns))}")
    regex = re.compile(spec.regex) if spec.regex is not None else None
    markers = _markers(spec)
    rows: list[Row] = []
    found: Counter[str] = Counter()
    for row in table.rows:
        where = table.where(row.line)
        try:
            text = _text_of(row, spec.column, where)
            fields = _by_regex(text, regex, spec.column, where) if regex else _by_markers(text, spec, markers, where)
        except DataError as e:
            if not skip_bad:
                raise
            table.skipped.append(str(e))
            continue
        found.update(fields.keys())
        rest = {k: v for k, v in row.values.items() if k != spec.column}  # the text is replaced by its fields
        rows.append(Row(row.line, rest | fields))
    expected = _expected(spec, regex, markers)
    return dataclasses.replace(table, rows=rows, expected=expected,
                               extracted=_describe(spec, expected, found, len(rows)))


def _markers(spec: ExtractConfig) -> list[_Marker]:
    """The markers of ``spec``, longest first (so that ``Human (edited):`` wins over ``Human``)."""
    out = [_Marker(m.strip(), name, False) for m, name in spec.markers.items()]
    out += [_Marker(m.strip(), role, True) for m, role in spec.turns.items()]
    return sorted(out, key=lambda m: -len(m.text))


def _text_of(row: Row, column: str, where: str) -> str:
    """The marked text of a row; DataError when the row lacks it or it is not text."""
    if column not in row.values or row.values[column] is None:
        raise DataError(f"{where}: missing field {column!r} (data.extract.column); "
                        f"the row has {', '.join(map(repr, row.values))}")
    value = row.values[column]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {column!r}: expected text to extract fields from (data.extract), "
                        f"got {type(value).__name__}")
    return value


def _by_regex(text: str, regex: re.Pattern[str], column: str, where: str) -> dict[str, Any]:
    """The named groups of the regex's first match in ``text`` (groups that took no part left out)."""
    m = regex.search(text)
    if m is None:
        raise DataError(f"{where}: field {column!r} does not match data.extract.regex {regex.pattern!r} "
                        f"(the text starts {_sample(text)})")
    return {name: value.strip() for name, value in m.groupdict().items() if value is not None}


def _match(line: str, markers: list[_Marker]) -> _Marker | None:
    """The marker ``line`` starts with (after indentation), if any; ``@ann1`` does not match ``@ann10``."""
    line = line.lstrip()
    for m in markers:
        if line.startswith(m.text):
            after = line[len(m.text):len(m.text) + 1]
            if not (_wordy(m.text[-1]) and after and _wordy(after)):
                return m
    return None


def _wordy(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def _segments(text: str, markers: list[_Marker]) -> list[tuple[_Marker | None, int, str]]:
    """The text cut at marker lines: (marker, or None for the text before the first; the line it
    starts on; its value, stripped)."""
    out: list[tuple[_Marker | None, int, list[str]]] = [(None, 1, [])]
    for n, line in enumerate(text.splitlines(), start=1):
        m = _match(line, markers)
        if m is None:
            out[-1][2].append(line)
        else:
            out.append((m, n, [line.lstrip()[len(m.text):]]))
    return [(m, n, "\n".join(lines).strip()) for m, n, lines in out]


def _by_markers(text: str, spec: ExtractConfig, markers: list[_Marker], where: str) -> dict[str, Any]:
    """The fields and turns marked in ``text`` (see the module docstring)."""
    (_, _, head), *rest = _segments(text, markers)
    out: dict[str, Any] = {}
    if spec.before:
        out[spec.before] = head
    elif head:
        raise DataError(f"{where}: field {spec.column!r}: text before the first marker ({_sample(head)}); expected the "
                        f"text to start with one of {', '.join(repr(m.text) for m in markers)}, "
                        "or set data.extract.before to name the field it is")
    first: dict[str, int] = {}
    turns = []
    for m, line, value in rest:
        if m.turn:
            turns.append({"role": m.name, "content": value})
            continue
        if m.name in first:
            raise DataError(f"{where}: field {spec.column!r}, line {line}: a second {m.text!r} marker (the first is on "
                            f"line {first[m.name]}); a field marker appears once (a repeated one is a turn: "
                            "data.extract.turns)")
        first[m.name] = line
        out[m.name] = value
    if turns:
        out["messages"] = turns
    return out


def _expected(spec: ExtractConfig, regex: re.Pattern[str] | None, markers: list[_Marker]) -> dict[str, str]:
    """Each extracted field -> where it comes from, for messages about a missing one and the report."""
    col = f"field {spec.column!r}"
    if regex is not None:
        return {name: f"group {name!r} of data.extract.regex in {col}" for name in regex.groupindex}
    out = {spec.before: f"the text before the first marker in {col}"} if spec.before else {}
    for m in markers:
        if not m.turn:
            out.setdefault(m.name, f"a line starting {m.text!r} in {col}")
    if spec.turns:
        out["messages"] = f"turns marked {', '.join(f'{m.strip()!r} ({role})' for m, role in spec.turns.items())} in {col}"
    return out


def _describe(spec: ExtractConfig, expected: dict[str, str], found: Counter, rows: int) -> str:
    """How the fields were extracted and how many rows have each, e.g.
    ``fields from 'text' by markers: body 40/40, subject 40/40, ann0 0/40``."""
    how = "data.extract.regex" if spec.regex is not None else " and ".join(k for k in ("markers", "turns") if getattr(spec, k))
    counts = ", ".join(f"{name} {found[name]}/{rows}" for name in expected)
    return f"fields from {spec.column!r} by {how}: {counts}"


def _sample(text: str) -> str:
    """The first 60 characters of a text, quoted, for messages."""
    return repr(text[:57] + "..." if len(text) > 60 else text)
