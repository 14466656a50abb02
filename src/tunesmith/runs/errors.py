"""The runs package's error (its own module, so every runs module can raise it)."""

from __future__ import annotations

from pathlib import Path

from tunesmith.errors import TunesmithError


class RunError(TunesmithError, RuntimeError):
    """A run folder is missing, incomplete, or would be overwritten."""


def not_trained(run_dir: Path, artifact: str) -> RunError:
    """The error for a run folder without its trained ``artifact`` (adapter/, model/): the command
    that continues it when it has a checkpoint, else the one that trains it (only its data was
    prepared, or it stopped before its first checkpoint)."""
    from tunesmith.runtime.commands import command

    config = run_dir / "config.yaml"
    if any((run_dir / "checkpoints").glob("step-*")):
        return RunError(f"{run_dir}: no trained {artifact}/ yet; finish training first ({command('train', config, '--resume')})")
    return RunError(f"{run_dir}: no trained {artifact}/ yet, and no checkpoint to resume from; train it first "
                    f"({command('train', config)})")
