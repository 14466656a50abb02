"""Hyperparameter search: Optuna over the config's search block, on the tiny model."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from tunesmith.cli import main
from tunesmith.config import ConfigError, load_config
from tunesmith.runs import search as S


def search_config(tmp_path: Path, model_dir: Path, sst_files, trials: int = 6) -> Path:
    from test_cli import write_config

    path = write_config(tmp_path, model_dir, sst_files, max_steps=8, eval_every=2)
    cfg = yaml.safe_load(path.read_text())
    cfg["search"] = {"trials": trials, "startup_trials": 2, "seed": 1,
                     "params": {"train.lr": {"low": 1e-5, "high": 0.3, "log": True}, "lora.r": {"choices": [2, 4, 8]}}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def _training_past(run: Path, step: int) -> bool:
    """Whether the trial in ``run`` has a checkpoint and has logged a training step after ``step``."""
    try:
        has_checkpoint = any(p.name.startswith("step-") for p in (run / "checkpoints").iterdir())
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return False
    return has_checkpoint and any(f'"step": {step + 1},' in line and '"type": "train"' in line for line in lines)


def _study(path: Path):
    cfg = load_config(path)
    return optuna.load_study(study_name=cfg.name, storage=f"sqlite:///{S.search_dir(cfg) / 'study.sqlite'}")


@pytest.mark.slow
def test_search_prunes_resumes_after_a_kill_and_its_best_config_reproduces(tmp_path, tiny_model_dir, sst_files, capsys):
    path = search_config(tmp_path, tiny_model_dir, sst_files)
    cfg = load_config(path)
    folder = S.search_dir(cfg)
    # a search killed (SIGKILL) while a trial trains, after that trial's first checkpoint: the first prunable
    # trial (after the 2 startup trials) that trains on past its first validation, i.e. was not pruned there
    # (killing as soon as any checkpoint appeared raced a trial pruned at its first validation)
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith", "search", str(path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline, victim = time.time() + 240, None
    while time.time() < deadline and proc.poll() is None and victim is None:
        victim = next((n for n in range(2, 6) if _training_past(folder / "trials" / f"tiny-trial-{n}", 2)), None)
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    states = {t.number: t.state for t in _study(path).get_trials()}
    assert victim is not None and states.get(victim) == optuna.trial.TrialState.RUNNING, (victim, states)
    assert main(["search", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"resuming trial {victim}" in out and "test split, once" in out.replace("\n", " ")
    trials = _study(path).get_trials()
    assert [t.number for t in trials] == list(range(6))  # none lost, none repeated
    assert trials[0].params == {"train.lr": cfg.train.lr, "lora.r": 4}  # trial 0: the config as written
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 6  # the resumed search drew new settings
    assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in trials)
    assert any(t.state == optuna.trial.TrialState.PRUNED for t in trials), [t.state for t in trials]
    steps = [json.loads(line)["step"] for line in (folder / "trials" / f"tiny-trial-{victim}" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["type"] == "train"]
    assert steps == sorted(set(steps)) and steps[0] == 1  # the resumed trial continued, no step twice
    summary = json.loads((folder / "search.json").read_text())
    best = summary["best"]
    assert best["value"] == min(t.value for t in trials if t.value is not None)
    assert summary["counts"]["complete"] + summary["counts"]["pruned"] == 6 and best["test"]["metric"] == "accuracy"
    assert (Path(best["run_dir"]) / "eval.json").is_file()  # the best trial, and only it, met the test split
    assert sum((folder / "trials" / f"tiny-trial-{n}" / "eval.json").exists() for n in range(6)) == 1
    html = (folder / "search.html").read_text()
    assert html.count("data:image/png;base64,") >= 2 and "trials.csv" not in html
    assert len((folder / "trials.csv").read_text().splitlines()) == 7
    # the best config is an ordinary config whose run gives the trial's validation loss again
    best_cfg = load_config(best["config"])
    assert best_cfg.name == "tiny-best" and best_cfg.train.lr == pytest.approx(best["params"]["train.lr"])
    assert best_cfg.search.params == {}  # training it does not start another search
    assert main(["train", best["config"]]) == 0
    again = json.loads((best_cfg.run_dir / "train_result.json").read_text())["best_val_loss"]
    assert again == pytest.approx(best["value"], rel=1e-6)


def test_search_config_problems_are_listed_at_once(tmp_path, tiny_model_dir, sst_files, capsys):
    path = search_config(tmp_path, tiny_model_dir, sst_files)
    cfg = yaml.safe_load(path.read_text())
    cfg["search"]["params"] = {"train.lrr": {"low": 1e-5, "high": 1e-3}, "lora.r": {"low": 8, "high": 4},
                               "train.batch_size": {"low": 2.5, "high": 8},
                               "train.weight_decay": {"low": 0, "high": 0.1, "log": True}}
    path.write_text(yaml.safe_dump(cfg))
    assert main(["search", str(path)]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'train.lr'" in err and "low (8) must be below high (4)" in err and "log scale needs low > 0" in err
    assert "train.batch_size is a whole number" in err
    cfg["search"]["params"] = {}
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="name at least one setting"):
        S.search(path)


def test_trials_get_integer_and_log_values(tmp_path, tiny_model_dir, sst_files):
    path = search_config(tmp_path, tiny_model_dir, sst_files)
    raw = yaml.safe_load(path.read_text())
    raw["search"]["params"]["lora.r"] = {"low": 2, "high": 16}
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        t = study.ask()
        r = S._suggest(t, "lora.r", cfg.search.params["lora.r"], 16)
        lr = S._suggest(t, "train.lr", cfg.search.params["train.lr"], 1e-3)
        assert isinstance(r, int) and 2 <= r <= 16 and 1e-5 <= lr <= 0.3
        tcfg = S.trial_config(path, [], t.params, cfg, t.number)
        assert tcfg.lora.r == r and tcfg.train.lr == pytest.approx(lr) and tcfg.name == f"tiny-trial-{t.number}"
        study.tell(t, 0.0)
