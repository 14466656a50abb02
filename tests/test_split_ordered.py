"""Ordered splits for time-ordered data (issue 24, C10): the newest rows are the test set."""

import csv
import random

import pytest

from tunesmith.config import ConfigError, load_config
from tunesmith.data.formats import DataError
from tunesmith.data.prepare import cap_test, load_splits, prepare
from tunesmith.data.split import split_indices

LABELS = {"billing": "billing", "outage": "outage"}


def tickets(tmp_path, n=24, dates=None, name="tickets.csv", shuffle=False):
    """A support-ticket CSV: ticket i was opened on day i (``dates`` gives other values), rows in
    file order unless ``shuffle``. Returns the path and the texts, oldest first."""
    texts = [f"ticket {i}: the {'invoice' if i % 2 else 'server'} problem number {i * 7919 % 1000}" for i in range(n)]
    dates = dates or [f"2024-01-{i + 1:02d}T09:{i:02d}:00" for i in range(n)]
    rows = [{"id": i, "opened": dates[i], "text": texts[i], "label": "billing" if i % 2 else "outage"} for i in range(n)]
    if shuffle:
        random.Random(1).shuffle(rows)
    path = tmp_path / name
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "opened", "text", "label"])
        w.writeheader()
        w.writerows(rows)
    return path, texts


def cfg_for(tmp_path, train, **data):
    prep = {"dedup": "none", "split": "ordered", **data.pop("prepare", {})}
    return load_config(data={"name": "t", "task": "classification", "output_dir": str(tmp_path / "runs"),
                             "data": {"train": str(train), "labels": LABELS, "validation_size": 3, **data,
                                      "prepare": prep}})


def texts_of(rows):
    return [r["text"] for r in rows]


def test_split_indices_ordered_takes_the_last_rows_for_test_and_the_ones_before_for_validation():
    assert split_indices(10, validation=2, test=3, ordered=True) == {
        "train": [0, 1, 2, 3, 4], "validation": [5, 6], "test": [7, 8, 9]}
    assert split_indices(10, validation=0.1, test=0, ordered=True, seed=5)["validation"] == [9]  # no draw: no seed
    with pytest.raises(ValueError, match="ordered split .* cannot be stratified or grouped"):
        split_indices(10, ordered=True, labels=["a"] * 10)


def test_ordered_split_in_file_order_holds_out_the_newest_rows_unstratified(tmp_path):
    path, texts = tickets(tmp_path)
    out = prepare(cfg_for(tmp_path, path, prepare={"test_size": 4}), tmp_path / "out")
    assert texts_of(out.splits["test"]) == texts[-4:]
    assert texts_of(out.splits["validation"]) == texts[-7:-4]
    assert texts_of(out.splits["train"]) == texts[:-7]
    split = next(s for s in out.report["steps"] if s["step"] == "split")
    assert split["ordered_by"] == "file order (newest last)" and split["stratified"] is False


def test_order_by_a_date_column_sorts_then_holds_out_the_newest(tmp_path):
    n = 24
    dates = [f"2024-01-{i + 1:02d}T09:00:00" for i in range(n)]
    dates[20] = "Sun, 21 Jan 2024 08:00:00 -0100"  # an e-mail Date: header, 09:00 UTC
    dates[21] = "2024-01-22 09:00"
    dates[23] = "2024-01-24T10:00:00+01:00"  # 09:00 UTC
    path, texts = tickets(tmp_path, n, dates, shuffle=True)
    out = prepare(cfg_for(tmp_path, path, prepare={"test_size": 4, "order_by": "opened"}), tmp_path / "out")
    assert texts_of(out.splits["test"]) == texts[-4:]  # the newest four, oldest first
    assert texts_of(out.splits["validation"]) == texts[-7:-4]
    assert texts_of(out.splits["train"]) == texts[:-7]  # sorted oldest first
    steps = {s["step"]: s for s in out.report["steps"]}
    assert steps["order by opened"]["ranges"] == {"train": ["2024-01-01T09:00:00", "2024-01-24T10:00:00+01:00"]}
    assert steps["split"]["ordered_by"] == "opened"
    assert steps["split"]["ranges"]["test"] == ["Sun, 21 Jan 2024 08:00:00 -0100", "2024-01-24T10:00:00+01:00"]
    assert out.report["notes"][-1] == ("split: ordered by opened: validation and test held out as the newest rows of "
                                       "train; max_*_examples keep each split's newest rows (train 2024-01-01T09:00:00 "
                                       ".. 2024-01-17T09:00:00, validation 2024-01-18T09:00:00 .. 2024-01-20T09:00:00, "
                                       "test Sun, 21 Jan 2024 08:00:00 -0100 .. 2024-01-24T10:00:00+01:00)")


def test_numbers_order_too_and_an_unreadable_value_is_a_bad_row_naming_line_and_field(tmp_path):
    path, texts = tickets(tmp_path, 12, [str(100 - i) for i in range(12)])  # a countdown: the file is newest first
    out = prepare(cfg_for(tmp_path, path, prepare={"test_size": 2, "order_by": "opened"}), tmp_path / "out")
    assert texts_of(out.splits["test"]) == texts[:2][::-1]
    dates = [f"2024-01-{i + 1:02d}" for i in range(12)]
    dates[4] = "05/01/2024"
    path, _ = tickets(tmp_path, 12, dates)
    with pytest.raises(DataError, match=r"tickets.csv:6: field 'opened' \(data.prepare.order_by\) is '05/01/2024'; "
                                        r"expected a number, or a date written as ISO 8601"):
        prepare(cfg_for(tmp_path, path, prepare={"order_by": "opened"}), tmp_path / "out")
    cfg = cfg_for(tmp_path, path, prepare={"order_by": "opened"}, skip_bad_rows=True)
    read = prepare(cfg, tmp_path / "out").report["steps"][0]
    assert (read["rows_in"], read["rows_out"], read["bad_rows_skipped"]) == (12, 11, 1)
    dates[4] = "17"
    path, _ = tickets(tmp_path, 12, dates)
    with pytest.raises(DataError, match=r"tickets.csv:6: field 'opened' \(data.prepare.order_by\): '17' is a number, "
                                        r"but the column holds dates"):
        prepare(cfg_for(tmp_path, path, prepare={"order_by": "opened"}), tmp_path / "out")
    with pytest.raises(DataError, match=r"data.prepare.order_by: no column 'openned' .* \(did you mean 'opened'\?\)"):
        prepare(cfg_for(tmp_path, path, prepare={"order_by": "openned"}), tmp_path / "out")


def test_caps_keep_the_newest_rows_of_an_ordered_split(tmp_path):
    path, texts = tickets(tmp_path, 30)
    cfg = cfg_for(tmp_path, path, prepare={"test_size": 6}, max_train_examples=5, max_validation_examples=2,
                  max_test_examples=3)
    splits = load_splits(cfg, tmp_path / "out")
    assert [e.messages[-2]["content"] for e in splits.train] == texts[16:21]  # the 5 newest of train (0..20)
    assert [e.messages[-2]["content"] for e in splits.validation] == texts[22:24]
    assert [e.messages[-2]["content"] for e in splits.test] == texts[27:30]
    cfg.data.prepare.split = "random"  # a random split still draws train and keeps the first test rows
    random_test = load_splits(cfg, tmp_path / "out2").test
    full = prepare(cfg, tmp_path / "out3").splits["test"]
    assert [e.messages[-2]["content"] for e in random_test] == texts_of(full)[:3]
    assert cap_test([1, 2, 3, 4], 2, ordered=True) == [3, 4] and cap_test([1, 2, 3, 4], 2, ordered=False) == [1, 2]


def test_deduplication_keeps_the_first_time_a_text_was_seen(tmp_path):
    n = 20
    path, texts = tickets(tmp_path, n)
    rows = list(csv.DictReader(path.open()))
    rows[-1]["text"], rows[-1]["label"] = texts[2], rows[2]["label"]  # the newest ticket repeats an old one ...
    rows.insert(0, rows.pop())  # ... and comes first in the file
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = prepare(cfg_for(tmp_path, path, prepare={"test_size": 3, "order_by": "opened", "dedup": "exact"}), tmp_path / "o")
    assert texts[2] in texts_of(out.splits["train"]) and texts[2] not in texts_of(out.splits["test"])
    assert texts_of(out.splits["test"]) == texts[-4:-1]  # the repeat was dropped; the three newest others


def test_a_given_test_file_older_than_training_rows_is_warned_about(tmp_path):
    train, _ = tickets(tmp_path, 20)
    test, _ = tickets(tmp_path, 6, [f"2024-01-{i + 10:02d}" for i in range(6)], name="test.csv")
    out = prepare(cfg_for(tmp_path, train, test=str(test), prepare={"order_by": "opened"}), tmp_path / "o")
    assert len(out.splits["validation"]) == 3 and texts_of(out.splits["validation"])[-1].startswith("ticket 19:")
    assert any(w.startswith("test starts before train ends (opened '2024-01-10'") for w in out.report["warnings"])
    assert out.report["notes"][-1].startswith("split: ordered by opened: validation held out as the newest rows of train")
    later, _ = tickets(tmp_path, 6, [f"2024-02-{i + 1:02d}" for i in range(6)], name="later.csv")
    out = prepare(cfg_for(tmp_path, train, test=str(later), prepare={"order_by": "opened"}), tmp_path / "o2")
    assert not out.report["warnings"]


def test_config_lists_split_problems_with_the_fix():
    with pytest.raises(ConfigError) as e:
        load_config(data={"data": {"train": "x.csv", "prepare": {"split": "orderd", "order_by": "date"}}})
    assert e.value.problems == ["data.prepare.split: 'orderd' is not one of random, ordered; did you mean 'ordered'?",
                                "data.prepare.order_by: orders the rows of an ordered split; set data.prepare.split: "
                                "ordered (or remove it)"]
    with pytest.raises(ConfigError, match="data.prepare.group_by: cannot be combined with split: ordered"):
        load_config(data={"data": {"train": "x.csv", "prepare": {"split": "ordered", "group_by": "user"}}})
