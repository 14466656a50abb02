"""Time order for ``data.prepare.split: ordered``: the values of ``data.prepare.order_by`` as sort keys.

A value is a number (``17``, ``"3.5"``) or a date: ISO 8601 (``2001-05-14``, ``2001-05-14 16:39``,
``2001-05-14T16:39:00-07:00``, ``...Z``), an e-mail ``Date:`` header (RFC 2822, as Enron's
``Mon, 14 May 2001 16:39:00 -0700 (PDT)``), or a date/datetime value of a Parquet or Hugging Face
column. Dates without a time zone are taken as UTC. One column holds one kind: numbers and dates
mixed, or a value that is neither (``"last Tuesday"``, ``05/01/2001``, which could be May or
January), is an error naming the row.
"""

from __future__ import annotations

import datetime as dt
import email.utils
from typing import Any

from tunesmith.data.formats import DataError

__all__ = ["order_key", "check_one_kind"]

EXPECTED = ("a number, or a date written as ISO 8601 (2001-05-14, 2001-05-14T16:39:00) or as an e-mail Date: "
            "header (Mon, 14 May 2001 16:39:00 -0700)")


def order_key(value: Any, column: str, where: str) -> tuple[str, float]:
    """(kind, key) of one ``order_by`` value: ("number", the number) or ("date", seconds since
    1970 UTC). DataError naming ``where`` and ``column`` when it is neither."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "number", float(value)
    if isinstance(value, dt.date):
        return "date", _seconds(value)
    text = value.strip() if isinstance(value, str) else ""
    if text:
        try:
            return "number", float(text)
        except ValueError:
            pass
        parsed = _date(text)
        if parsed is not None:
            return "date", _seconds(parsed)
    what = "is empty" if value is None or (isinstance(value, str) and not text) else f"is {value!r}"
    raise DataError(f"{where}: field {column!r} (data.prepare.order_by) {what}; expected {EXPECTED}")


def _date(text: str) -> dt.datetime | None:
    """``text`` as a date (ISO 8601, then an e-mail Date: header), or None."""
    try:
        return dt.datetime.fromisoformat(text)
    except ValueError:
        pass
    try:
        return email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None


def _seconds(value: dt.date) -> float:
    """A date or datetime as seconds since 1970 UTC (without a time zone: UTC)."""
    if not isinstance(value, dt.datetime):
        value = dt.datetime.combine(value, dt.time())
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.timestamp()


def check_one_kind(kinds: list[str], wheres: list[str], values: list[Any], column: str) -> None:
    """DataError when a column mixes numbers and dates, naming the first row of the rarer kind."""
    if len(set(kinds)) < 2:
        return
    rare = min(set(kinds), key=lambda k: (kinds.count(k), k))
    i = kinds.index(rare)
    common = "dates" if rare == "number" else "numbers"
    raise DataError(f"{wheres[i]}: field {column!r} (data.prepare.order_by): {values[i]!r} is a {rare}, but the "
                    f"column holds {common}; one column orders by one kind of value")


def sort_by_time(records: dict[str, list[dict[str, Any]]], column: str) -> dict[str, list[Any]]:
    """Sort each split's records (each holding its ``order_by`` value in ``_order`` and its origin
    in ``_source``) oldest first, in place and stably (equal times keep file order). Returns each
    split's first and last value as written. DataError when the column mixes numbers and dates."""
    keyed = {split: [order_key(r["_order"], column, r["_source"]) for r in rows] for split, rows in records.items()}
    flat = [(k, r) for split, rows in records.items() for k, r in zip(keyed[split], rows)]
    check_one_kind([k[0] for k, _ in flat], [r["_source"] for _, r in flat], [r["_order"] for _, r in flat], column)
    for split, rows in records.items():
        order = sorted(range(len(rows)), key=lambda i: keyed[split][i][1])
        records[split] = [rows[i] for i in order]
    return time_ranges(records)


def time_ranges(records: dict[str, list[dict[str, Any]]]) -> dict[str, list[Any]]:
    """Each split's first and last ``_order`` value as written (records sorted oldest first)."""
    return {split: [rows[0]["_order"], rows[-1]["_order"]] for split, rows in records.items() if rows}


def overlap_warnings(records: dict[str, list[dict[str, Any]]], column: str) -> list[str]:
    """A warning for each given validation/test file holding rows older than the newest training row
    (sorted records): the model would train on rows from after some it is tested on."""
    if not records.get("train"):
        return []
    newest = records["train"][-1]
    out = []
    for split in ("validation", "test"):
        rows = records.get(split)
        if rows and order_key(newest["_order"], column, "")[1] > order_key(rows[0]["_order"], column, "")[1]:
            out.append(f"{split} starts before train ends ({column} {rows[0]['_order']!r} in {rows[0]['_source']}, "
                       f"train up to {newest['_order']!r} in {newest['_source']}): the model trains on rows newer "
                       f"than some it is tested on; give {split} rows from after the training period")
    return out
