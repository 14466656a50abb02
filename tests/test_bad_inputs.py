"""Every bad input ends in a named error (exit code 2, the file, line and field in the message) or a
counted skip, never a traceback; and nothing is lost that was not reported (issue 10).

Each case is a file, the config around it, and the expected outcome, run through the CLI verb
`tunesmith prepare` as a user would run it. A Hypothesis test then throws random chat records at
`prepare` with skip_bad_rows and checks that the rows read equal the rows kept plus the rows skipped.
"""

import json
import re
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.data.formats import DataError
from tunesmith.data.prepare import prepare


def lines(*rows):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


GOOD = [{"text": f"good row number {i}", "label": "a" if i % 2 else "b"} for i in range(8)]
CHATS = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(8)]
LABELS = {"a": "yes", "b": "no"}

# name, file name, file content (str or bytes), task, data settings, expected: ("error", text) | ("skip", bad rows)
CASES = [
    ("unlabelled text for classification", "reviews.txt",
     "a good film , well made\nthe worst in years\nmy kids loved it\ntoo long by an hour\nnothing new\nwhy\ngreat cast\n",
     "classification", {"labels": LABELS}, ("error", "no layout for task 'classification' fits the columns")),
    ("unknown label names its type", "d.jsonl", lines(*GOOD, {"text": "x", "label": 2.5}), "classification",
     {"labels": LABELS}, ("error", "d.jsonl:9: field 'label': unknown label 2.5 (a number)")),
    ("unknown text label", "d.jsonl", lines(*GOOD, {"text": "x", "label": "maybe"}), "classification",
     {"labels": LABELS}, ("error", "d.jsonl:9: field 'label': unknown label 'maybe' (text)")),
    ("a text that is a mapping", "d.jsonl", lines(*GOOD, {"text": {"nested": 1}, "label": "a"}), "classification",
     {"labels": LABELS}, ("error", "d.jsonl:9: field 'text': expected text, got a dict")),
    ("tool call with null content", "c.jsonl", lines(*CHATS, {"messages": [
        {"role": "user", "content": "weather?"}, {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]}),
     "chat", {}, ("error", "c.jsonl:9: field messages[1].content is null (a tool call?)")),
    ("empty assistant reply", "c.jsonl", lines(*CHATS, {"messages": [{"role": "user", "content": "hi"},
                                                                      {"role": "assistant", "content": " \n"}]}),
     "chat", {}, ("error", "c.jsonl:9: field messages[1].content: the assistant reply is empty")),
    ("tool role", "c.jsonl", lines(*CHATS, {"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "1"},
                                                         {"role": "assistant", "content": "y"}]}),
     "chat", {}, ("error", "c.jsonl:9: field messages[1].role: 'tool' is not one of system, user, assistant")),
    ("messages not a list", "c.jsonl", lines(*CHATS, {"messages": "hello"}), "chat", {},
     ("error", "c.jsonl:9: field 'messages': expected a non-empty list of messages")),
    ("no assistant turn", "c.jsonl", lines(*CHATS, {"messages": [{"role": "user", "content": "hello"}]}), "chat", {},
     ("error", "c.jsonl:9: field 'messages': no assistant message to train on")),
    ("invalid JSON line", "d.jsonl", lines(*GOOD[:4], '{"text": "cut', *GOOD[4:]), "classification", {"labels": LABELS},
     ("error", "d.jsonl:5: invalid JSON")),
    ("a JSONL row without the output field", "i.jsonl",
     lines(*[{"instruction": f"i{k}", "output": f"o{k}"} for k in range(8)], {"instruction": "no output"}),
     "instruction", {}, ("error", "i.jsonl:9: missing field 'output'")),
    ("CSV row with too many fields", "d.csv", "text,label\n" + "".join(f"row {i},a\n" for i in range(8)) + "x,a,extra\n",
     "classification", {"labels": LABELS}, ("error", "d.csv:10: 3 fields, the header has 2")),
    ("a template naming a missing column", "d.csv", "title,body,label\n" + "".join(f"t{i},b{i},a\n" for i in range(8)),
     "classification", {"labels": LABELS, "columns": {"text": "{title}: {bodyy}"}},
     ("error", "the template '{title}: {bodyy}' uses column 'bodyy', which the file does not have (did you mean 'body'?)")),
    ("a typo in a mapped column", "d.csv", "title,body,label\n" + "".join(f"t{i},b{i},a\n" for i in range(8)),
     "classification", {"labels": LABELS, "columns": {"text": "bdy"}}, ("error", "no column 'bdy' (did you mean 'body'?)")),
    ("an empty file", "d.jsonl", "", "classification", {"labels": LABELS}, ("error", "d.jsonl: the file is empty")),
    ("binary junk", "d.tsv", b"\xff\xfe\x00\x00\x00junk\x00\x01", "classification", {"labels": LABELS},
     ("error", "d.tsv")),
    ("an encoding that does not fit", "d.csv", "text,label\nNão é bom,a\n".encode("cp1252") * 1 + b"ok,b\n" * 7,
     "classification", {"labels": LABELS, "encoding": "utf-8"}, ("error", "is not valid utf-8 (data.encoding 'utf-8')")),
    ("an unknown encoding name", "d.csv", "text,label\nx,a\n" * 8, "classification", {"labels": LABELS, "encoding": "latin-9x"},
     ("error", "data.encoding 'latin-9x' is not a known text encoding")),
    ("a misspelt group_by column", "d.jsonl", lines(*[g | {"user": str(i % 3)} for i, g in enumerate(GOOD)]),
     "classification", {"labels": LABELS, "prepare": {"group_by": "usr"}},
     ("error", "data.prepare.group_by: no column 'usr' in")),
    ("a group_by column missing from one row", "d.jsonl", lines(*[g | {"user": str(i % 3)} for i, g in enumerate(GOOD)],
                                                                {"text": "x", "label": "a"}),
     "classification", {"labels": LABELS, "prepare": {"group_by": "user"}},
     ("error", "d.jsonl:9: data.prepare.group_by column 'user' is missing")),
    ("a row of empty fields: an empty row, counted", "d.csv", "text;label\n" + "".join(f"row {i};a\n" for i in range(8))
     + ";\n", "classification", {"labels": LABELS}, ("skip", 0)),
    ("too few rows for the splits", "d.jsonl", lines(*GOOD[:3]), "classification",
     {"labels": LABELS, "validation_size": 5}, ("error", "after preparation (3 rows left)")),
    ("label with no text: an empty row, dropped and counted", "d.txt",
     "a good\nb bad\na\nb dull\na warm\nb lazy\na fine\nb weak\n", "classification", {"labels": LABELS}, ("skip", 0)),
    ("every bad chat skipped and counted", "c.jsonl", lines(*CHATS, {"messages": "x"}, {"messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": None}]}), "chat", {"skip_bad_rows": True},
     ("skip", 2)),
]


def write_case(tmp_path: Path, model_dir: Path, name: str, content: str | bytes, task: str, data: dict) -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    data = {"train": str(path), "validation_size": 2, **data}
    data["prepare"] = {"dedup": "none", **data.get("prepare", {})}
    cfg = {"name": "bad", "model": str(model_dir), "task": task, "output_dir": str(tmp_path / "runs"), "data": data}
    cpath = tmp_path / "c.yaml"
    cpath.write_text(yaml.safe_dump(cfg))
    return cpath


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, tmp_path, tiny_model_dir, capsys):
    _, name, content, task, data, (kind, expected) = case
    cpath = write_case(tmp_path, tiny_model_dir, name, content, task, data)
    code = main(["prepare", str(cpath)])  # anything but a named error would raise here: no traceback
    err = capsys.readouterr().err
    if kind == "error":
        assert code == 2 and err.startswith("error: ") and expected in err, err
        return
    assert code == 0, err
    report = json.loads((tmp_path / "runs" / "bad" / "data" / "data_report.json").read_text())
    read = report["steps"][0]
    assert read["bad_rows_skipped"] == expected and read["rows_in"] == read["rows_out"] + expected
    kept = sum(st["rows"] for st in report["splits"].values())
    removed = sum(s["removed"] for s in report["steps"][1:])
    assert kept == read["rows_out"] - removed  # every row not kept is counted by some step


ROW_FAULT = re.compile(r"^\S+:\d+: ")  # "file:line: ...": a fault of one row, which --skip-bad-rows skips


def test_every_row_fault_is_skipped_and_counted_with_the_flag(tmp_path, tiny_model_dir, capsys):
    """Each bad-row case above becomes a counted skip under --skip-bad-rows (never a crash later, in training)."""
    checked = 0
    for i, (_, name, content, task, data, (kind, expected)) in enumerate(CASES):
        if kind != "error" or not ROW_FAULT.match(expected):
            continue  # file-level faults (an empty file, a missing column everywhere) stay errors
        folder = tmp_path / str(i)
        folder.mkdir()
        code = main(["prepare", str(write_case(folder, tiny_model_dir, name, content, task, data)), "--skip-bad-rows"])
        err = capsys.readouterr().err
        assert code == 0, (expected, err)
        read = json.loads((folder / "runs" / "bad" / "data" / "data_report.json").read_text())["steps"][0]
        assert read["bad_rows_skipped"] == 1 and read["rows_in"] == read["rows_out"] + 1
        assert any(expected in s for s in read["skipped"]), (expected, read["skipped"])
        checked += 1
    assert checked >= 10


message = st.fixed_dictionaries({}, optional={
    "role": st.sampled_from(["user", "assistant", "system", "tool", "gpt", "human", None, 3]),
    "content": st.one_of(st.none(), st.text(max_size=12), st.integers(), st.lists(st.just({"type": "text", "text": "x"}))),
    "from": st.sampled_from(["human", "gpt"]), "value": st.text(max_size=8)})
record = st.one_of(st.fixed_dictionaries({"messages": st.lists(message, max_size=4)}),
                   st.fixed_dictionaries({"messages": st.one_of(st.none(), st.text(max_size=5), st.integers())}),
                   st.dictionaries(st.sampled_from(["messages", "text", "x"]), st.text(max_size=5), max_size=2))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(record, min_size=1, max_size=12))
def test_random_chat_records_are_kept_or_counted(records):
    good = [{"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}
            for i in range(6)]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.jsonl"
        path.write_text(lines(*good, *records))
        cfg = load_config(data={"task": "chat", "data": {"train": str(path), "validation_size": 2, "skip_bad_rows": True,
                                                         "prepare": {"dedup": "none"}}})
        try:
            out = prepare(cfg, Path(d) / "out")
        except DataError as e:
            assert str(path) in str(e) or "data." in str(e)
            return
        read = out.report["steps"][0]
        assert read["rows_in"] == len(good) + len(records) == read["rows_out"] + read["bad_rows_skipped"]
        removed = sum(s["removed"] for s in out.report["steps"][1:])
        assert sum(len(rows) for rows in out.splits.values()) == read["rows_out"] - removed
