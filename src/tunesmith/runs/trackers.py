"""The trackers users already use: TensorBoard and MLflow (``report_to: [tensorboard, mlflow]``).

What a run folder holds is written to them with the libraries' own APIs: every training and
validation metric of ``metrics.jsonl`` (by optimizer step), the config as parameters (dotted
keys), the evaluation's numbers, and ``report.html`` as an artifact (MLflow). No server needed:

* TensorBoard: event files in ``<run>/tensorboard/`` (``tensorboard --logdir runs``), rewritten
  whole at each sync (``torch.utils.tensorboard.SummaryWriter``: a run read twice never doubles).
* MLflow: ``mlflow.tracking_uri`` (default ``sqlite:///<output_dir>/mlflow.db``, artifacts beside
  it in ``mlartifacts/``; ``mlflow ui --backend-store-uri ...``), experiment ``mlflow.experiment``;
  one MLflow run per tunesmith run, its id kept in ``<run>/mlflow.json`` so later syncs (after a
  resume, after ``tunesmith eval``) add only what is new.

``sync(run_dir)`` runs at the end of training (also a stopped one) and after each evaluation; a
tracker that fails prints a warning and never fails the run. The packages are the ``tracking``
extra (``pip install 'tunesmith[tracking]'``).
"""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import yaml

from tunesmith.io import atomic_write_json, flatten_dict, read_jsonl

def _numbers(d: dict[str, Any], prefix: str) -> dict[str, float]:
    """The finite numbers of a nested dict as ``{prefix/dotted.key: value}`` (lists and text left out)."""
    return {f"{prefix}/{k}": float(v) for k, v in flatten_dict(d).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def step_metrics(run_dir: Path) -> list[tuple[int, dict[str, float]]]:
    """``metrics.jsonl`` as (step, {train/loss: .., eval/val_loss: ..}) in file order."""
    path = run_dir / "metrics.jsonl"
    out = []
    for rec in read_jsonl(path) if path.exists() else []:
        kind = rec.get("type", "train")
        values = {f"{kind}/{k}": float(v) for k, v in rec.items()
                  if k not in ("type", "step") and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        out.append((int(rec.get("step", 0)), values))
    return out


def evaluation_metrics(run_dir: Path) -> dict[str, float]:
    """The numbers of ``eval.json`` worth a chart: base and tuned metrics, forgetting, per task."""
    path = run_dir / "eval.json"
    if not path.exists():
        return {}
    ev = json.loads(path.read_text(encoding="utf-8"))
    keep = {k: ev[k] for k in ("base", "tuned", "forgetting", "tuned_vs_base", "macro", "tasks") if k in ev}
    for side in ("base", "tuned"):  # per-class tables and confusion matrices: left to the report
        if isinstance(keep.get(side), dict):
            keep[side] = {k: v for k, v in keep[side].items() if k not in ("per_class", "confusion")}
    return _numbers(keep, "test")


def _config(run_dir: Path) -> dict[str, Any]:
    return yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}


# ---------------------------------------------------------------- TensorBoard


def to_tensorboard(run_dir: Path, log_dir: Path | None = None) -> Path:
    """Write the run's metrics, config (hparams) and evaluation as TensorBoard events; returns the folder."""
    from torch.utils.tensorboard import SummaryWriter

    log_dir = Path(log_dir or run_dir / "tensorboard")
    tmp = log_dir.with_name(log_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    writer = SummaryWriter(log_dir=str(tmp))
    try:
        for step, values in step_metrics(run_dir):
            for tag, value in values.items():
                writer.add_scalar(tag, value, step)
        final = max((s for s, _ in step_metrics(run_dir)), default=0)
        for tag, value in evaluation_metrics(run_dir).items():
            writer.add_scalar(tag, value, final)
        config = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in flatten_dict(_config(run_dir)).items()}
        writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()))
    finally:
        writer.close()
    shutil.rmtree(log_dir, ignore_errors=True)
    tmp.rename(log_dir)
    return log_dir


# ---------------------------------------------------------------- MLflow


def _mlflow_where(cfg: dict[str, Any], run_dir: Path) -> tuple[str, Path | None]:
    ml = cfg.get("mlflow") or {}
    uri = ml.get("tracking_uri")
    if uri:
        return uri, None
    root = run_dir.parent.resolve()
    return f"sqlite:///{root / 'mlflow.db'}", root / "mlartifacts"


def to_mlflow(run_dir: Path) -> str:
    """Log the run to MLflow (new metrics only, after the first time); returns the MLflow run id."""
    import logging

    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    for name in ("mlflow", "alembic"):  # after the import: MLflow sets up its own loggers when imported
        logging.getLogger(name).setLevel(logging.WARNING)

    cfg = _config(run_dir)
    uri, artifacts = _mlflow_where(cfg, run_dir)
    client = MlflowClient(tracking_uri=uri)
    state_path = run_dir / "mlflow.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    if state.get("tracking_uri") != uri:
        state = {}
    name = (cfg.get("mlflow") or {}).get("experiment") or "tunesmith"
    if not state:
        exp = client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp else client.create_experiment(
            name, artifact_location=artifacts.as_uri() if artifacts else None)
        run = client.create_run(exp_id, run_name=cfg.get("name") or run_dir.name, tags={"tunesmith.run_dir": str(run_dir.resolve())})
        state = {"tracking_uri": uri, "run_id": run.info.run_id, "logged": 0, "evaluated": None}
        params = [Param(k[:250], str(v)[:6000]) for k, v in flatten_dict(cfg).items()]
        for i in range(0, len(params), 100):
            client.log_batch(state["run_id"], params=params[i:i + 100])
    rid = state["run_id"]
    rows = step_metrics(run_dir)
    new = rows[state["logged"]:] if state["logged"] <= len(rows) else rows  # a resume truncates: log what is new
    now = int(time.time() * 1000)
    metrics = [Metric(tag, value, now, step) for step, values in new for tag, value in values.items()]
    ev_path = run_dir / "eval.json"
    stamp = ev_path.stat().st_mtime if ev_path.exists() else None
    if stamp is not None and stamp != state.get("evaluated"):
        final = max((s for s, _ in rows), default=0)
        metrics += [Metric(tag, value, now, final) for tag, value in evaluation_metrics(run_dir).items()]
    for i in range(0, len(metrics), 500):
        client.log_batch(rid, metrics=metrics[i:i + 500])
    if (run_dir / "report.html").exists() and stamp is not None and stamp != state.get("evaluated"):
        client.log_artifact(rid, str(run_dir / "report.html"))
    from tunesmith.runs.index import row_from_folder

    status = (row_from_folder(run_dir) or {}).get("status")
    if status == "training":
        client.update_run(rid, status="RUNNING")
    else:  # finished (trained, evaluated) or stopped: MLflow shows the run as ended
        client.set_terminated(rid, "FINISHED" if status in ("trained", "evaluated") else "KILLED")
    state |= {"logged": len(rows), "evaluated": stamp}
    atomic_write_json(state_path, state)
    return rid


def sync(run_dir: str | Path) -> None:
    """Write the run to the trackers its config names (``report_to``). Never raises."""
    run_dir = Path(run_dir)
    try:
        wanted = _config(run_dir).get("report_to") or []
    except (OSError, yaml.YAMLError):
        return
    for name in wanted:
        try:
            to_tensorboard(run_dir) if name == "tensorboard" else to_mlflow(run_dir)
        except ImportError as e:
            warnings.warn(f"report_to {name}: {e.name or name} is not installed (pip install 'tunesmith[tracking]')", stacklevel=2)
        except Exception as e:  # noqa: BLE001 - a tracker must never fail the run it tracks
            warnings.warn(f"report_to {name}: not written for {run_dir}: {type(e).__name__}: {e}", stacklevel=2)
