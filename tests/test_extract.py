"""Fields marked inside a text (issue 24, C9): data.extract on AESLC's files and HH-RLHF's transcripts."""

import json
import shutil
from pathlib import Path

import pytest

from conftest import examples as read_examples
from tunesmith.config import ConfigError, ExtractConfig, load_config
from tunesmith.data.formats import DataError
from tunesmith.data.prepare import load_splits, prepare
from tunesmith.deploy.generate import read_prompts

ROOT = Path(__file__).parents[1]
AESLC = ROOT / "examples" / "data" / "aeslc"
HH = ROOT / "examples" / "data" / "hh_rlhf" / "harmless_base_7.jsonl"
MARKERS = {"@subject": "subject", "@ann0": "ann0", "@ann1": "ann1", "@ann2": "ann2"}
COLUMNS = {"instruction": "Write a short subject line for this e-mail.", "input": "body", "output": "subject"}
TURNS = {"\n\nHuman: ": "user", "\n\nAssistant: ": "assistant"}


def cfg_for(tmp_path, task="instruction", **data):
    data.setdefault("validation_size", 2)
    prep = data.pop("prepare", {})
    return load_config(data={"name": "x", "task": task, "output_dir": str(tmp_path / "runs"),
                             "data": {**data, "prepare": {"dedup": "none", **prep}}})


def examples(path, task, extract, **data):
    """Examples of one file read as a run reads them, its fields split by ``extract`` (data.extract)."""
    return read_examples(path, task, extract=ExtractConfig(**extract), **data)


def aeslc_folder(tmp_path, texts):
    """A folder of AESLC-layout files: name -> text, written as published (no final newline)."""
    folder = tmp_path / "mail"
    folder.mkdir()
    for name, text in texts.items():
        (folder / name).write_text(text)
    return folder


def test_aeslc_as_published_body_to_subject_with_annotator_references(tmp_path, tokenizer):
    cfg = load_config(ROOT / "examples" / "aeslc.yaml", [f"output_dir={tmp_path}"])
    out = prepare(cfg, tmp_path / "data", tokenizer)
    assert {s: len(r) for s, r in out.splits.items()} == {"train": 40, "validation": 10, "test": 10}
    test = {Path(r["_source"]).name: r for r in out.splits["test"]}
    mail = test["allen-p_inbox_24.subject"]  # its subject is "Huntley/question", annotators wrote three more
    assert mail["output"] == "Huntley/question"
    assert mail["input"].startswith("Phillip, Could you please do me a favor?") and "@subject" not in mail["input"]
    assert mail["input"].endswith("Thanks,")
    assert mail["references"] == ["phillip, could you please do me a favor?",
                                  "need to review your title policy's easements section", "need copy of title policy"]
    assert all(len(r["references"]) == 3 and "@ann" not in r["input"] for r in out.splits["test"])
    assert all(r["output"] and "@" not in r["output"].split()[0] for r in out.splits["train"])
    notes = " ".join(out.report["notes"])
    assert "fields from 'text' by markers: body 40/40, subject 40/40, ann0 0/40" in notes
    assert "ann2 10/10" in notes and out.report["steps"][2]["rows_missing_a_reference"] == 0
    ex = load_splits(cfg, tmp_path / "data").test[0]
    assert ex.messages[-2]["content"].startswith("Write a short subject line for this e-mail.\n\n")
    assert len(ex.references) == 3


def test_a_regex_with_named_groups_reads_the_same_fields(tmp_path):
    regex = r"(?s)(?P<body>.*?)\n@subject\n(?P<subject>[^\n]*)(?:\s*@ann0\n(?P<ann0>[^\n]*))?"
    by_regex = examples(AESLC / "test", "instruction", columns=COLUMNS, extract={"regex": regex}, references=["ann0"])
    by_markers = examples(AESLC / "test", "instruction", columns=COLUMNS,
                          extract={"markers": MARKERS, "before": "body"}, references=["ann0"])
    assert [e.messages for e in by_regex] == [e.messages for e in by_markers]
    assert [e.references for e in by_regex] == [e.references for e in by_markers] and all(e.references for e in by_regex)
    assert by_regex[0].source.endswith("test/allen-p_inbox_24.subject")


def test_a_file_without_its_marker_is_named_and_can_be_skipped(tmp_path):
    folder = aeslc_folder(tmp_path, {"a.subject": "Hi all,\nLunch at noon.\n\n@subject\nLunch",
                                     "b.subject": "No subject here.", "c.subject": "Text\n\n@subject\nC",
                                     "d.subject": "Text\n\n@subject\nD"})
    cfg = cfg_for(tmp_path, train=str(folder), columns=COLUMNS, extract={"markers": MARKERS, "before": "body"})
    with pytest.raises(DataError, match=r"mail/b.subject: missing field 'subject': expected a line starting '@subject' "
                                        r"in field 'text' \(data.extract\)"):
        prepare(cfg, tmp_path / "out")
    cfg.data.skip_bad_rows = True
    read = prepare(cfg, tmp_path / "out").report["steps"][0]
    assert (read["rows_in"], read["rows_out"], read["bad_rows_skipped"]) == (4, 3, 1)
    assert read["skipped"][0].startswith(str(folder / "b.subject"))


def test_texts_that_cannot_be_split_are_bad_rows_naming_file_line_and_what_was_expected(tmp_path):
    folder = aeslc_folder(tmp_path, {"a.subject": "Body\n\n@subject\nOne\n\n@subject\nTwo",
                                     "b.subject": "Body\n\n@subject\nB"})
    columns = {"instruction": "Write a subject.", "input": "body", "output": "subject"}
    with pytest.raises(DataError, match=r"a.subject: field 'text', line 6: a second '@subject' marker \(the first is on line 3\)"):
        examples(folder, "instruction", columns=columns, extract={"markers": MARKERS, "before": "body"})
    with pytest.raises(DataError, match=r"a.subject: field 'text': text before the first marker \('Body'\); expected the "
                                        r"text to start with one of .*'@subject'.*data.extract.before"):
        examples(folder, "instruction", columns=columns, extract={"markers": MARKERS})
    with pytest.raises(DataError, match=r"a.subject: field 'text' does not match data.extract.regex '\(\?P<s>x\)' "
                                        r"\(the text starts 'Body\\n\\n@subject\\nOne\\n\\n@subject\\nTwo'\)"):
        examples(folder, "instruction", columns=columns, extract={"regex": "(?P<s>x)"})
    with pytest.raises(DataError, match=r"no column 'subject'.* data.extract found these fields in no row, looking for "
                                        r"'subject': a line starting '@subjct' in field 'text'"):
        examples(folder, "instruction", columns=columns, extract={"markers": {"@subjct": "subject"}, "before": "body"})
    with pytest.raises(DataError, match=r"data.extract.column: no column 'txt' in .*mail \(did you mean 'text'\?\)"):
        examples(folder, "instruction", columns=columns, extract={"column": "txt", "markers": MARKERS})


def test_markers_count_at_a_line_start_and_not_inside_longer_words(tmp_path):
    folder = aeslc_folder(tmp_path, {"a.txt": "Mail about @subject lines\n  @subject \nReal subject\n@ann10 stays text\n@ann1\nA1"})
    ex = examples(folder, "instruction", columns=COLUMNS, extract={"markers": MARKERS, "before": "body"},
                  references=["ann1"])[0]
    assert ex.messages[-1]["content"] == "Real subject\n@ann10 stays text"
    assert ex.messages[0]["content"].endswith("Mail about @subject lines") and ex.references == ["A1"]


def test_hh_rlhf_transcripts_become_chat_turns(tmp_path, tokenizer):
    cfg = cfg_for(tmp_path, "chat", train=str(HH), extract={"column": "chosen", "turns": TURNS})
    out = prepare(cfg, tmp_path / "out", tokenizer)
    rows = out.splits["train"] + out.splits["validation"]
    assert len(rows) == 7 and "fields from 'chosen' by turns: messages 7/7" in out.report["notes"][0]
    christmas = next(r for r in rows if r["messages"][0]["content"] == "How was your Christmas?")
    assert [m["role"] for m in christmas["messages"]] == ["user", "assistant"] * 3
    assert christmas["messages"][-1]["content"] == "That’s right. It was under the tree when I woke up in the morning."
    assert all(r["messages"][0]["role"] == "user" and r["messages"][-1]["role"] == "assistant" for r in rows)
    assert not any("Human:" in m["content"] or "Assistant:" in m["content"] for r in rows for m in r["messages"])
    raw = json.loads(HH.read_text().splitlines()[6])["chosen"]  # the source transcript, as published
    assert raw.startswith("\n\nHuman: How was your Christmas?\n\nAssistant: It was great")


def test_a_transcript_without_turn_markers_names_what_was_expected(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: hello"}) + "\n"
                    + json.dumps({"chosen": "just a line"}) + "\n")
    with pytest.raises(DataError, match=r"t.jsonl:2: field 'chosen': text before the first marker"):
        examples(path, "chat", extract={"column": "chosen", "turns": TURNS})
    path.write_text(json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: hello"}) + "\n" + json.dumps({"chosen": ""}) + "\n")
    with pytest.raises(DataError, match=r"t.jsonl:2: missing field 'messages': expected turns marked 'Human:' \(user\), "
                                        r"'Assistant:' \(assistant\) in field 'chosen'"):
        examples(path, "chat", extract={"column": "chosen", "turns": TURNS})


def test_generate_splits_new_inputs_as_the_training_data_was(tmp_path):
    cfg = cfg_for(tmp_path, train=str(AESLC / "train"), columns=COLUMNS, extract={"markers": MARKERS, "before": "body"})
    folder = tmp_path / "new"
    shutil.copytree(AESLC / "test", folder)
    (folder / "unsent.txt").write_text("Please send the report by Friday.")  # no subject yet: all of it is the body
    rows = read_prompts(folder, cfg)
    assert len(rows) == 11 and all("@subject" not in r.messages[-1]["content"] for r in rows)
    assert rows[-1].messages == [{"role": "user", "content": f"{COLUMNS['instruction']}\n\nPlease send the report by Friday."}]


def test_generate_reads_inputs_laid_out_otherwise_than_the_training_data(tmp_path):
    """A run trained on HH transcripts (data.extract over 'chosen') answers ordinary prompt files too:
    extraction applies only where the input has its column, the row keeps the input's own fields,
    and a data.columns mapping the input lacks gives way to the usual names, each said in a note."""
    cfg = cfg_for(tmp_path, task="chat", train=str(HH), extract={"column": "chosen", "turns": TURNS})
    path = tmp_path / "new.jsonl"
    path.write_text(json.dumps({"instruction": "Name a colour.", "id": 1}) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": "hi"}], "id": 2}) + "\n")
    notes: list[str] = []
    rows = read_prompts(path, cfg, notes=notes)
    assert [r.messages for r in rows] == [[{"role": "user", "content": "Name a colour."}], [{"role": "user", "content": "hi"}]]
    assert notes == [f"{path}: no column 'chosen', so data.extract does not apply; prompts are read from the file's own columns"]
    hh = tmp_path / "hh.jsonl"
    hh.write_text(json.dumps({"chosen": "\n\nHuman: How are you?\n\nAssistant: Fine.", "rejected": "x"}) + "\n")
    notes.clear()
    row = read_prompts(hh, cfg, notes=notes)[0]
    assert row.messages == [{"role": "user", "content": "How are you?"}] and notes == []
    assert row.values == {"chosen": "\n\nHuman: How are you?\n\nAssistant: Fine.", "rejected": "x"}  # the input's own

    mail = cfg_for(tmp_path, train=str(AESLC / "train"), columns=COLUMNS, extract={"markers": MARKERS, "before": "body"})
    (tmp_path / "q.csv").write_text("text,id\nPlease send the report by Friday.,3\n")  # 'text' holds the mail here
    notes.clear()
    row = read_prompts(tmp_path / "q.csv", mail, notes=notes)[0]  # the folder's 'text' column is there: split as in training
    assert row.messages[-1]["content"] == f"{COLUMNS['instruction']}\n\nPlease send the report by Friday."
    (tmp_path / "r.csv").write_text("prompt,id\nPlease send the report.,3\n")
    notes.clear()
    row = read_prompts(tmp_path / "r.csv", mail, notes=notes)[0]
    assert row.messages[-1]["content"] == f"{COLUMNS['instruction']}\n\nPlease send the report."
    assert notes[-1].endswith("r.csv: the run read input from 'body' (data.columns.input), which this file lacks; "
                              "prompts are read from column 'prompt'"), notes
    (tmp_path / "s.csv").write_text("a,b\nx,y\n")  # nothing but the constant instruction: refused, mappings named
    with pytest.raises(DataError, match=r"no column holds a prompt.*data.columns.input"):
        read_prompts(tmp_path / "s.csv", mail)


def test_config_lists_every_extract_problem_at_once():
    with pytest.raises(ConfigError) as e:
        load_config(data={"task": "chat", "data": {"train": "x.jsonl", "extract": {
            "colum": "chosen", "regex": "(?P<a>x", "turns": {"Human:": "human", " Human: ": "user"}, "before": "head"}}})
    problems = "\n".join(e.value.problems)
    assert "data.extract.colum: unknown key; did you mean 'data.extract.column'?" in problems
    assert "data.extract.regex: give either regex or markers/turns/before, not both" in problems
    assert "data.extract.regex: not a valid regular expression (missing ), unterminated subpattern" in problems
    assert "data.extract.turns['Human:']: 'human' is not a chat role (system, user, assistant); did you mean 'user'?" in problems
    assert "data.extract.turns[' Human: ']: the same marker as data.extract.turns['Human:']" in problems
    with pytest.raises(ConfigError, match=r"data.extract: give regex .*, or markers and/or turns"):
        load_config(data={"data": {"train": "x.jsonl", "extract": {"column": "text"}}})
    with pytest.raises(ConfigError, match=r"data.extract.regex: no named group"):
        load_config(data={"data": {"train": "x.jsonl", "extract": {"regex": "(.*)@subject"}}})


def test_an_edited_file_of_a_folder_prepares_the_data_again(tmp_path):
    folder = tmp_path / "train"
    shutil.copytree(AESLC / "train", folder)
    cfg = cfg_for(tmp_path, train=str(folder), columns=COLUMNS, extract={"markers": MARKERS, "before": "body"})
    first = load_splits(cfg, tmp_path / "data")
    assert load_splits(cfg, tmp_path / "data").reused
    mail = sorted(folder.iterdir())[0]
    mail.write_text(mail.read_text().rsplit("@subject", 1)[0] + "@subject\nA subject written later")
    again = load_splits(cfg, tmp_path / "data")
    assert not again.reused and first.report["content_hash"] != again.report["content_hash"]
    assert "A subject written later" in [e.messages[-1]["content"] for e in again.train + again.validation]
