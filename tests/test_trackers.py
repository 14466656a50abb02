"""report_to: TensorBoard and MLflow, read back with their own readers, against metrics.jsonl."""

import json
import math

import pytest
import yaml

from tunesmith.cli import main
from tunesmith.config import ConfigError, load_config
from tunesmith.runs import trackers


def test_a_run_reaches_tensorboard_and_mlflow_with_the_values_of_metrics_jsonl(tmp_path, tiny_model_dir, sst_files):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_cli import write_config

    path = write_config(tmp_path, tiny_model_dir, sst_files)
    raw = yaml.safe_load(path.read_text())
    raw["report_to"] = ["tensorboard", "mlflow"]
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(path)]) == 0
    run = load_config(path).run_dir
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [(r["step"], r["loss"]) for r in rows if r["type"] == "train"]
    evals = [(r["step"], r["val_loss"]) for r in rows if r["type"] == "eval"]
    ev = json.loads((run / "eval.json").read_text())

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(s, pytest.approx(v, rel=1e-6)) for s, v in train]
    assert [(e.step, e.value) for e in acc.Scalars("eval/val_loss")] == [(s, pytest.approx(v, rel=1e-6)) for s, v in evals]
    assert acc.Scalars("test/tuned.accuracy")[0].value == pytest.approx(ev["tuned"]["accuracy"], rel=1e-6)

    state = json.loads((run / "mlflow.json").read_text())
    client = MlflowClient(state["tracking_uri"])
    got = client.get_run(state["run_id"])
    assert got.data.params["train.lr"] == str(raw["train"].get("lr", load_config(path).train.lr))
    assert got.data.params["lora.r"] == "4" and got.info.run_name == "tiny" and got.info.status == "FINISHED"
    history = client.get_metric_history(state["run_id"], "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(s, pytest.approx(v)) for s, v in train]
    assert got.data.metrics["test/tuned.accuracy"] == pytest.approx(ev["tuned"]["accuracy"])
    assert [a.path for a in client.list_artifacts(state["run_id"])] == ["report.html"]
    # evaluating again adds the new evaluation, not the training metrics a second time
    assert main(["eval", str(run)]) == 0
    assert len(client.get_metric_history(state["run_id"], "train/loss")) == len(train)
    assert len(client.get_metric_history(state["run_id"], "test/tuned.accuracy")) == 2
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert len(acc.Scalars("train/loss")) == len(train)  # rewritten whole, never doubled


def test_unknown_trackers_are_named_with_the_closest(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'tensorboard'"):
        load_config(data={"data": {"train": str(tmp_path)}, "report_to": ["tensorbord"]})
    assert load_config(data={"data": {"train": str(tmp_path)}, "report_to": "mlflow"}).report_to == ["mlflow"]


def test_a_failing_tracker_warns_and_never_fails(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"name": "r", "report_to": ["mlflow"],
                                                    "mlflow": {"tracking_uri": "unknownscheme://nowhere"}}))
    (run / "metrics.jsonl").write_text(json.dumps({"type": "train", "step": 1, "loss": math.pi}) + "\n")
    with pytest.warns(UserWarning, match="report_to mlflow"):
        trackers.sync(run)
