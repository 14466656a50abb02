"""tunesmith commands as the user can type them, for every hint that prints one ("continue with: ...").

A user who installed into a virtual environment and runs ``.venv/bin/tunesmith`` has no
``tunesmith`` on PATH: a hint saying ``tunesmith train ...`` would fail for them. The hints say
``tunesmith`` only when that name finds this same program.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

PROGRAM_ENV = "TUNESMITH_PROGRAM"  # set by the torchrun launcher: its workers run as ``python -m tunesmith``


def program() -> str:
    """How to start tunesmith from here: ``tunesmith`` when that name on PATH is the program
    running (or this environment's script, from Python), else the path it was started by
    (``.venv/bin/tunesmith``), else ``<this python> -m tunesmith``."""
    if os.environ.get(PROGRAM_ENV):
        return os.environ[PROGRAM_ENV]
    started = sys.argv[0] if sys.argv and sys.argv[0] else ""
    on_path = shutil.which("tunesmith")
    if Path(started).name == "tunesmith":  # the console script
        return "tunesmith" if on_path and _same_file(on_path, started) else shlex.quote(started)
    script = Path(sys.executable).with_name("tunesmith")  # python -m tunesmith, or the library in a notebook
    if on_path and _same_file(on_path, str(script)):
        return "tunesmith"
    python = shutil.which("python")
    here = "python" if python and os.path.abspath(python) == os.path.abspath(sys.executable) else shlex.quote(sys.executable)
    return f"{here} -m tunesmith"


def command(*words: str | Path) -> str:
    """``tunesmith <words>`` as the user can type it (see ``program``); each word shell-quoted when
    it needs to be (a path with a space), placeholders such as CONFIG or ... left as they are."""
    return " ".join([program(), *(shlex.quote(str(w)) for w in words)])


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
