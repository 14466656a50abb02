"""Every CLI verb end to end on a tiny model, asserting the files it must produce."""

import json
from pathlib import Path

import pytest
import yaml

from tunesmith.cli import main

RUN_FILES = ["config.yaml", "data_report.json", "metrics.jsonl", "train_result.json", "eval.json", "report.html"]


def write_config(tmp_path: Path, model_dir: Path, sst_files, **train) -> Path:
    cfg = {
        "name": "tiny", "model": str(model_dir), "task": "classification", "method": "lora",
        "output_dir": str(tmp_path / "runs"),
        "data": {"train": str(sst_files["train"]), "test": str(sst_files["test"]), "validation_size": 4,
                 "labels": {"0": "negative", "1": "positive"}, "system_prompt": "Classify.",
                 "prepare": {"dedup": "none"}},  # the fixture repeats its lines (and test lines) on purpose
        "lora": {"r": 4, "alpha": 8},
        "train": {"max_steps": 4, "batch_size": 4, "eval_every": 2, "precision": "fp32", **train},
        "eval": {"batch_size": 8},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_then_eval(tmp_path, tiny_model_dir, sst_files, capsys):
    path = write_config(tmp_path, tiny_model_dir, sst_files)
    assert main(["train", str(path), "--set", "train.lr=1e-3"]) == 0
    run = tmp_path / "runs" / "tiny"
    for name in RUN_FILES:
        assert (run / name).is_file(), name
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "adapter" / "tokenizer.json").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best", "step-2", "step-4"]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["lr"] == 1e-3 and saved["lora"]["r"] == 4
    ev = json.loads((run / "eval.json").read_text())
    assert ev["test_examples"] == 6
    for side in ("base", "tuned"):
        assert {"accuracy", "f1", "precision", "recall", "loss", "perplexity"} <= ev[side].keys()
    html = (run / "report.html").read_text()
    assert "data:image/png;base64," in html and "Base vs tuned" in html
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m["type"] == "train"] == [1, 2, 3, 4]
    assert metrics[0]["lr"] == pytest.approx(1e-3)  # the rate step 1 used (no warmup: the full rate), not step 2's
    assert "base vs tuned on 6 test examples" in capsys.readouterr().out

    (run / "eval.json").unlink()
    assert main(["eval", str(run)]) == 0
    again = json.loads((run / "eval.json").read_text())["tuned"]
    timing = {"seconds", "examples_per_s", "tokens_per_s", "latency"}
    lat = ev["tuned"]["latency"]
    assert lat["examples"] == 6 and 0 < lat["median_ms"] <= lat["p95_ms"] and ev["tuned"]["tokens_per_s"] > 0
    assert {k: v for k, v in again.items() if k not in timing} == {k: v for k, v in ev["tuned"].items() if k not in timing}
    # evaluation settings can change for one evaluation; anything else is refused, naming it
    assert main(["eval", str(run), "--set", "eval.general=none", "--set", "eval.bootstrap_resamples=100"]) == 0
    once = json.loads((run / "eval.json").read_text())
    assert once["eval_overrides"] == ["eval.general=none", "eval.bootstrap_resamples=100"]
    assert once["forgetting"]["note"].startswith("measured by an earlier evaluation")  # not wiped
    assert once["forgetting"]["tuned"] == ev["forgetting"]["tuned"]
    assert main(["eval", str(run), "--set", "data.max_test_examples=3"]) == 0  # how much of the test split: allowed
    assert json.loads((run / "eval.json").read_text())["test_examples"] == 3
    assert yaml.safe_load((run / "config.yaml").read_text())["eval"]["general"] == "general"  # the run's config unchanged
    assert main(["eval", str(run), "--set", "train.lr=1"]) == 2
    err = capsys.readouterr().err
    assert "evaluation settings only" in err and "not train.lr=1" in err

    # the same name again is refused rather than silently overwritten
    assert main(["train", str(path)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    # --resume on a finished run: nothing left to train, artifacts rewritten, still exit 0
    assert main(["train", str(path), "--resume", "--set", "train.lr=1e-3"]) == 0


def test_full_fine_tuning_run(tmp_path, tiny_model_dir, sst_files):
    path = write_config(tmp_path, tiny_model_dir, sst_files)
    assert main(["train", str(path), "--set", "method=full", "--set", "name=tiny-full"]) == 0
    run = tmp_path / "runs" / "tiny-full"
    assert (run / "model" / "model.safetensors").is_file() and (run / "model" / "config.json").is_file()
    assert json.loads((run / "eval.json").read_text())["tuned"]["accuracy"] >= 0


def test_generation_task_reports_rouge(tmp_path, tiny_model_dir, instruction_file):
    cfg = {"name": "gen", "model": str(tiny_model_dir), "task": "instruction", "output_dir": str(tmp_path / "runs"),
           "data": {"train": str(instruction_file), "validation_size": 3},
           "train": {"max_steps": 2, "batch_size": 4, "precision": "fp32"}, "eval": {"max_new_tokens": 4}}
    path = tmp_path / "gen.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 0
    ev = json.loads((tmp_path / "runs" / "gen" / "eval.json").read_text())
    assert 0.0 <= ev["tuned"]["rougeL"] <= 1.0 and ev["test_examples"] == 3


def test_demo_verb_runs_the_shipped_config(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(Path(__file__).parents[1])
    overrides = [f"model={tiny_model_dir}", f"output_dir={tmp_path}", "train.max_steps=2", "train.eval_every=1",
                 "data.max_train_examples=32", "data.validation_size=8", "data.max_test_examples=8",
                 "train.precision=fp32"]
    assert main(["demo", *sum((["--set", o] for o in overrides), [])]) == 0
    run = tmp_path / "sst2-lora"
    for name in RUN_FILES:
        assert (run / name).is_file(), name
    assert json.loads((run / "eval.json").read_text())["test_examples"] == 8


def test_config_errors_exit_2_listing_all(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("methd: lora\ntrain: {lr: -1, epochs: x}\n")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    for expected in ("methd: unknown key; did you mean 'method'?", "train.epochs: expected int", "train.lr: must be > 0",
                     "data.train: required"):
        assert expected in err


def test_data_errors_exit_2(tmp_path, tiny_model_dir, sst_files, capsys):
    path = write_config(tmp_path, tiny_model_dir, sst_files)
    bad = tmp_path / "bad.txt"
    bad.write_text("1 fine\n5 unknown label\n")
    assert main(["train", str(path), "--set", f"data.train={bad}"]) == 2
    assert "bad.txt:2: field 'label': unknown label '5'" in capsys.readouterr().err


def test_eval_of_a_non_run_folder(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err


@pytest.mark.parametrize("verb", ["train", "prepare", "eval", "compare", "demo", "export", "generate", "serve",
                                  "estimate", "search", "runs"])
def test_help(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, tiny_model_dir, sst_files, capsys):
    path = write_config(tmp_path, tiny_model_dir, sst_files)
    assert main(["train", str(path), "--resume"]) == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err


def test_interrupted_run_resumes_from_the_cli(tmp_path, tiny_model_dir, sst_files):
    from tunesmith import finetune, load_config

    path = write_config(tmp_path, tiny_model_dir, sst_files, eval_every=100)
    run = finetune(load_config(path), until_step=2)  # as if Ctrl-C after step 2
    assert run.eval == {} and not (run.dir / "adapter").exists()
    assert main(["train", str(path), "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in (run.dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["type"] == "train"]
    assert steps == [1, 2, 3, 4]
    assert (run.dir / "adapter").is_dir() and (run.dir / "eval.json").is_file()


def test_prepare_then_train_reuses_prepared_data_until_it_changes(tmp_path, tiny_model_dir, sst_files, capsys):
    path = write_config(tmp_path, tiny_model_dir, sst_files)
    assert main(["prepare", str(path)]) == 0
    run = tmp_path / "runs" / "tiny"
    assert (run / "data" / "train.jsonl").is_file() and (run / "report.html").is_file()
    capsys.readouterr()
    assert main(["train", str(path)]) == 0
    assert "reusing the prepared data" in capsys.readouterr().out
    sst_files["train"].write_text(sst_files["train"].read_text() + "1 a brand new funny line\n")
    assert main(["train", str(path), "--overwrite"]) == 0
    assert "prepared the data into" in capsys.readouterr().out
    assert "a brand new funny line" in (run / "data" / "train.jsonl").read_text() + (run / "data" / "validation.jsonl").read_text()


def test_resume_checks_the_config_before_writing_anything(tmp_path, tiny_model_dir, sst_files, capsys):
    from tunesmith import finetune, load_config

    path = write_config(tmp_path, tiny_model_dir, sst_files, eval_every=100, lr=1e-2)
    run = finetune(load_config(path), until_step=2)
    saved = (run.dir / "config.yaml").read_text()
    capsys.readouterr()
    # a shape change is refused, whatever the flags, and names the key with both values
    assert main(["train", str(path), "--resume", "--allow-changes", "--set", "lora.r=8"]) == 2
    assert "change what the checkpoint holds: lora.r: 4 -> 8" in capsys.readouterr().err
    # an optimisation change is refused without --allow-changes, listing every changed key
    assert main(["train", str(path), "--resume", "--set", "train.lr=1e-3", "--set", "train.warmup_steps=1"]) == 2
    err = capsys.readouterr().err
    assert "change the training: train.lr: 0.01 -> 0.001; train.warmup_steps: 0 -> 1" in err and "--allow-changes" in err
    # whole-weight checkpoints cannot feed sharded training: refused before anything is written, saying why
    assert main(["train", str(path), "--resume", "--allow-changes", "--set", "train.strategy=fsdp"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "cannot resume with train.strategy: fsdp: its checkpoint step-2 holds whole weights" in err
    assert "--allow-changes" not in err
    # settings that only decide when to evaluate or save are accepted silently; nothing was rewritten so far
    assert (run.dir / "config.yaml").read_text() == saved
    # the printed resume command still works after refused attempts
    assert main(["train", str(run.dir / "config.yaml"), "--resume", "--set", "train.eval_every=50"]) == 0


def test_resume_with_allowed_changes_really_applies_them(tmp_path, tiny_model_dir, sst_files):
    from tunesmith import finetune, load_config

    path = write_config(tmp_path, tiny_model_dir, sst_files, eval_every=100, lr=1e-2)
    run = finetune(load_config(path), until_step=2)
    assert main(["train", str(path), "--resume", "--allow-changes", "--set", "train.lr=1e-3"]) == 0
    records = [json.loads(line) for line in (run.dir / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in records if r["type"] == "train"}
    (tmp_path / "s").mkdir()
    straight = write_config(tmp_path / "s", tiny_model_dir, sst_files, eval_every=100, lr=1e-3)
    other = finetune(load_config(straight))
    expected = {r["step"]: r["lr"] for r in map(json.loads, (other.dir / "metrics.jsonl").read_text().splitlines())
                if r["type"] == "train"}
    assert lrs[1] == pytest.approx(10 * expected[1]) and lrs[2] == pytest.approx(10 * expected[2])  # before: 1e-2
    assert lrs[3] == pytest.approx(expected[3]) and lrs[4] == pytest.approx(expected[4])  # after: the new 1e-3
    assert yaml.safe_load((run.dir / "config.yaml").read_text())["train"]["lr"] == 1e-3  # rewritten once accepted


def test_a_failed_resume_rewrites_nothing_and_edited_data_is_noticed(tmp_path, tiny_model_dir, sst_files, capsys):
    from tunesmith import finetune, load_config

    path = write_config(tmp_path, tiny_model_dir, sst_files, eval_every=100, lr=1e-2)
    run = finetune(load_config(path), until_step=2)
    saved = (run.dir / "config.yaml").read_text()
    # allowed, but the data step fails (a validation split too large): the saved config is untouched
    assert main(["train", str(path), "--resume", "--allow-changes", "--set", "data.validation_size=1000"]) == 2
    assert (run.dir / "config.yaml").read_text() == saved
    # the input file edited between the interruption and the resume: refused without --allow-changes
    sst_files["train"].write_text(sst_files["train"].read_text() + "1 one more funny line\n")
    capsys.readouterr()
    assert main(["train", str(path), "--resume"]) == 2
    assert "data files: 'as prepared for the checkpoint' -> 'changed since'" in capsys.readouterr().err
    assert main(["train", str(path), "--resume", "--allow-changes"]) == 0
    out = capsys.readouterr().out
    assert "resuming from" in out and "step-2 (step 2)" in out


def test_perplexity_shares_the_loss_p_value_and_small_test_sets_are_warned_about(tmp_path, tiny_model_dir, sst_files, capsys):
    path = write_config(tmp_path, tiny_model_dir, sst_files)
    assert main(["train", str(path), "--skip-bad-rows"]) == 0
    ev = json.loads((tmp_path / "runs" / "tiny" / "eval.json").read_text())
    paired = ev["tuned_vs_base"]
    assert paired["perplexity"]["p_value"] == paired["loss"]["p_value"]
    assert ev["warnings"][0].startswith("only 6 test examples: bootstrap intervals and p-values are unreliable")
    assert "only 6 test examples" in " ".join(capsys.readouterr().out.split())
    assert "only 6 test examples" in (tmp_path / "runs" / "tiny" / "report.html").read_text()
    assert yaml.safe_load((tmp_path / "runs" / "tiny" / "config.yaml").read_text())["data"]["skip_bad_rows"] is True


def test_two_trainings_never_write_one_run_folder(tmp_path, tiny_model_dir, sst_files, capsys):
    """A run folder is locked while a process trains in it (e.g. workers left going by a killed
    launcher): a second train or resume there is refused, naming the holder; free again after."""
    import subprocess
    import sys

    path = write_config(tmp_path, tiny_model_dir, sst_files)
    lock = tmp_path / "runs" / ".tiny.lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode()); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True) if lock.parent.mkdir(parents=True, exist_ok=True) is None else None
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["train", str(path)]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert f"another tunesmith process (pid {holder.pid}) is training in this run folder" in err
    finally:
        holder.kill()
        holder.wait()
    assert main(["train", str(path)]) == 0  # the lock died with its holder


def _script(folder: Path) -> Path:
    """A console script as pip writes one (``.venv/bin/tunesmith``), for this interpreter."""
    import sys

    folder.mkdir(parents=True)
    script = folder / "tunesmith"
    script.write_text(f"#!{sys.executable}\nimport sys\nfrom tunesmith.cli import main\nsys.exit(main())\n")
    script.chmod(0o755)
    return script


def test_hints_name_the_program_as_the_user_typed_it(tmp_path, tiny_model_dir, sst_files):
    """A user with only .venv/bin/tunesmith (not on PATH) is told to type .venv/bin/tunesmith."""
    import os
    import subprocess
    import sys

    _script(tmp_path / ".venv" / "bin")
    path = write_config(tmp_path, tiny_model_dir, sst_files)
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + "/usr/bin:/bin",
           "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "COLUMNS": "300"}
    env.pop("TUNESMITH_PROGRAM", None)
    done = subprocess.run([".venv/bin/tunesmith", "train", str(path), "--until-step", "1"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 75, done.stderr[-3000:]
    assert f"continue with: .venv/bin/tunesmith train {tmp_path / 'runs' / 'tiny' / 'config.yaml'} --resume" in done.stdout


def test_program_is_plain_tunesmith_only_when_that_name_finds_this_program(tmp_path, monkeypatch):
    import sys

    from tunesmith.runtime.commands import command, program

    monkeypatch.delenv("TUNESMITH_PROGRAM", raising=False)
    script = _script(tmp_path / "env" / "bin")
    other = _script(tmp_path / "elsewhere")  # another install's tunesmith on PATH
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["env/bin/tunesmith", "train"])
    monkeypatch.setenv("PATH", str(other.parent))
    assert program() == "env/bin/tunesmith"
    monkeypatch.setenv("PATH", str(script.parent))
    assert command("train", tmp_path / "a b.yaml", "--resume") == f"tunesmith train '{tmp_path / 'a b.yaml'}' --resume"
    monkeypatch.setattr(sys, "argv", [str(Path(__file__).parents[1] / "src" / "tunesmith" / "__main__.py")])
    monkeypatch.setenv("PATH", str(other.parent))  # python -m tunesmith, no python or tunesmith of this env on PATH
    assert program() == f"{sys.executable} -m tunesmith"
    monkeypatch.setenv("TUNESMITH_PROGRAM", "env/bin/tunesmith")  # a torchrun worker: what the launcher was run as
    assert program() == "env/bin/tunesmith"
