"""Readers and layout detection on every shipped real data set and on crafted files."""

import json
from pathlib import Path

import pytest

from tunesmith.data.formats import DataError, read_table
from tunesmith.data.layouts import detect_layout, rows_to_examples

DATA = Path(__file__).parents[1] / "examples" / "data"
REAL = [  # file, format, layout, rows
    ("sst2/stsa.binary.train", "label_text", "text_label", 6920),
    ("sst2/stsa.binary.dev", "label_text", "text_label", 872),
    ("trec/TREC.train.all", "label_text", "text_label", 5452),
    ("trec/TREC.test.all", "label_text", "text_label", 500),
    ("sms_spam/SMSSpamCollection", "tsv", "text_label", 5574),
    ("bitext/customer_support.csv", "csv", "instruction", 4514),
    ("alpaca/alpaca_en_demo.json", "json", "instruction", 999),
    ("samsum/samsum_200.jsonl", "jsonl", "prompt_completion", 200),
    ("general/wiki_30_articles.txt", "text", "text", 30),
]


@pytest.mark.parametrize("name,fmt,layout,n", REAL, ids=[r[0] for r in REAL])
def test_every_shipped_data_set_loads_by_detection(name, fmt, layout, n):
    table = read_table(DATA / name)
    assert table.format == fmt and len(table.rows) == n and not table.skipped
    found = detect_layout(table)
    assert found.name == layout, found.describe()
    examples = rows_to_examples(table, found)
    assert len(examples) == n


def test_iso_8859_1_is_detected_not_mangled():
    table = read_table(DATA / "trec" / "TREC.train.all")
    assert table.encoding not in ("utf-8", "ascii")
    texts = " ".join(r.values["text"] for r in table.rows)
    assert "Ã" not in texts and "\ufffd" not in texts


def test_bitext_maps_response_to_output_and_ignores_context():
    table = read_table(DATA / "bitext" / "customer_support.csv")
    layout = detect_layout(table)
    assert layout.columns == {"instruction": "instruction", "output": "response"}


def test_headerless_tsv_and_other_delimiters(tmp_path):
    p = tmp_path / "d.tsv"
    p.write_text("spam\tWIN a prize now\nham\tsee you at home\nham\tok lol\n")
    t = read_table(p)
    assert len(t.rows) == 3 and detect_layout(t).columns == {"text": "column_1", "label": "column_0"}
    q = tmp_path / "d.csv"
    q.write_text("text;label\nhello there;1\nbye now;0\n")
    assert [r.values for r in read_table(q).rows] == [{"text": "hello there", "label": "1"}, {"text": "bye now", "label": "0"}]


def test_parquet_folder_and_json_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a b", "c d"], "label": ["x", "y"]}), tmp_path / "d.parquet")
    t = read_table(tmp_path / "d.parquet")
    assert t.format == "parquet" and detect_layout(t).name == "text_label"
    for label in ("pos", "neg"):
        (tmp_path / "docs" / label).mkdir(parents=True)
        (tmp_path / "docs" / label / "1.txt").write_text(f"a {label} review\n")
    t = read_table(tmp_path / "docs")
    assert t.format == "folder" and sorted(r.values["label"] for r in t.rows) == ["neg", "pos"]
    (tmp_path / "cols.json").write_text(json.dumps({"text": ["a", "b"], "label": [1, 0]}))
    assert len(read_table(tmp_path / "cols.json").rows) == 2


def test_hf_dataset_saved_to_disk(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"instruction": ["hi"], "output": ["hello"]}).save_to_disk(tmp_path / "ds")
    t = read_table(tmp_path / "ds")
    assert t.format == "hf" and detect_layout(t).name == "instruction"


def test_skip_bad_rows_counts_instead_of_failing(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "ok", "label": "a"}\n{"text": \n[1, 2]\n{"text": "", "label": "a"}\n{"text": "fine", "label": "b"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: invalid JSON"):
        read_table(p)
    t = read_table(p, skip_bad=True)
    assert len(t.rows) == 3 and len(t.skipped) == 2
    examples = rows_to_examples(t, detect_layout(t), skip_bad=True)
    assert len(examples) == 2 and any("d.jsonl:4: field 'text' is empty" in s for s in t.skipped)


def test_no_layout_fits_names_the_columns(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"foo": 1, "bar": 2, "baz": 3}\n')
    with pytest.raises(DataError) as err:
        detect_layout(read_table(p), task="classification")
    msg = str(err.value)
    assert "d.jsonl: no layout for task 'classification' fits the columns" in msg
    assert "Tried: text_label needs text and label, no column for text (looked for text, sentence" in msg
    assert "Columns found: 'foo' (e.g. 1), 'bar' (e.g. 2), 'baz' (e.g. 3)" in msg and "data.columns" in msg
