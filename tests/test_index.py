"""The run index: rows from run folders, concurrent writers, rebuild, filters, diff, the CLI."""

import json
import multiprocessing
from pathlib import Path

import pytest
import yaml

from tunesmith.cli import main
from tunesmith.runs import index


def fake_run(root: Path, name: str, method: str = "lora", lr: float = 1e-4, accuracy: float | None = 0.8,
             seconds: float = 12.0, created: str = "2026-11-30T10:00:00+00:00", price: float = 0.0) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"name": name, "model": "default", "method": method,
                                                     "task": "classification", "data": {"train": "/d/sst2.tsv"},
                                                     "train": {"lr": lr}, "estimate": {"price_per_hour": price}}))
    (run / "run.json").write_text(json.dumps({"created": created}))
    (run / "metrics.jsonl").write_text(json.dumps({"type": "train", "step": 1, "tokens": 300, "step_seconds": 0.5}) + "\n"
                                       + json.dumps({"type": "train", "step": 2, "tokens": 100, "step_seconds": 0.5}) + "\n")
    (run / "train_result.json").write_text(json.dumps({"steps": 2, "train_seconds": seconds, "target_tokens": 40,
                                                       "interrupted": False}))
    if accuracy is not None:
        (run / "eval.json").write_text(json.dumps({"metric": "accuracy", "base": {"accuracy": 0.5},
                                                   "tuned": {"accuracy": accuracy, "ci": {"accuracy": [accuracy - 0.1, accuracy + 0.05]}}}))
    return run


def test_a_row_says_what_the_folder_holds(tmp_path):
    run = fake_run(tmp_path, "a", price=3.6)
    row = index.row_from_folder(run)
    assert row["status"] == "evaluated" and row["method"] == "lora" and row["data"] == "/d/sst2.tsv"
    assert (row["metric"], row["value"], row["low"], row["high"], row["base_value"]) == ("accuracy", 0.8, pytest.approx(0.7), pytest.approx(0.85), 0.5)
    assert row["tokens_per_s"] == pytest.approx(400.0)  # 400 tokens in 1.0 s of steps
    assert row["cost"] == pytest.approx(12 / 3600 * 3.6) and row["created"] == "2026-11-30T10:00:00+00:00"
    (run / "eval.json").unlink()
    assert index.row_from_folder(run)["status"] == "trained"
    (run / "train_result.json").write_text(json.dumps({"interrupted": True, "train_seconds": 3}))
    assert index.row_from_folder(run)["status"] == "interrupted"
    assert index.row_from_folder(tmp_path) is None  # not a run folder


def _write_many(args: tuple[str, str, int]) -> None:
    db, root, n = args
    for i in range(n):
        index.record(Path(root) / f"r{i}", Path(db))


def test_two_processes_writing_at_once_lose_no_row(tmp_path):
    roots = [tmp_path / "one", tmp_path / "two"]
    for root in roots:
        for i in range(60):
            fake_run(root, f"r{i}")
    db = tmp_path / "index.sqlite"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_many, args=((str(db), str(root), 60),)) for root in roots]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    rows = index.list_runs(path=db)
    assert len(rows) == 120 and len({r["path"] for r in rows}) == 120


def test_rebuild_gives_the_live_index(tmp_path):
    live, rebuilt = tmp_path / "live.sqlite", tmp_path / "rebuilt.sqlite"
    runs = [fake_run(tmp_path / "runs", "a"), fake_run(tmp_path / "runs", "b", method="full", accuracy=None),
            fake_run(tmp_path / "elsewhere" / "deep", "c")]
    for run in runs:
        index.record(run, live)
    index.record(tmp_path / "runs" / "b", live)  # recorded twice: still one row
    assert index.rebuild([tmp_path], rebuilt) == 3
    assert index.list_runs(path=rebuilt) == index.list_runs(path=live)
    (tmp_path / "runs" / "a" / "eval.json").unlink()  # a folder changed behind the index's back
    assert index.rebuild(None, live) == 3  # default roots: the folders of the indexed runs
    assert index.find(str(runs[0]), live)["status"] == "trained"


def test_filters_sorts_and_diff(tmp_path):
    db = tmp_path / "i.sqlite"
    index.record(fake_run(tmp_path, "old", accuracy=0.9, created="2026-10-01T00:00:00+00:00"), db)
    index.record(fake_run(tmp_path, "new", method="full", lr=2e-5, accuracy=0.7, created="2026-11-30T00:00:00+00:00"), db)
    index.record(fake_run(tmp_path, "none", accuracy=None, created="2026-11-29T00:00:00+00:00"), db)
    assert [r["name"] for r in index.list_runs(path=db)] == ["new", "none", "old"]
    assert [r["name"] for r in index.list_runs(sort="metric", path=db)] == ["old", "new", "none"]  # no metric: last
    assert [r["name"] for r in index.list_runs(method="full", path=db)] == ["new"]
    assert [r["name"] for r in index.list_runs(since="2026-11-01", path=db)] == ["new", "none"]
    with pytest.raises(ValueError, match="not a date"):
        index.list_runs(since="yesterday", path=db)
    with pytest.raises(ValueError, match="date, metric"):
        index.list_runs(sort="speed", path=db)
    d = index.diff_runs(index.find("old", db), index.find("new", db))
    assert d["config"] == {"method": ("lora", "full"), "name": ("old", "new"), "train.lr": (1e-4, 2e-5)}
    assert d["results"]["eval.tuned.accuracy"] == (0.9, 0.7)
    with pytest.raises(KeyError, match="no run named"):
        index.find("nope", db)


def test_training_lists_the_run_and_the_cli_shows_it(tmp_path, tiny_model_dir, sst_files, capsys, run_index):
    from test_cli import write_config

    path = write_config(tmp_path, tiny_model_dir, sst_files)
    assert main(["train", str(path), "--set", "name=indexed-a", "--set", "train.lr=1e-3"]) == 0
    assert main(["train", str(path), "--set", "name=indexed-b", "--set", "method=full", "--set", "train.lr=1e-4"]) == 0
    capsys.readouterr()
    row = index.find("indexed-a")
    assert row["status"] == "evaluated" and row["metric"] == "accuracy" and row["low"] <= row["value"] <= row["high"]
    assert row["train_seconds"] > 0 and row["tokens_per_s"] > 0 and row["path"] == str((tmp_path / "runs" / "indexed-a").resolve())
    assert main(["eval", str(tmp_path / "runs" / "indexed-a")]) == 0  # a second evaluation, alone: still evaluated
    assert index.find("indexed-a")["status"] == "evaluated"
    capsys.readouterr()
    assert main(["runs", "--name", "indexed-", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in listed] == ["indexed-b", "indexed-a"]
    assert main(["runs", "--method", "full", "--name", "indexed-"]) == 0
    out = capsys.readouterr().out
    assert "indexed-b" in out and "indexed-a" not in out.split("index:")[0].replace("indexed-b", "")
    assert main(["runs", "--diff", "indexed-a", "indexed-b"]) == 0
    out = capsys.readouterr().out
    assert "method" in out and "train.lr" in out and "0.001" in out
    before = index.list_runs()
    assert main(["runs", "--rebuild", str(tmp_path / "runs")]) == 0
    assert [r for r in index.list_runs() if r["name"].startswith("indexed-")] == [r for r in before if r["name"].startswith("indexed-")]
    assert main(["runs", "--since", "last week"]) == 2
    assert "not a date" in capsys.readouterr().err
    assert main(["runs", "--method", "qlora"]) == 2
    assert "unknown method 'qlora'" in capsys.readouterr().err
    assert main(["runs", "--since", "2999-01-01"]) == 0
    assert "no run matches" in capsys.readouterr().out.replace("\n", " ")
    assert main(["runs", "--diff", "indexed-a", "indexed-b", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["method"] == ["lora", "full"]
