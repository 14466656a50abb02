"""What a run is doing now, for the dashboard: ``phase.json`` in the run folder.

Training writes ``metrics.jsonl`` as it goes, but the phases around it (preparing the data,
saving, the final evaluation, which can take longer than training, the forgetting check,
writing the report) left no trace, so a run evaluating for 20 minutes looked like "training:
step 8 of 8". ``set_phase`` records the phase with its progress (done, total, ETA) and the
process id; ``current_phase`` returns it while that process is alive, None otherwise (a killed
run's last phase is not shown as live).
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any

from tunesmith.io import atomic_write_json

FILE = "phase.json"


def set_phase(run_dir: str | Path, phase: str, detail: str = "", completed: float | None = None,
              total: float | None = None, eta_s: float | None = None) -> None:
    """Record ``phase`` (e.g. "evaluating") with ``detail`` (e.g. "tuned model") and its progress.
    Never fails the run: a folder that cannot be written only loses the display."""
    doc: dict[str, Any] = {"phase": phase, "detail": detail, "completed": completed, "total": total,
                           "eta_s": None if eta_s is None else round(float(eta_s), 1), "pid": os.getpid(),
                           "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        atomic_write_json(Path(run_dir) / FILE, doc)
    except OSError:
        pass


def clear_phase(run_dir: str | Path) -> None:
    """The run is no longer busy (finished, or stopped with what it had saved)."""
    try:
        (Path(run_dir) / FILE).unlink()
    except OSError:
        pass


def current_phase(run_dir: str | Path) -> dict[str, Any] | None:
    """The recorded phase while the process that wrote it is alive; None otherwise."""
    try:
        doc = json.loads((Path(run_dir) / FILE).read_text(encoding="utf-8"))
        pid = int(doc["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return doc if _alive(pid) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True
