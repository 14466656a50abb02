"""Data goes in as its owner has it (issue 10, A): each case through `prepare`, asserting the right value."""

import json
import re
from pathlib import Path

import pytest
import yaml

from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.data.formats import DataError
from tunesmith.data.prepare import load_splits, prepare

DATA = Path(__file__).parents[1] / "examples" / "data"


def cfg_for(tmp_path, task, **data):
    data.setdefault("validation_size", 2)
    prep = data.pop("prepare", {})
    return load_config(data={"name": "p", "task": task, "output_dir": str(tmp_path / "runs"),
                             "data": {**data, "prepare": {"dedup": "none", **prep}}})


def steps_of(out):
    return {s["step"]: s for s in out.report["steps"]}


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_alpaca_rows_with_an_empty_input_keep_their_row(tmp_path):
    rows = json.loads((DATA / "alpaca" / "alpaca_en_demo.json").read_text())
    assert sum(r["input"] == "" for r in rows) == 587
    out = prepare(cfg_for(tmp_path, "instruction", train=str(DATA / "alpaca" / "alpaca_en_demo.json"),
                          prepare={"dedup": "exact"}), tmp_path / "out")
    steps = steps_of(out)
    assert steps["read train"]["rows_out"] == 999 and steps["drop empty rows"]["removed"] == 0
    kept = sum(len(r) for r in out.splits.values())
    assert kept == 999 - steps["de-duplicate train"]["exact_removed"] - out.report["dedup"].get("leakage_removed", 0)
    assert sum(r["input"] == "" for rows in out.splits.values() for r in rows) > 550
    ex = load_splits(cfg_for(tmp_path, "instruction", train=str(DATA / "alpaca" / "alpaca_en_demo.json"),
                             prepare={"dedup": "exact"}), tmp_path / "out").train[0]
    assert "\n\n" not in ex.messages[-2]["content"] or ex.messages[-2]["content"].split("\n\n")[-1].strip()


NEWS = ('3,"Wall St. Bears Claw Back Into the Black (Reuters)","Reuters - Short-sellers, Wall Street\'s dwindling band"\n'
        '3,"Carlyle Looks Toward Commercial Aerospace (Reuters)","Reuters - Private investment firm Carlyle Group"\n'
        '4,"Google IPO faces hurdles","The search engine\'s auction met resistance"\n'
        '1,"Talks on Iraq stall","Negotiators failed to agree on a timetable"\n'
        '2,"Phelps wins gold","The swimmer took his fifth title"\n'
        '4,"New chip from Intel","A faster processor for laptops"\n')


def test_columns_compose_a_headerless_csv_into_text(tmp_path):
    path = tmp_path / "ag_news.csv"
    path.write_text(NEWS)
    labels = {"1": "World", "2": "Sports", "3": "Business", "4": "Sci/Tech"}
    cfg = cfg_for(tmp_path, "classification", train=str(path), labels=labels,
                  columns={"label": "column_0", "text": "{column_1}\n{column_2}"})
    out = prepare(cfg, tmp_path / "out")
    first = next(r for rows in out.splits.values() for r in rows if r["_source"].endswith(":1"))
    assert first["text"] == "Wall St. Bears Claw Back Into the Black (Reuters)\nReuters - Short-sellers, Wall Street's dwindling band"
    assert first["label"] == "3"
    assert "text<-'{column_1}\\n{column_2}' (template)" in out.report["notes"][0]
    bad = cfg_for(tmp_path, "classification", train=str(path), labels=labels,
                  columns={"label": "column_0", "text": "{column_1}\n{column_3}"})
    with pytest.raises(DataError, match=r"the template '\{column_1\}\\n\{column_3\}' uses column 'column_3', which the file "
                                        r"does not have \(did you mean 'column_2'\?\)"):
        prepare(bad, tmp_path / "out")
    typo = cfg_for(tmp_path, "classification", train=str(path), labels=labels, columns={"label": "colum_0", "text": "column_1"})
    with pytest.raises(DataError, match=r"data.columns.label \(.*ag_news.csv\): no column 'colum_0' \(did you mean 'column_0'\?\)"):
        prepare(typo, tmp_path / "out")


def test_a_constant_instruction_and_a_per_split_reference_column(tmp_path):
    train = jsonl(tmp_path / "train.jsonl", [{"dialogue": f"A: hi {i}\nB: hello {i}", "summary": f"greetings {i}"}
                                             for i in range(8)])
    test = jsonl(tmp_path / "test.jsonl", [{"dialogue": f"A: bye {i}\nB: see you", "summary1": f"farewell {i}",
                                            "summary2": f"they part {i}", "summary3": f"goodbye {i}"} for i in range(4)])
    cfg = cfg_for(tmp_path, "instruction", train=str(train), test=str(test),
                  columns={"instruction": "Summarize the dialogue.", "input": "dialogue", "output": "summary"},
                  test_columns={"output": "summary1"}, references=["summary2", "summary3"])
    splits = load_splits(cfg, tmp_path / "out")
    ex = splits.test[0]
    assert ex.messages[0] == {"role": "user", "content": "Summarize the dialogue.\n\nA: bye 0\nB: see you"}
    assert ex.messages[1]["content"] == "farewell 0" and ex.references == ["they part 0", "goodbye 0"]
    assert splits.train[0].messages[0]["content"].startswith("Summarize the dialogue.\n\nA: hi")
    assert splits.train[0].references == []  # the train file has no such columns: not needed there
    note = splits.report["notes"][1]
    assert "instruction<-'Summarize the dialogue.' (constant)" in note and "output<-'summary1'" in note
    missing = cfg_for(tmp_path, "instruction", train=str(train), test=str(test),
                      columns={"instruction": "Summarize the dialogue.", "input": "dialogue", "output": "summary"},
                      test_columns={"output": "summary1"}, references=["summary2", "summary4"])
    with pytest.raises(DataError, match=r"data.references \(.*test.jsonl\): no column 'summary4'"):
        prepare(missing, tmp_path / "out2")


def test_config_rejects_per_split_columns_without_the_file():
    with pytest.raises(Exception, match="data.test_columns: there is no data.test file"):
        load_config(data={"data": {"train": "x", "test_columns": {"output": "a"}}})


def test_unlabelled_text_for_classification_stops_before_training_naming_the_layout(tmp_path):
    path = tmp_path / "reviews.txt"
    path.write_text("a fine film , well acted and warm\nthe worst thing i have seen this year\nmy kids loved it\n"
                    "an hour too long\nnothing new , but fun\nwhy did i pay for this\ngreat cast , weak plot\n")
    cfg = cfg_for(tmp_path, "classification", train=str(path), labels={"0": "negative", "1": "positive"})
    with pytest.raises(DataError) as err:
        prepare(cfg, tmp_path / "out")
    msg = str(err.value)
    assert "no layout for task 'classification' fits the columns" in msg and "text_label needs text and label" in msg
    assert "no column for label" in msg and "'text' (e.g. 'a fine film" in msg
    with pytest.raises(DataError, match="data.layout: 'text' cannot serve task 'classification'"):
        prepare(cfg_for(tmp_path, "classification", train=str(path), labels={"0": "n", "1": "p"}, layout="text"),
                tmp_path / "out")


def test_label_text_with_two_spaces_after_one_label_is_still_labelled(tmp_path):
    path = tmp_path / "sst.txt"
    lines = ["1 a stirring , funny film", "0 one long string of cliches", "1  two spaces after this label",
             "0 a lazy dog", "1 finally transporting", "0 long cliches"]
    path.write_text("\n".join(lines) + "\n")
    splits = load_splits(cfg_for(tmp_path, "classification", train=str(path), labels={"0": "neg", "1": "pos"}),
                         tmp_path / "out")
    every = splits.train + splits.validation
    assert len(every) == 6 and {"two spaces after this label"} <= {e.messages[-2]["content"] for e in every}


def test_labels_match_by_meaning_and_unknown_ones_name_their_type(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [{"text": f"text {i}", "label": [True, False, 1.0, 0][i % 4] if i < 8 else "true"}
                                        for i in range(9)])
    cfg = cfg_for(tmp_path, "classification", train=str(path), labels={"true": "yes", "false": "no"})
    with pytest.raises(DataError, match=r"d.jsonl:3: field 'label': unknown label 1.0 \(a number\); expected one of 'true', 'false'"):
        prepare(cfg, tmp_path / "out")
    path = jsonl(tmp_path / "d.jsonl", [{"text": f"text {i}", "label": [True, False, "true", " false "][i % 4]}
                                        for i in range(8)])
    out = prepare(cfg_for(tmp_path, "classification", train=str(path), labels={"true": "yes", "false": "no"}), tmp_path / "o")
    assert sorted({r["label"] for rows in out.splits.values() for r in rows}) == ["false", "true"]
    nums = jsonl(tmp_path / "n.jsonl", [{"text": f"t {i}", "label": [1.0, 0.0, 1, "0"][i % 4]} for i in range(8)])
    out = prepare(cfg_for(tmp_path, "classification", train=str(nums), labels={"0": "neg", "1": "pos"}), tmp_path / "o2")
    assert sorted({r["label"] for rows in out.splits.values() for r in rows}) == ["0", "1"]


def test_a_declared_label_with_no_training_rows_is_warned_about(tmp_path, tiny_model_dir, capsys):
    train = jsonl(tmp_path / "train.jsonl", [{"text": f"text {i}", "label": str(i % 2)} for i in range(10)])
    test = jsonl(tmp_path / "test.jsonl", [{"text": f"other {i}", "label": str(i % 3)} for i in range(6)])
    cfg = {"name": "w", "model": str(tiny_model_dir), "task": "classification", "output_dir": str(tmp_path / "runs"),
           "data": {"train": str(train), "test": str(test), "validation_size": 2,
                    "labels": {"0": "zero", "1": "one", "2": "two"}}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["prepare", str(path)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "warning: label '2' (two) has no training rows; it appears in test: the model cannot learn it" in out
    assert "label &#x27;2&#x27; (two) has no training rows" in (tmp_path / "runs" / "w" / "report.html").read_text()


def test_skip_bad_rows_skips_every_kind_and_the_counts_add_up(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(7)]
    rows.insert(2, {"messages": [{"role": "user", "content": "weather?"},
                                 {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]})
    rows.insert(5, {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "   "}]})
    rows.insert(7, {"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "42"},
                                 {"role": "assistant", "content": "y"}]})
    path = jsonl(tmp_path / "chat.jsonl", rows)
    assert len(rows) == 10
    with pytest.raises(DataError, match=r"chat.jsonl:3: field messages\[1\].content is null \(a tool call\?\).*and 2 more bad rows"):
        prepare(cfg_for(tmp_path, "chat", train=str(path)), tmp_path / "out")
    out = prepare(cfg_for(tmp_path, "chat", train=str(path), skip_bad_rows=True), tmp_path / "out")
    read = steps_of(out)["read train"]
    assert (read["rows_in"], read["rows_out"], read["bad_rows_skipped"]) == (10, 7, 3)
    assert any("chat.jsonl:6: field messages[1].content: the assistant reply is empty" in s for s in read["skipped"])
    assert any("chat.jsonl:8: field messages[1].role: 'tool'" in s for s in read["skipped"])


def test_one_bad_row_in_ten_reads_ten_and_keeps_nine(tmp_path):
    lines = [json.dumps({"text": f"text {i}", "label": "a"}) for i in range(9)]
    lines.insert(4, '{"text": "broken json", ')
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    out = prepare(cfg_for(tmp_path, "classification", train=str(path), labels={"a": "A"}, skip_bad_rows=True,
                          validation_size=1), tmp_path / "out")
    read = steps_of(out)["read train"]
    assert (read["rows_in"], read["rows_out"], read["removed"]) == (10, 9, 1)


def test_a_label_with_no_text_is_an_empty_row_dropped_and_counted(tmp_path):
    path = tmp_path / "sst.txt"
    path.write_text("1 a good film\n0 a bad film\n1\n0 dull and long\n1 warm and funny\n0 lazy\n")
    out = prepare(cfg_for(tmp_path, "classification", train=str(path), labels={"0": "neg", "1": "pos"}), tmp_path / "out")
    s = steps_of(out)
    assert (s["read train"]["rows_in"], s["read train"]["rows_out"]) == (6, 6)
    assert s["drop empty rows"]["removed"] == 1 and s["drop empty rows"]["empty_in_files"] == 1
    assert sum(len(r) for r in out.splits.values()) == 5


def test_the_test_split_is_kept_as_given_while_train_leaks_are_removed(tmp_path, tokenizer):
    train = jsonl(tmp_path / "train.jsonl", [{"text": f"train sentence number {i} is here", "label": str(i % 2)}
                                             for i in range(10)] + [{"text": "a test sentence that leaks", "label": "1"}])
    test_rows = [{"text": "a test sentence that leaks", "label": "1"}] * 2 + [{"text": "x " * 300, "label": "0"},
                                                                              {"text": "another test", "label": "0"}]
    test = jsonl(tmp_path / "test.jsonl", test_rows)
    cfg = cfg_for(tmp_path, "classification", train=str(train), test=str(test), labels={"0": "n", "1": "p"},
                  prepare={"dedup": "near", "max_tokens": 100})
    out = prepare(cfg, tmp_path / "out", tokenizer)
    assert len(out.splits["test"]) == 4  # duplicates and a too-long row reported, not removed
    s = steps_of(out)
    assert s["de-duplicate test"]["exact_duplicates_kept"] == 1 and s["de-duplicate test"]["removed"] == 0
    assert s["length filter (tokens)"]["too_long_kept_in_test"] == 1
    assert out.report["dedup"]["leakage_removed"] == 1
    assert not any("leaks" in r["text"] for r in out.splits["train"] + out.splits["validation"])
    cfg.data.prepare.filter_test = True
    out = prepare(cfg, tmp_path / "out2", tokenizer)
    assert len(out.splits["test"]) == 2


def test_split_sizes_accept_counts_and_are_printed(tmp_path, tiny_model_dir, capsys):
    train = jsonl(tmp_path / "train.jsonl", [{"text": f"sentence number {i} here", "label": str(i % 2)} for i in range(40)])
    cfg = {"name": "s", "model": str(tiny_model_dir), "task": "classification", "output_dir": str(tmp_path / "runs"),
           "data": {"train": str(train), "validation_size": 6, "labels": {"0": "n", "1": "p"},
                    "prepare": {"test_size": 10, "dedup": "none"}}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["prepare", str(path)]) == 0
    out = capsys.readouterr().out
    for split, n in (("train", 24), ("validation", 6), ("test", 10)):
        assert re.search(rf"{split} split\s*│\s*│\s*{n} │", out), split


def test_near_duplicates_with_different_answers_survive_and_heavy_removal_warns(tmp_path):
    rows = [{"instruction": f"Convert {c} degrees Celsius to Fahrenheit.", "output": f"{c * 9 / 5 + 32:g} degrees Fahrenheit."}
            for c in range(10, 50)]
    rows += [{"instruction": "Write a haiku about the sea and the salt wind.", "output": "Waves fold on the shore."}] * 1
    rows += [{"instruction": "Write a haiku about the sea and the salt wind!", "output": "Waves fold on the shore."}] * 1
    path = jsonl(tmp_path / "d.jsonl", rows)
    out = prepare(cfg_for(tmp_path, "instruction", train=str(path), prepare={"dedup": "near", "dedup_threshold": 0.7}),
                  tmp_path / "out")
    assert sum(len(r) for r in out.splits.values()) == 41  # 40 conversions kept, the two haikus merged
    assert out.report["warnings"] == []
    same = [{"instruction": f"Say hello to the whole wide world, friend {i}.", "output": "Hello, world!"} for i in range(30)]
    same += [{"instruction": f"Name a prime number above {i * 7}.", "output": f"{i}"} for i in range(20)]
    out = prepare(cfg_for(tmp_path, "instruction", train=str(jsonl(tmp_path / "s.jsonl", same)),
                          prepare={"dedup": "near", "dedup_threshold": 0.7}), tmp_path / "out2")
    assert any("near duplicates from train" in w and "more than 10%" in w for w in out.report["warnings"])


def test_prepare_loads_the_tokenizer_only(tmp_path, tiny_model_dir, monkeypatch, sst_files):
    import transformers

    def no_model(*a, **k):
        raise AssertionError("prepare must not load the model")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
    cfg = {"name": "t", "model": str(tiny_model_dir), "task": "classification", "output_dir": str(tmp_path / "runs"),
           "data": {"train": str(sst_files["train"]), "labels": {"0": "n", "1": "p"}, "prepare": {"dedup": "none"}}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["prepare", str(path)]) == 0


def test_windows_1252_file_with_a_delimiter_override_through_prepare(tmp_path, capsys, tiny_model_dir):
    text = "label;review\n1;Não é ótimo… “bom” – sim\n0;Señor, ¡qué mal! ‘péssimo’ — não\n1;Ação e coração: ótimo\n0;Não gostei nada\n"
    path = tmp_path / "reviews.csv"
    path.write_bytes(text.encode("cp1252"))
    cfg = {"name": "e", "model": str(tiny_model_dir), "task": "classification", "output_dir": str(tmp_path / "runs"),
           "data": {"train": str(path), "delimiter": ";", "validation_size": 2, "labels": {"0": "neg", "1": "pos"},
                    "prepare": {"dedup": "none"}}}
    cpath = tmp_path / "c.yaml"
    cpath.write_text(yaml.safe_dump(cfg))
    assert main(["prepare", str(cpath)]) == 0
    out = capsys.readouterr().out.replace("\n", " ")
    assert "cp1252" in out and "data.encoding" in out
    texts = [json.loads(line)["text"] for f in ("train", "validation") for line in
             (tmp_path / "runs" / "e" / "data" / f"{f}.jsonl").read_text().splitlines()]
    assert "Não é ótimo… “bom” – sim" in texts and "Não gostei nada" in texts


def test_html_in_answers_and_code_is_kept_as_written(tmp_path):
    """The Alpaca demo's HTML answers (a table, a page with a script, fenced code) are what the model
    should learn to write: cleaning strips HTML from prompts only, and never touches code."""
    path = DATA / "alpaca" / "alpaca_en_demo.json"
    rows = json.loads(path.read_text())
    out = prepare(cfg_for(tmp_path, "instruction", train=str(path)), tmp_path / "out")
    outputs = {r["instruction"]: r["output"] for rows_ in out.splits.values() for r in rows_}
    for i in (373, 558, 576):  # only trailing blanks on a line go
        assert outputs[rows[i]["instruction"]] == "\n".join(line.rstrip() for line in rows[i]["output"].strip().split("\n")), i
    clean = next(s for s in out.report["steps"] if s["step"] == "clean")
    assert "html" not in clean["by_operation"] and clean["html_in_answers"] == "kept"
    cfg = cfg_for(tmp_path, "instruction", train=str(path), prepare={"strip_html_answers": True})
    out = prepare(cfg, tmp_path / "out2")
    assert next(s for s in out.report["steps"] if s["step"] == "clean")["by_operation"]["html"] >= 2  # unfenced HTML


def test_rows_of_a_pretty_printed_json_list_are_named_by_their_line(tmp_path):
    rows = [{"text": f"text {i}", "label": "a"} for i in range(6)] + [{"text": "odd one", "label": "maybe"}]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows, indent=2))
    line = path.read_text().splitlines().index('  {', path.read_text().splitlines().index('    "text": "odd one",') - 1) + 1
    with pytest.raises(DataError, match=rf"d.json:{line}: field 'label': unknown label 'maybe'"):
        prepare(cfg_for(tmp_path, "classification", train=str(path), labels={"a": "A", "b": "B"}), tmp_path / "out")
    cols = tmp_path / "c.json"
    cols.write_text(json.dumps({"text": [r["text"] for r in rows], "label": [r["label"] for r in rows]}))
    with pytest.raises(DataError, match=r"c.json: record 7: field 'label': unknown label 'maybe'"):
        prepare(cfg_for(tmp_path, "classification", train=str(cols), labels={"a": "A", "b": "B"}), tmp_path / "out")


def test_a_dataset_dict_folder_gives_each_split_its_own(tmp_path):
    import datasets

    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"instruction": [f"q{i}" for i in range(10)], "output": [f"a{i}" for i in range(10)]}),
        "test": datasets.Dataset.from_dict({"instruction": ["tq0", "tq1"], "output": ["ta0", "ta1"]})})
    dd.save_to_disk(tmp_path / "dd")
    splits = load_splits(cfg_for(tmp_path, "instruction", train=str(tmp_path / "dd"), test=str(tmp_path / "dd")),
                         tmp_path / "out")
    assert len(splits.train) + len(splits.validation) == 10 and [e.messages[0]["content"] for e in splits.test] == ["tq0", "tq1"]
    assert "split 'test'" in splits.report["notes"][1]


def test_token_lengths_count_control_token_text_as_the_text_it_is(tmp_path, tokenizer):
    """`<|im_end|>` typed in a review is several tokens of text, never one control id (as every encoder)."""
    from tunesmith.data.render import encode_plain

    text = "fine <|im_end|><|im_start|>system"
    train = jsonl(tmp_path / "train.jsonl", [{"text": f"{text} {i}", "label": str(i % 2)} for i in range(12)])
    cfg = cfg_for(tmp_path, "classification", train=str(train), labels={"0": "n", "1": "p"}, prepare={"dedup": "none"})
    out = prepare(cfg, tmp_path / "out", tokenizer)
    rows = out.splits["train"]
    lengths = out.report["splits"]["train"]["token_lengths"]
    assert lengths == [len(encode_plain(tokenizer, r["text"])) for r in rows]
    parsed = len(tokenizer(rows[0]["text"], add_special_tokens=False)["input_ids"])
    assert lengths[0] > parsed  # the control-token reading is shorter: that was the old count


def test_rows_without_a_label_are_what_labeling_functions_label(tmp_path, tokenizer):
    """Weak supervision's own case: some rows have no label (empty in CSV, null in JSONL); the
    labeling functions label them, nothing crashes before the functions are even loaded."""
    lfs = tmp_path / "lfs.py"
    lfs.write_text("from tunesmith.data.label import ABSTAIN, labeling_function\n\n"
                   "@labeling_function()\n"
                   "def prize(text):\n"
                   "    return 'spam' if 'prize' in text else ABSTAIN\n\n"
                   "@labeling_function()\n"
                   "def casual(text):\n"
                   "    return 'ham' if 'lunch' in text else ABSTAIN\n")
    rows = ([{"text": f"win a prize number {i} now", "label": "spam"} for i in range(6)]
            + [{"text": f"lunch at {i} today?", "label": "ham"} for i in range(6)]
            + [{"text": f"claim your prize {i}", "label": None} for i in range(5)]
            + [{"text": f"lunch with team {i}", "label": ""} for i in range(5)]
            + [{"text": f"prize draw {i} tonight", "label": "  "} for i in range(3)])  # blank is no label either
    train = jsonl(tmp_path / "train.jsonl", rows)
    cfg = cfg_for(tmp_path, "classification", train=str(train), labels={"spam": "spam", "ham": "ham"},
                  validation_size=6, prepare={"labeling_functions": str(lfs)})
    out = prepare(cfg, tmp_path / "out", tokenizer)
    kept = [r for split in out.splits.values() for r in split]
    assert {r["label"] for r in kept} == {"spam", "ham"}
    assert any(r["text"].startswith("claim your prize") and r["label"] == "spam" for r in kept)
    assert any(r["text"].startswith("lunch with team") and r["label"] == "ham" for r in kept)
    assert any(r["text"].startswith("prize draw") and r["label"] == "spam" for r in kept)
