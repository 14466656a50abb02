"""Multi-task learning (tasks:, mixing:) and continual learning (model: runs/X) on tiny random models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from conftest import SST_LINES
from tunesmith.config import ConfigError, load_config, save_config
from tunesmith.data.mix import mix
from tunesmith.io import read_jsonl
from tunesmith.runs import finetune, macro_average

LABELS = {"0": "negative", "1": "positive"}


def _write(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def _sst_config(folder: Path) -> Path:
    """A single-task SST-shaped config in ``folder`` whose data paths are relative to it."""
    (folder / "data").mkdir(parents=True, exist_ok=True)
    (folder / "data" / "train.txt").write_text("\n".join(SST_LINES * 4) + "\n")
    (folder / "data" / "test.txt").write_text("\n".join(SST_LINES[:6]) + "\n")
    return _write(folder / "sst.yaml", {"name": "sst", "task": "classification",
                                        "data": {"train": "data/train.txt", "test": "data/test.txt", "labels": LABELS,
                                                 "validation_size": 4, "system_prompt": "Sentiment?",
                                                 "prepare": {"dedup": "none"}},  # the lines repeat on purpose
                                        "eval": {"metric": "f1"}})


# ---------------------------------------------------------------- config


def test_tasks_from_config_files_and_inline(tmp_path):
    single = _sst_config(tmp_path / "single")
    (tmp_path / "multi").mkdir()
    (tmp_path / "multi" / "inst.json").write_text(json.dumps([{"instruction": "hi", "output": "hello"}] * 8))
    path = _write(tmp_path / "multi" / "both.yaml", {"name": "both", "tasks": [
        {"name": "sst", "config": "../single/sst.yaml", "weight": 2, "data": {"max_train_examples": 5}},
        {"name": "inst", "task": "instruction", "data": {"train": "inst.json"}, "metric": "rougeL"}]})
    cfg = load_config(path)
    sst, inst = cfg.tasks
    # from the file: task, metric, labels, system prompt; its paths resolved against its own folder
    assert (sst.task, sst.metric, sst.data.labels, sst.data.system_prompt) == ("classification", "f1", LABELS, "Sentiment?")
    assert sst.data.train == str((tmp_path / "single" / "data" / "train.txt").resolve())
    assert sst.data.max_train_examples == 5 and sst.weight == 2  # the entry's own keys win, data merged key by key
    assert sst.config == str(single.resolve())
    # inline: its data relative to the multi-task config's folder
    assert inst.data.train == str((tmp_path / "multi" / "inst.json").resolve()) and inst.metric == "rougeL"
    # the saved run config reloads to the same tasks, even once the task's file is gone
    save_config(cfg, tmp_path / "saved.yaml")
    single.unlink()
    again = load_config(tmp_path / "saved.yaml")
    assert again.tasks == cfg.tasks


def test_task_problems_are_reported_at_once_with_their_index(tmp_path):
    _sst_config(tmp_path)
    _write(tmp_path / "bad.yaml", {"task": "classification", "data": {"train": "x.txt"}, "train": {"lr": -1}})
    path = _write(tmp_path / "multi.yaml", {"name": "m", "data": {"train": "top.txt"}, "tasks": [
        {"name": "a", "config": "missing.yaml"},
        {"name": "b", "task": "classification", "data": {"train": "t.txt"}},  # no labels
        {"name": "c", "config": "bad.yaml"},
        {"name": "a", "task": "instruction", "data": {"train": "t.txt"}, "metric": "accuracy", "weight": 0},
        {"name": "e", "task": "chat"}]})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = "\n".join(err.value.problems)
    assert "tasks[0].config: file not found" in text
    assert "tasks[1].data.labels: required for classification" in text
    assert "tasks[2].config (bad.yaml): data.labels: required" in text and "tasks[2].config (bad.yaml): train.lr" in text
    assert "tasks[3].metric: 'accuracy' is not measured for task instruction" in text
    assert "tasks[3].weight: must be > 0" in text
    assert "tasks[4]: give config:" in text
    assert "tasks: names must differ (a repeated)" in text
    assert any(p.startswith("data: a multi-task run") for p in err.value.problems)  # the top-level data is unused


# ---------------------------------------------------------------- mixing


@pytest.mark.parametrize("by,expected", [
    ("weight", {"a": 1 / 4, "b": 2 / 4, "c": 1 / 4}),
    ("size", {"a": 100 / 1137, "b": 1000 / 1137, "c": 37 / 1137}),
    ("temperature", {n: s ** 0.5 / (100 ** 0.5 + 1000 ** 0.5 + 37 ** 0.5) for n, s in (("a", 100), ("b", 1000), ("c", 37))}),
])
def test_mixing_shares_hold_within_one_percent(by, expected):
    rows = {"a": [("a", i) for i in range(100)], "b": [("b", i) for i in range(1000)], "c": [("c", i) for i in range(37)]}
    mixed, report = mix(rows, {"a": 1.0, "b": 2.0, "c": 1.0}, by=by, temperature=2.0, seed=3)
    assert len(mixed) == 1137 == report["rows"]
    for name, share in expected.items():
        got = sum(r[0] == name for r in mixed) / len(mixed)
        assert got == pytest.approx(share, abs=0.01) and report["tasks"][name]["share"] == pytest.approx(got)
        assert report["tasks"][name]["target_share"] == pytest.approx(share)
    # a small task is repeated whole (every row at least floor(repeats) times), a large one subsampled without repeats
    counts = {r: mixed.count(r) for r in set(mixed)}
    if by == "weight":
        assert min(counts[("c", i)] for i in range(37)) == int(report["tasks"]["c"]["repeats"]) >= 7
        assert max(counts.get(("b", i), 0) for i in range(1000)) == 1
    assert mix(rows, {"a": 1.0, "b": 2.0, "c": 1.0}, by=by, seed=3)[0] == mixed  # deterministic in the seed
    assert by == "size" or mix(rows, {"a": 1.0, "b": 2.0, "c": 1.0}, by=by, seed=4)[0] != mixed


def test_macro_average_is_the_mean_of_the_headline_metrics():
    tasks = {"a": {"metric": "accuracy", "base": {"accuracy": 0.5}, "tuned": {"accuracy": 0.9, "f1": 0.1}},
             "b": {"metric": "f1", "base": {"f1": 0.2}, "tuned": {"f1": 0.4, "accuracy": 1.0}}}
    out = macro_average(tasks)
    assert out["tuned"] == {"macro": pytest.approx(0.65)} and out["base"] == {"macro": pytest.approx(0.35)}
    assert out["macro"]["change"] == pytest.approx(0.3) and out["macro"]["metrics"] == {"a": "accuracy", "b": "f1"}


@pytest.mark.parametrize("metrics", [("accuracy", "f1"), ("accuracy", "perplexity"), ("f1", "f1")])
def test_the_macro_table_warns_when_it_mixes_metrics(metrics):
    from io import StringIO

    from rich.console import Console

    from tunesmith.runs import print_macro

    tasks = {n: {"metric": m, "base": {m: 0.5}, "tuned": {m: 0.6}} for n, m in zip("ab", metrics)}
    out = StringIO()
    print_macro({"tasks": tasks, "macro": {"base": 0.5, "tuned": 0.6}}, Console(file=out, width=400))
    said = out.getvalue()
    assert ("mixes different metrics" in said) == (metrics[0] != metrics[1])
    assert ("their mean means nothing" in said) == ("perplexity" in metrics)


# ---------------------------------------------------------------- end to end


def test_multitask_finetune_end_to_end(tmp_path, tiny_model_dir):
    single = _sst_config(tmp_path)
    (tmp_path / "inst.json").write_text(json.dumps(
        [{"instruction": f"Say hello {i}", "output": f"hello {i} !"} for i in range(16)]))
    path = _write(tmp_path / "multi.yaml", {
        "name": "multi", "model": str(tiny_model_dir), "output_dir": str(tmp_path / "runs"), "method": "lora",
        "tasks": [{"name": "sst", "config": single.name},
                  {"name": "inst", "task": "instruction", "data": {"train": "inst.json", "validation_size": 3,
                                                                   "prepare": {"test_size": 3}}}],
        "mixing": {"by": "weight"}, "lora": {"r": 4, "alpha": 8},
        "train": {"max_steps": 3, "batch_size": 4, "lr": 5e-2, "eval_every": 1, "precision": "fp32"},
        "eval": {"max_new_tokens": 4, "latency_examples": 0, "bootstrap_resamples": 100, "general": "none"}})
    console = Console(record=True, width=200)
    run = finetune(load_config(path), console=console)
    d = run.dir
    said = console.export_text()
    assert "macro average over the tasks" in said and "layout text_label" in said  # each task's format lines too
    assert (d / "data" / "sst" / "train.jsonl").is_file() and (d / "data" / "inst" / "train.jsonl").is_file()
    mixing = json.loads((d / "data_report.json").read_text())["mixing"]
    assert mixing["tasks"]["sst"]["share"] == pytest.approx(0.5, abs=0.02)
    evals = [r for r in read_jsonl(d / "metrics.jsonl") if r["type"] == "eval"]
    assert len(evals) == 3
    for r in evals:  # per-task validation losses; the validation loss (best, early stopping) is their macro average
        assert set(r["task_val_loss"]) == {"sst", "inst"}
        assert r["val_loss"] == pytest.approx(sum(r["task_val_loss"].values()) / 2)
    best = min(evals, key=lambda r: r["val_loss"])
    assert json.loads((d / "train_result.json").read_text())["best_step"] == best["step"]
    ev = json.loads((d / "eval.json").read_text())
    assert set(ev["tasks"]) == {"sst", "inst"}
    sst, inst = ev["tasks"]["sst"], ev["tasks"]["inst"]
    assert (sst["task"], sst["metric"], sst["label_words"]) == ("classification", "f1", LABELS)
    assert (inst["task"], inst["metric"]) == ("instruction", "rougeL")
    for r in (sst, inst):
        assert r["metric"] in r["base"] and r["metric"] in r["tuned"] and "tuned_vs_base" in r
    assert ev["macro"]["tuned"] == pytest.approx((sst["tuned"]["f1"] + inst["tuned"]["rougeL"]) / 2)
    assert ev["tuned"]["macro"] == ev["macro"]["tuned"] and ev["metric"] == "macro"
    assert ev["test_examples"] == sst["test_examples"] + inst["test_examples"] == 6 + 3
    assert len(read_jsonl(d / "predictions" / "sst.jsonl")) == 6 and len(read_jsonl(d / "predictions" / "inst.jsonl")) == 3
    page = (d / "report.html").read_text()
    assert "<h2>Tasks</h2>" in page and "macro average" in page and "Task mixing" in page and "Data: inst" in page
    from tunesmith.deploy.export import export

    card = (export(d, "adapter", out=tmp_path / "a").path / "README.md").read_text()  # each task's data and results
    assert "- tasks: sst, inst (multi-task); method: lora" in card
    assert "inst.json` (rows used of those prepared: train 10 of 10, validation 3 of 3, test 3 of 3)" in card
    assert "test 6 of 6" in card and "### sst (6 test examples)" in card and "### inst (3 test examples)" in card


def test_prepare_and_compare_with_a_multitask_config(tmp_path, tiny_model_dir):
    from tunesmith.runs.compare import compare_methods
    from tunesmith.runs import RunError, prepare_data

    single = _sst_config(tmp_path)
    path = _write(tmp_path / "multi.yaml", {"name": "multi", "model": str(tiny_model_dir), "output_dir": str(tmp_path / "runs"),
                                            "tasks": [{"name": "a", "config": single.name}, {"name": "b", "config": single.name}]})
    cfg = load_config(path)
    done = prepare_data(cfg, console=Console(record=True))
    assert set(done) == {"a", "b"}
    report = json.loads((cfg.run_dir / "data_report.json").read_text())
    assert set(report["tasks"]) == {"a", "b"}
    assert (cfg.run_dir / "data" / "a" / "train.jsonl").read_text() == (cfg.run_dir / "data" / "b" / "train.jsonl").read_text()
    with pytest.raises(RunError, match="single-task runs"):
        compare_methods(cfg, ["lora"])


def test_continual_run_tests_the_earlier_task(tmp_path, finished_runs, sst_files, monkeypatch):
    monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path / "home"))
    earlier = finished_runs["alpha-lora"]  # a tiny instruction LoRA run, fp32
    path = _write(tmp_path / "next.yaml", {
        "name": "next", "model": str(earlier), "task": "classification", "output_dir": str(tmp_path / "runs"),
        "data": {"train": str(sst_files["train"]), "test": str(sst_files["test"]), "labels": LABELS, "validation_size": 4,
                 "prepare": {"dedup": "none"}},
        "lora": {"r": 4, "alpha": 8},
        "train": {"max_steps": 3, "batch_size": 4, "lr": 5e-2, "precision": "fp32"},
        "eval": {"max_new_tokens": 4, "latency_examples": 0, "bootstrap_resamples": 100, "general": "none"}})
    console = Console(record=True, width=200)
    run = finetune(load_config(path), console=console)
    assert "earlier task alpha-lora: rougeL " in console.export_text()  # then and now, on the console too
    merged = list((tmp_path / "home" / "runs").iterdir())  # the earlier adapter merged once, cached
    assert len(merged) == 1 and (merged[0] / "config.json").is_file() and (merged[0] / "tunesmith_source.json").is_file()
    ev = json.loads((run.dir / "eval.json").read_text())
    assert ev["task"] == "classification" and "accuracy" in ev["tuned"]  # the single-task shape, unchanged
    prev = ev["previous_tasks"]["alpha-lora"]
    own = json.loads((earlier / "eval.json").read_text())
    assert prev["metric"] == "rougeL" and prev["earlier"]["tuned"] == own["tuned"]["rougeL"]
    # the start model here is the earlier run's model: on its own test split it scores what that run reported
    assert prev["base"]["rougeL"] == pytest.approx(own["tuned"]["rougeL"], abs=1e-6)
    assert prev["base"]["perplexity"] == pytest.approx(own["tuned"]["perplexity"], rel=1e-4)
    assert prev["drop"] == pytest.approx(own["tuned"]["rougeL"] - prev["tuned"]["rougeL"])
    assert len(read_jsonl(run.dir / "predictions" / "previous-alpha-lora.jsonl")) == prev["test_examples"]
    assert "Earlier tasks" in (run.dir / "report.html").read_text()
    # eval.previous_tasks: false leaves them out
    cfg = load_config(path, ["name=next2", "eval.previous_tasks=false"])
    assert "previous_tasks" not in finetune(cfg).eval


def test_a_run_folder_as_model(finished_runs, tmp_path, monkeypatch):
    from tunesmith.models import ModelError, load_tokenizer, model_folder, resolve_model

    monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path))
    full = finished_runs["gamma-full"]
    assert resolve_model(str(full)).kind == "run" and model_folder(str(full)) == str(full / "model")  # no copy
    assert load_tokenizer(str(finished_runs["alpha-lora"])).chat_template  # from the adapter folder, no merge
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ModelError, match="prompt run trained no weights"):
        model_folder(str(finished_runs["delta-prompt"]))
