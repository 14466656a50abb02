"""`tunesmith prepare` end to end: real SMS spam data, and the CLI verb on a crafted file."""

import json
from pathlib import Path

import yaml

from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.data.prepare import content_hash, prepare

SMS = Path(__file__).parents[1] / "examples" / "data" / "sms_spam" / "SMSSpamCollection"


def test_sms_spam_duplicates_found_and_stratified_split(tmp_path):
    cfg = load_config(data={"name": "sms", "task": "classification", "output_dir": str(tmp_path),
                            "data": {"train": str(SMS), "labels": {"ham": "ham", "spam": "spam"}, "validation_size": 0.1,
                                     "prepare": {"test_size": 0.1, "pii": ["email", "phone", "url"]}}})
    said = []
    out = prepare(cfg, tmp_path / "data", say=said.append)  # each step said as it ends: visible in a log too
    assert [line.split(":")[1].strip() for line in said] == [s["step"] for s in out.report["steps"]]
    assert said[0].startswith("prepare: read train: ") and said[0].endswith(" s")
    dedup = out.report["dedup"]["train"]
    assert dedup["exact_removed"] > 350 and dedup["near_removed"] > 20  # the collection repeats many messages
    sizes = {s: len(rows) for s, rows in out.splits.items()}
    assert sum(sizes.values()) == 5574 - dedup["exact_removed"] - dedup["near_removed"]
    shares = {s: sum(r["label"] == "spam" for r in rows) / len(rows) for s, rows in out.splits.items()}
    assert max(shares.values()) - min(shares.values()) < 0.01, shares
    steps = {s["step"]: s for s in out.report["steps"]}
    assert steps["redact PII"]["counts"]["url"] > 50
    assert "[URL]" in (tmp_path / "data" / "train.jsonl").read_text()
    for split in ("train", "validation", "test"):
        first = json.loads((tmp_path / "data" / f"{split}.jsonl").read_text().splitlines()[0])
        assert set(first) == {"text", "label", "_source"}
    assert json.loads((tmp_path / "data" / "data_report.json").read_text())["content_hash"] == content_hash(cfg)


def test_prepare_verb_cleans_dedups_and_reports_leakage(tmp_path, tiny_model_dir, capsys):
    train = tmp_path / "train.jsonl"
    rows = [{"text": f"review number {i} was rather good and fun", "label": "1"} for i in range(20)]
    rows += [{"text": "caf\u00c3\u00a9 <b>was</b> bad<|endoftext|>", "label": "0"}] * 3  # mojibake, HTML, junk, dup
    rows.append({"text": "the held out test sentence appears in train too", "label": "0"})
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    test = tmp_path / "test.jsonl"
    test.write_text(json.dumps({"text": "The held out test sentence appears in train too!", "label": "0"}) + "\n")
    cfg = {"name": "p", "model": str(tiny_model_dir), "task": "classification", "output_dir": str(tmp_path / "runs"),
           "data": {"train": str(train), "test": str(test), "labels": {"0": "negative", "1": "positive"},
                    "validation_size": 2}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["prepare", str(path)]) == 0
    out = tmp_path / "runs" / "p" / "data"
    report = json.loads((out / "data_report.json").read_text())
    steps = {s["step"]: s for s in report["steps"]}
    assert steps["de-duplicate train"]["exact_removed"] == 2
    assert report["dedup"]["leakage_removed"] == 1
    texts = [json.loads(line)["text"] for line in (out / "train.jsonl").read_text().splitlines()]
    texts += [json.loads(line)["text"] for line in (out / "validation.jsonl").read_text().splitlines()]
    assert "café was bad" in texts and not any("appears in train" in t for t in texts)
    assert "data preparation" in capsys.readouterr().out


def test_prepare_config_errors_are_listed(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("data: {train: x, prepare: {dedup: fuzzy, pii: [emails], dedup_treshold: 0.9}}\n")
    assert main(["prepare", str(path)]) == 2
    err = capsys.readouterr().err
    assert "data.prepare.dedup: 'fuzzy'" in err and "unknown kind(s) ['emails']" in err
    assert "did you mean 'data.prepare.dedup_threshold'" in err


EXAMPLES = Path(__file__).parents[1] / "examples"


def test_weak_labels_from_the_shipped_functions_with_gold_accuracy(tmp_path):
    cfg = load_config(EXAMPLES / "sms_spam_weak.yaml", [f"output_dir={tmp_path}"])
    out = prepare(cfg, tmp_path / "data")
    steps = {s["step"]: s for s in out.report["steps"]}
    weak = steps["weak labels (train)"]
    assert weak["gold_rows"] == len(out.splits["train"]) + weak["uncovered_dropped"]
    assert 0.5 < weak["weak_labeled"] / weak["gold_rows"] < 0.9  # the functions cover most rows, not all
    names = {f["name"]: f for f in weak["functions"]}
    assert names["long_phone_number"]["accuracy"] > 0.95 and 0 < names["long_phone_number"]["coverage"] < 0.2
    assert weak["gold_eval"]  # label model vs majority vote on the gold slice
    agree = sum(r["label"] == r["gold_label"] for r in out.splits["train"]) / len(out.splits["train"])
    assert agree > 0.93
    assert all("gold_label" not in r for r in out.splits["test"])  # the test split keeps its gold labels
    assert "test keeps gold labels only" in steps


REAL = [  # config overrides that prepare each shipped data set with auto-detection
    ("sst2/stsa.binary.train", "classification", {"0": "negative", "1": "positive"}),
    ("trec/TREC.train.all", "classification", {str(i): str(i) for i in range(6)}),
    ("sms_spam/SMSSpamCollection", "classification", {"ham": "ham", "spam": "spam"}),
    ("bitext/customer_support.csv", "instruction", {}),
    ("alpaca/alpaca_en_demo.json", "instruction", {}),
    ("samsum/samsum_200.jsonl", "instruction", {}),
    ("general/wiki_30_articles.txt", "text", {}),
]


def test_prepare_every_shipped_data_set(tmp_path, tokenizer):
    for name, task, labels in REAL:
        cfg = load_config(data={"name": name.split("/")[0], "task": task, "output_dir": str(tmp_path),
                                "data": {"train": str(EXAMPLES / "data" / name), "labels": labels, "validation_size": 0.1,
                                         "prepare": {"test_size": 0.1}}})
        out = prepare(cfg, tmp_path / name.split("/")[0], tokenizer)
        assert {"train", "validation", "test"} <= out.splits.keys(), name
        assert all(out.splits[s] for s in ("train", "validation", "test")), name
        assert out.report["splits"]["train"]["token_lengths"], name
        texts = [v for r in out.splits["train"] for k, v in r.items() if isinstance(v, str) and k != "_source"]
        assert not any("<|endoftext|>" in t or "\r" in t for t in texts), name  # junk markers and CR line ends cleaned


def test_group_by_keeps_each_group_in_one_split(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"text": f"message {i} from speaker {i % 7} about topic {i * 13 % 31}", "label": str(i % 2), "speaker": f"s{i % 7}"}
            for i in range(140)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(data={"name": "g", "task": "classification", "output_dir": str(tmp_path),
                            "data": {"train": str(path), "labels": {"0": "a", "1": "b"}, "validation_size": 0.2,
                                     "prepare": {"group_by": "speaker", "test_size": 0.2, "dedup": "none"}}})
    out = prepare(cfg, tmp_path / "data")
    owner = {}
    for split, recs in out.splits.items():
        for r in recs:
            assert owner.setdefault(r["_group"], split) == split, r["_group"]
    assert len(set(owner.values())) == 3
    bad = load_config(data={"name": "g", "task": "classification", "output_dir": str(tmp_path),
                            "data": {"train": str(path), "labels": {"0": "a", "1": "b"}, "prepare": {"group_by": "author"}}})
    import pytest

    from tunesmith.data import DataError

    with pytest.raises(DataError, match=r"data.prepare.group_by: no column 'author' in .*d.jsonl"):
        prepare(bad, tmp_path / "data2")
