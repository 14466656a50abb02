"""Resume and restart mean what the user thinks: a changed validation set is measured again, a
changed batch size continues from the same example, evaluation-only changes retrain nothing, a
stopped evaluation continues where it stopped, and a damaged best/ falls back to its step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from test_cli import write_config
from tunesmith.cli import main
from tunesmith.config import TrainConfig
from tunesmith.data.formats import Example
from tunesmith.evaluation.answers import AnswerStore, EvaluationStopped, answer_all
from tunesmith.training.loop import EpochPlan, epoch_steps
from tunesmith.training.state import LoopState

ROOT = Path(__file__).parents[1]


def records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------ the data position (item 5)


@pytest.mark.parametrize("group_by_length", [False, True])
def test_a_new_step_size_continues_from_the_same_example(group_by_length):
    """9 examples at 4 a step, stopped after one step, resumed at 2 a step: the other 5 are trained
    once each, then epoch 2 is planned at the new size; the logged epoch grows by examples seen."""
    lengths = [5, 9, 3, 7, 1, 8, 2, 6, 4]
    cfg = TrainConfig(batch_size=4, epochs=2, seed=3, group_by_length=group_by_length)
    plan = EpochPlan(lengths, cfg, None)
    state = LoopState(per_step=4)
    first, reached, ended = plan.take(state)  # 4 examples (grouped by length: possibly the short last step, 1)
    assert len(first) in (1, 4) and reached == pytest.approx(len(first) / 9) and not ended
    left = 9 - len(first)
    state.step += 1
    plan.advance(state, ended)
    smaller = EpochPlan(lengths, TrainConfig(batch_size=2, epochs=2, seed=3, group_by_length=group_by_length), None)
    state = LoopState.from_json(json.loads(json.dumps(state.to_json())))  # what a checkpoint holds
    note = smaller.resume(state)
    assert "changed from 4 to 2" in note and f"{left} examples of epoch 1" in note
    assert smaller.total_steps(state) == 1 + (left + 1) // 2 + 5  # the rest of epoch 1, then ceil(9/2)
    seen, epochs = list(first), []
    while True:
        chunk, reached, ended = smaller.take(state)
        seen += chunk
        epochs.append(reached)
        state.step += 1
        smaller.advance(state, ended)
        if ended:
            break
    assert sorted(seen) == list(range(9))  # every example of epoch 1 exactly once
    assert epochs == sorted(epochs) and epochs[-1] == pytest.approx(1.0)
    assert epochs[0] == pytest.approx((len(first) + min(2, left)) / 9)
    assert state.epoch == 1 and state.rest is None and state.per_step == 2
    assert smaller.steps(state) == epoch_steps(lengths, smaller.cfg, 1, None, 2)


def test_an_unchanged_resume_takes_the_same_steps_as_an_old_checkpoint():
    """Checkpoints of earlier versions hold only the step count: the position is derived from it."""
    lengths = list(range(1, 11))
    plan = EpochPlan(lengths, TrainConfig(batch_size=3), None)
    state = LoopState.from_json({"step": 5})  # 10 examples at 3 a step: 4 steps per epoch, so epoch 2, its second step
    assert plan.resume(state) is None and (state.epoch, state.epoch_step) == (1, 1)
    assert plan.take(state)[0] == epoch_steps(lengths, plan.cfg, 1)[1]


def test_resume_with_a_smaller_batch_trains_the_rest_of_the_epoch_once(tmp_path, tiny_model_dir, sst_files):
    path = write_config(tmp_path, tiny_model_dir, sst_files, max_steps=None, epochs=1, batch_size=8, eval_every=100)
    assert main(["train", str(path), "--until-step", "1"]) == 75
    assert main(["train", str(path), "--resume", "--allow-change", "train.batch_size", "--set", "train.batch_size=4"]) == 0
    steps = [r for r in records(tmp_path / "runs" / "tiny") if r["type"] == "train"]
    n = 28  # 32 training lines, 4 held out for validation
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]  # 8 examples, then the other 20 at 4 a step
    assert [r["epoch"] for r in steps] == pytest.approx([x / n for x in (8, 12, 16, 20, 24, 28)])


# ------------------------------------------------------------------ what a resume changes (items 4, 6)


def test_a_changed_validation_set_is_measured_again_at_resume(tmp_path, tiny_model_dir, sst_files, capsys):
    path = write_config(tmp_path, tiny_model_dir, sst_files, max_steps=6, eval_every=2)
    assert main(["train", str(path), "--until-step", "4"]) == 75
    run = tmp_path / "runs" / "tiny"
    before = [r for r in records(run) if r["type"] == "eval"]
    assert [r["step"] for r in before] == [2, 4]
    lines = sst_files["train"].read_text().splitlines()
    sst_files["train"].write_text("\n".join(lines[::-1] + ["1 a new funny line", "0 a new lazy line"]) + "\n")
    capsys.readouterr()
    assert main(["train", str(path), "--resume", "--allow-changes"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "the validation set changed since this checkpoint: the weights of step 4 score" in out
    assert "the training data changed since this checkpoint" in out and "starts again from the first example" in out
    again = [r for r in records(run) if r["type"] == "eval"]
    assert [r["step"] for r in again] == [2, 4, 4, 6] and again[2]["revalidated"] is True
    result = json.loads((run / "train_result.json").read_text())
    assert result["best_step"] >= 4  # never a step measured on the old split only


def test_evaluation_only_changes_need_no_flag_and_retrain_nothing(tmp_path, tiny_model_dir, sst_files, capsys):
    path = write_config(tmp_path, tiny_model_dir, sst_files)
    assert main(["train", str(path)]) == 0
    run = tmp_path / "runs" / "tiny"
    steps = records(run)
    capsys.readouterr()
    assert main(["train", str(path), "--resume", "--set", "data.max_test_examples=3", "--set", "eval.batch_size=2"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "changes to evaluation and bookkeeping only (nothing is trained again for them): data.max_test_examples" in out
    assert "changes to training" not in out
    assert records(run) == steps and json.loads((run / "eval.json").read_text())["test_examples"] == 3


def test_allow_change_accepts_only_the_keys_it_names(tmp_path, tiny_model_dir, sst_files, capsys):
    """--allow-changes was all or nothing: a stale max_steps in the YAML came along with the change
    the user meant. --allow-change KEY accepts that key alone."""
    path = write_config(tmp_path, tiny_model_dir, sst_files, eval_every=100)
    assert main(["train", str(path), "--until-step", "2"]) == 75
    capsys.readouterr()
    assert main(["train", str(path), "--resume", "--allow-change", "train.lr", "--set", "train.lr=1e-3",
                 "--set", "train.max_steps=9"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "change the training: train.max_steps: 4 -> 9" in err and "--allow-change train.max_steps" in err
    assert "train.lr" not in err.split("change the training:")[1].split(".", 1)[0]
    assert main(["train", str(path), "--resume", "--allow-change", "train.lr", "--set", "train.lr=1e-3"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "changes to training, applied from step 2 on: train.lr: 0.0002 -> 0.001" in out


# ------------------------------------------------------------------ a damaged best/ (item 8)


def test_a_damaged_best_falls_back_to_its_step_checkpoint(tmp_path, tiny_model_dir, sst_files, capsys):
    path = write_config(tmp_path, tiny_model_dir, sst_files, keep_checkpoints=5)
    assert main(["train", str(path)]) == 0  # then a retry (say after a crash in evaluation) meets a damaged best/
    run = tmp_path / "runs" / "tiny"
    best = run / "checkpoints" / "best"
    step = json.loads((best / "state.json").read_text())["step"]
    (best / "trainable.safetensors").write_bytes(b"\0" * 64)  # a flipped disk, a killed copy
    capsys.readouterr()
    assert main(["train", str(path), "--resume"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"its weights are taken from step-{step} (the same step)" in out
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and (run / "eval.json").is_file()
    from tunesmith.training.checkpoint import verify

    assert verify(best) is None  # written again
    from tunesmith.training.checkpoint import CheckpointError, load_best

    (best / "trainable.safetensors").write_bytes(b"\0" * 64)
    for ckpt in (run / "checkpoints").glob("step-*"):
        (ckpt / "trainable.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(CheckpointError, match="the best weights are lost") as e:
        load_best(run, {}, best_step=step)
    assert "--overwrite" in str(e.value)


# ------------------------------------------------------------------ stopped evaluation (item 7)


def test_answers_are_kept_batch_by_batch_and_a_stop_loses_none(tmp_path):
    exs = [Example([{"role": "user", "content": "x" * (i + 1)}], label=str(i)) for i in range(7)]
    calls = []

    def answer(batch):
        calls.append([e.label for e in batch])
        return [e.label for e in batch], ([1.0] * len(batch), [1] * len(batch)), len(batch), [None] * len(batch)

    store = AnswerStore(tmp_path / "a.jsonl", "fp1")
    with pytest.raises(EvaluationStopped, match="2 of 7 answers kept"):
        answer_all(exs, answer, 2, store, should_stop=lambda: len(calls) >= 1)
    done = answer_all(exs, answer, 2, AnswerStore(tmp_path / "a.jsonl", "fp1"))
    assert done.outputs == [str(i) for i in range(7)] and done.from_store == 2
    assert calls == [["0", "1"], ["2", "3"], ["4", "5"], ["6"]]  # the first batch was not asked again
    with open(tmp_path / "a.jsonl", "a") as f:
        f.write('{"start": 99, "n"')  # a kill mid-write: ignored
    assert AnswerStore(tmp_path / "a.jsonl", "fp1").batches.keys() == {0, 2, 4, 6}
    assert AnswerStore(tmp_path / "a.jsonl", "other settings").batches == {}


def test_sigterm_during_the_final_evaluation_exits_75_and_eval_continues(tmp_path, tiny_model_dir):
    rows = [{"instruction": f"Say hello {i} " + "and more words " * (i % 4), "input": "", "output": f"hello {i} !"}
            for i in range(80)]
    (tmp_path / "inst.json").write_text(json.dumps(rows))
    cfg = {"name": "ev", "model": str(tiny_model_dir), "task": "instruction", "method": "lora",
           "output_dir": str(tmp_path / "runs"), "lora": {"r": 4, "alpha": 8},
           "data": {"train": str(tmp_path / "inst.json"), "validation_size": 4, "prepare": {"test_size": 60}},
           "train": {"max_steps": 1, "batch_size": 4, "precision": "fp32"},
           "eval": {"max_new_tokens": 48, "batch_size": 2, "latency_examples": 0, "general": "none"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    run = tmp_path / "runs" / "ev"
    env = os.environ | {"PYTHONPATH": str(ROOT / "src"), "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith", "train", str(tmp_path / "c.yaml")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not list((run / "eval_cache").glob("tuned-*.jsonl")) or \
            len(next((run / "eval_cache").glob("tuned-*.jsonl")).read_text().splitlines()) < 3:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    phase = json.loads((run / "phase.json").read_text())
    assert phase["phase"] == "evaluating" and phase["pid"] == proc.pid and "tuned" in phase["detail"]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    assert "evaluation stopped (SIGTERM)" in " ".join(err.split()) and "eval " + str(run) in " ".join(err.split())
    assert not (run / "eval.json").exists() and not (run / "phase.json").exists()
    kept = len(next((run / "eval_cache").glob("tuned-*.jsonl")).read_text().splitlines()) - 1
    again = subprocess.run([sys.executable, "-m", "tunesmith", "eval", str(run)], env=env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    ev = json.loads((run / "eval.json").read_text())
    assert ev["tuned"]["answers_resumed"] == 2 * kept and ev["test_examples"] == 60
    assert not (run / "eval_cache").exists()
    assert "evaluating tuned:" in again.stdout  # plain progress lines when the output is not a terminal
