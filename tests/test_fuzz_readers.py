"""Fuzzing the readers: malformed files and rows end in a named DataError or a counted skip.

Never a traceback: truncated JSON, wrong columns, binary junk, empty files, huge lines,
mixed encodings, NUL bytes, deep nesting.
"""

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunesmith.data.formats import DataError, read_table
from tunesmith.data.layouts import detect_layout, rows_to_examples

SUFFIXES = [".jsonl", ".json", ".csv", ".tsv", ".txt", ""]
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(["text", "label", "instruction", "output", "messages", "role", "content", "x"]), inner, max_size=4),
    max_leaves=12,
)


def load(data: bytes, suffix: str, skip_bad: bool) -> None:
    """Read, detect and map a file; only DataError may escape."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"data{suffix}"
        path.write_bytes(data)
        try:
            table = read_table(path, skip_bad=skip_bad)
            layout = detect_layout(table)
            examples = rows_to_examples(table, layout, skip_bad=skip_bad)
        except DataError as e:
            assert str(path) in str(e) or "data.columns" in str(e), str(e)  # the error names the file
            return
        assert len(examples) + len(table.skipped) >= 1


@FUZZ
@given(st.binary(max_size=2000), st.sampled_from(SUFFIXES), st.booleans())
def test_binary_junk(data, suffix, skip_bad):
    load(data, suffix, skip_bad)


@FUZZ
@given(st.lists(json_values, max_size=8), st.sampled_from([".jsonl", ".json"]), st.integers(0, 400), st.booleans())
def test_truncated_and_wrong_json(values, suffix, cut, skip_bad):
    text = "\n".join(json.dumps(v) for v in values) if suffix == ".jsonl" else json.dumps(values)
    load(text.encode()[: len(text) - cut if cut < len(text) else len(text)], suffix, skip_bad)


@FUZZ
@given(st.lists(st.lists(st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=20), max_size=5), max_size=10),
       st.sampled_from([",", "\t", ";"]), st.sampled_from([".csv", ".tsv", ""]), st.booleans())
def test_csv_with_wrong_columns(rows, delimiter, suffix, skip_bad):
    text = "\n".join(delimiter.join(r) for r in [["text", "label"], *rows])
    load(text.encode("utf-8"), suffix, skip_bad)


@FUZZ
@given(st.text(max_size=200), st.text(max_size=200), st.booleans())
def test_mixed_encodings(a, b, skip_bad):
    data = f"1 {a}\n".encode("utf-8") + f"0 {b}\n".encode("latin-1", errors="replace")
    load(data, ".txt", skip_bad)


def test_named_edge_cases():
    cases = [
        (b"", ".jsonl"), (b"\n\n  \n", ".csv"), (b"[" * 100_000, ".json"), (b'{"text": "a\x00b", "label": "1"}\n', ".jsonl"),
        (b"text,label\nab\x00c,1\n", ".csv"), (b"1 " + b"x" * 5_000_000 + b"\n", ".txt"), (b"\xff\xfe\x00\x00junk", ".tsv"),
        (b'{"messages": [{"role": "user"}]}\n', ".jsonl"), (b'{"text": {"nested": 1}, "label": "a"}\n', ".jsonl"),
    ]
    for data, suffix in cases:
        for skip_bad in (False, True):
            load(data, suffix, skip_bad)
