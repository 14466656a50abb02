"""The index of every run made on this machine: one embedded SQLite file.

Where: ``$TUNESMITH_INDEX``, else ``$TUNESMITH_HOME/runs.sqlite`` (``~/.cache/tunesmith``).
Every command that writes a run folder calls ``record(run_dir)``; a row is computed from the
folder's own files alone (``row_from_folder``), so ``rebuild`` over the same folders gives the
same index as the live one. Several processes may write at once: the file is in WAL mode, each
write is one short transaction, and a busy database is waited for (30 s) instead of failing.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import sqlite3
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

from tunesmith.config import METHODS
from tunesmith.models import is_run_folder
from tunesmith.runtime.commands import command
from tunesmith.io import flatten_dict
from tunesmith.runs.phase import current_phase

COLUMNS = ("path", "name", "created", "updated", "status", "model", "method", "task", "data", "metric", "value",
           "low", "high", "base_value", "train_seconds", "tokens_per_s", "target_tokens", "cost", "config", "results")
_SCHEMA = """CREATE TABLE IF NOT EXISTS runs (
    path TEXT PRIMARY KEY, name TEXT, created TEXT, updated TEXT, status TEXT, model TEXT, method TEXT, task TEXT,
    data TEXT, metric TEXT, value REAL, low REAL, high REAL, base_value REAL, train_seconds REAL, tokens_per_s REAL,
    target_tokens INTEGER, cost REAL, config TEXT, results TEXT)"""
SORTS = {"date": "created DESC", "metric": "value DESC", "name": "name ASC", "time": "train_seconds DESC",
         "cost": "cost DESC"}
# the files a run folder is made of (their newest change is the row's `updated`)
_FILES = ("config.yaml", "run.json", "metrics.jsonl", "train_result.json", "eval.json", "data_report.json")


def index_path() -> Path:
    """The index file: ``$TUNESMITH_INDEX``, else ``$TUNESMITH_HOME/runs.sqlite``."""
    from tunesmith.models import tunesmith_home

    return Path(os.environ.get("TUNESMITH_INDEX") or tunesmith_home() / "runs.sqlite")


@contextlib.contextmanager
def connect(path: Path | None = None) -> Iterator[sqlite3.Connection]:
    """An open connection to the index (created on first use, WAL mode), committed on success."""
    path = Path(path or index_path())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()  # sqlite would create it 0644 whatever the umask; its -wal and -shm files copy this mode
    con = sqlite3.connect(path, timeout=30.0, isolation_level=None)  # explicit BEGIN below; waits when busy
    try:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA busy_timeout=30000")
        con.execute(_SCHEMA)
        con.row_factory = sqlite3.Row
        yield con
    finally:
        con.close()


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _iso(seconds: float | None) -> str | None:
    return None if seconds is None else dt.datetime.fromtimestamp(seconds, dt.timezone.utc).isoformat(timespec="seconds")


def _json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def has_results(path: Path) -> bool:
    """A run folder (``models.is_run_folder``) that tunesmith trained or evaluated a run in: its
    config plus any result (only those are indexed)."""
    return is_run_folder(path) and any((path / f).exists() for f in _FILES[1:5] + ("checkpoints",))


def training_now(run_dir: Path) -> bool:
    """Whether a process holds the run's lock (``runs.folder.run_lock``) right now."""
    lock = run_dir.parent / f".{run_dir.name}.lock"
    if not lock.exists():
        return False
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # also releases the shared lock just taken
    return False


def headline(evaluation: dict[str, Any]) -> dict[str, Any]:
    """The headline metric of an ``eval.json``: name, tuned value with its 95% interval, base value.
    A multi-task run's headline is its macro average (no interval)."""
    metric = evaluation.get("metric")
    tuned, base = evaluation.get("tuned") or {}, evaluation.get("base") or {}
    if "tasks" in evaluation:  # several tasks: the macro average of their headline metrics
        macro = evaluation.get("macro") or {}
        return {"metric": "macro", "value": macro.get("tuned"), "low": None, "high": None, "base_value": macro.get("base")}
    ci = (tuned.get("ci") or {}).get(metric) or [None, None]
    value = tuned.get(metric)
    return {"metric": metric, "value": value if isinstance(value, (int, float)) else None,
            "low": ci[0], "high": ci[1], "base_value": base.get(metric) if isinstance(base.get(metric), (int, float)) else None}


def row_from_folder(run_dir: str | Path) -> dict[str, Any] | None:
    """The index row of a run folder, from its files alone (None when it is not a run folder)."""
    run_dir = Path(run_dir).resolve()
    if not has_results(run_dir):
        return None
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        config = {}
    meta, trained, evaluation = _json(run_dir / "run.json"), _json(run_dir / "train_result.json"), _json(run_dir / "eval.json")
    times = [t for t in (_mtime(run_dir / f) for f in _FILES) if t is not None]
    phase = current_phase(run_dir)
    if phase and phase.get("phase") == "evaluating":  # a final evaluation (or a new one) is running now
        status = "evaluating"
    elif evaluation:
        status = "evaluated"
    elif training_now(run_dir):
        status = "training"
    elif trained:
        status = "interrupted" if trained.get("interrupted") else "trained"
    else:
        status = "stopped"  # started, never finished (killed: resume it)
    seconds = trained.get("train_seconds")
    tokens = trained.get("target_tokens")
    throughput = None
    metrics_file = run_dir / "metrics.jsonl"
    if metrics_file.exists():  # the mean tokens/s of the training steps
        speeds = []
        with contextlib.suppress(OSError):
            for line in metrics_file.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(ValueError):
                    rec = json.loads(line)
                    if rec.get("type") == "train" and rec.get("tokens") and rec.get("step_seconds"):
                        speeds.append((rec["tokens"], rec["step_seconds"]))
        if speeds:
            throughput = sum(t for t, _ in speeds) / max(sum(s for _, s in speeds), 1e-9)
    price = ((config.get("estimate") or {}).get("price_per_hour") or 0) if isinstance(config, dict) else 0
    data = (config.get("data") or {}).get("train") if isinstance(config.get("data"), dict) else None
    if not data and config.get("tasks"):
        data = ", ".join(str(t.get("name")) for t in config["tasks"] if isinstance(t, dict))
    return {"path": str(run_dir), "name": config.get("name") or run_dir.name,
            "created": meta.get("created") or _iso(min(times) if times else None), "updated": _iso(max(times) if times else None),
            "status": status, "model": config.get("model"), "method": config.get("method"), "task": config.get("task"),
            "data": data, **headline(evaluation), "train_seconds": seconds,
            "tokens_per_s": throughput, "target_tokens": tokens,
            "cost": seconds / 3600 * price if seconds is not None and price else None,
            "config": json.dumps(config, sort_keys=True, default=str),
            "results": json.dumps({"train": trained, "eval": evaluation}, sort_keys=True, default=str)}


def _upsert(con: sqlite3.Connection, rows: Iterable[dict[str, Any]]) -> int:
    cols = ", ".join(COLUMNS)
    marks = ", ".join("?" for _ in COLUMNS)
    updates = ", ".join(f"{c}=excluded.{c}" for c in COLUMNS[1:])
    n = 0
    for row in rows:
        con.execute(f"INSERT INTO runs ({cols}) VALUES ({marks}) ON CONFLICT(path) DO UPDATE SET {updates}",
                    [row[c] for c in COLUMNS])
        n += 1
    return n


def record(run_dir: str | Path, path: Path | None = None) -> None:
    """Bring the run folder's row up to date. Never raises: a run must not fail because its index
    cannot be written (a warning says why instead)."""
    try:
        row = row_from_folder(run_dir)
        if row is None:
            return
        with connect(path) as con:
            con.execute("BEGIN IMMEDIATE")
            _upsert(con, [row])
            con.execute("COMMIT")
    except (OSError, sqlite3.Error) as e:
        warnings.warn(f"the run index {path or index_path()} was not updated for {run_dir}: {e}", stacklevel=2)


def find_run_folders(roots: Iterable[str | Path], depth: int = 3) -> list[Path]:
    """Run folders at most ``depth`` levels below each root (a root may be a run folder itself)."""
    found: set[Path] = set()

    def walk(folder: Path, left: int) -> None:
        if has_results(folder):
            found.add(folder.resolve())
        if left == 0:
            return
        with contextlib.suppress(OSError):
            for child in folder.iterdir():
                if child.is_dir() and not child.name.startswith(".") and child.name not in ("checkpoints", "data", "adapter", "model"):
                    walk(child, left - 1)

    for root in roots:
        if Path(root).is_dir():
            walk(Path(root), depth)
    return sorted(found)


def known_roots(path: Path | None = None) -> list[Path]:
    """The folders holding the indexed runs (each run's parent folder)."""
    with connect(path) as con:
        return sorted({Path(r["path"]).parent for r in con.execute("SELECT path FROM runs")})


def rebuild(roots: Iterable[str | Path] | None = None, path: Path | None = None) -> int:
    """Build the index again from the run folders under ``roots`` (default: the folders of the runs
    indexed now, and ``./runs``): the old rows are replaced in one transaction. Returns the row count."""
    roots = list(roots) if roots else known_roots(path) + [Path("runs")]
    rows = [r for r in map(row_from_folder, find_run_folders(roots)) if r is not None]
    with connect(path) as con:
        con.execute("BEGIN IMMEDIATE")
        con.execute("DELETE FROM runs")
        n = _upsert(con, rows)
        con.execute("COMMIT")
    return n


def list_runs(method: str | None = None, since: str | None = None, sort: str = "date", status: str | None = None,
              name: str | None = None, path: Path | None = None) -> list[dict[str, Any]]:
    """Indexed runs as dicts (``COLUMNS``), filtered and sorted (``SORTS``: date, metric, name, time, cost).
    ``since``: an ISO date or datetime (UTC); ``name``: a substring of the run's name.
    Raises ValueError for an unknown sort or a date that does not parse."""
    if sort not in SORTS:
        raise ValueError(f"unknown sort {sort!r}: use one of {', '.join(SORTS)}")
    if method and method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    if status and status not in STATUSES:
        raise ValueError(f"unknown status {status!r}: use one of {', '.join(STATUSES)}")
    where, args = [], []
    if method:
        where.append("method = ?")
        args.append(method)
    if status:
        where.append("status = ?")
        args.append(status)
    if name:
        where.append("name LIKE ?")
        args.append(f"%{name}%")
    if since:
        try:
            when = dt.datetime.fromisoformat(since)
        except ValueError:
            raise ValueError(f"--since {since!r} is not a date (YYYY-MM-DD, or YYYY-MM-DDTHH:MM)") from None
        when = when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)
        where.append("created >= ?")
        args.append(when.isoformat(timespec="seconds"))
    sql = "SELECT * FROM runs" + (" WHERE " + " AND ".join(where) if where else "")
    sql += f" ORDER BY {SORTS[sort]}" + (" NULLS LAST" if sort in ("metric", "time", "cost") else "") + ", path"
    with connect(path) as con:
        rows = [dict(r) for r in con.execute(sql, args)]
    return [_refreshed(r, path) for r in rows]


def _refreshed(row: dict[str, Any], path: Path | None) -> dict[str, Any]:
    """A row whose run can no longer be training (killed without a last update) is read again from
    its folder; a row whose folder is gone says so (``--rebuild`` drops it)."""
    folder = Path(row["path"])
    if not has_results(folder):
        return row | {"status": "deleted"}
    if row["status"] == "training" and not training_now(folder):
        record(folder, path)
        return row_from_folder(folder) or row
    return row


def count(path: Path | None = None) -> int:
    """How many runs the index holds."""
    with connect(path) as con:
        return con.execute("SELECT COUNT(*) FROM runs").fetchone()[0]


STATUSES = ("evaluated", "evaluating", "trained", "training", "interrupted", "stopped", "deleted")


def find(ref: str, path: Path | None = None) -> dict[str, Any]:
    """One indexed run by folder path or by name (the newest of that name). Raises KeyError."""
    folder = Path(ref).resolve()
    with connect(path) as con:
        row = con.execute("SELECT * FROM runs WHERE path = ?", [str(folder)]).fetchone()
        row = row or con.execute("SELECT * FROM runs WHERE name = ? ORDER BY created DESC LIMIT 1", [ref]).fetchone()
    if row is None:
        live = row_from_folder(folder) if folder.is_dir() else None
        if live is None:
            raise KeyError(f"no run named or at {ref!r} in the index {path or index_path()} ({command('runs')} lists them)")
        return live
    return dict(row)


def diff_runs(a: dict[str, Any], b: dict[str, Any]) -> dict[str, dict[str, tuple[Any, Any]]]:
    """The settings (dotted config keys) and results (training and evaluation numbers) that differ
    between two index rows: ``{"config": {key: (a, b)}, "results": {key: (a, b)}}``."""
    out = {}
    for part in ("config", "results"):
        x, y = flatten_dict(json.loads(a[part] or "{}")), flatten_dict(json.loads(b[part] or "{}"))
        keep = {k: (x.get(k), y.get(k)) for k in sorted(x.keys() | y.keys()) if x.get(k) != y.get(k)}
        if part == "results":  # numbers and words only, not per-example lists or timings of no interest
            keep = {k: v for k, v in keep.items() if not any(isinstance(s, list) for s in v)
                    and not k.startswith(("eval.disagreements", "eval.forgetting.examples", "eval.label_words"))}
        out[part] = keep
    return out
