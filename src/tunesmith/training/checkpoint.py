"""Checkpoints that survive a kill -9, a full disk and a flipped byte.

A checkpoint is ``checkpoints/step-N/`` in the run folder: the trainable weights
(``trainable.safetensors``), the optimizer and scheduler states, the RNG states of every process
(``rng.pt``), the loop state (``state.json``: step, early stopping, counters) and
``manifest.json``, written last, with each file's size and SHA-256. It is built in a temporary
sibling folder, fsynced and renamed into place (``io.atomic_dir``), so a kill at any moment
leaves either the whole checkpoint or none. The newest ``keep`` are kept; older ones are deleted
only after a new one is complete.

Under ``train.strategy: fsdp`` the weights and optimizer state are sharded across the processes;
they are written with PyTorch Distributed Checkpoint instead (``dcp/``: one file per process and
a ``.metadata`` index, in the same manifest), which loads at any number of processes, one
included, and the best model is gathered whole into ``best/trainable.safetensors``.

At resume the newest checkpoint is checked against its manifest; a truncated, altered or
unreadable one is skipped for the one before, and the run says which and why. A checkpoint that
cannot be written (a full disk, a quota) leaves the previous one untouched; training goes on and
says so, and the next save tries again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tunesmith.errors import TunesmithError
from tunesmith import runtime
from tunesmith.training import distributed
from tunesmith.runtime.commands import command
from tunesmith.io import atomic_dir, recover_dir

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
BEST = "best"
SHARDS = "dcp"  # the Distributed Checkpoint subfolder of an FSDP run's checkpoint


class CheckpointError(TunesmithError, RuntimeError):
    """No usable checkpoint: every candidate was missing, damaged or unreadable (the message lists each)."""


def save_checkpoint(run_dir: Path, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                    scheduler: Any, state: dict[str, Any], rng: dict[str, Any] | list[dict[str, Any]], keep: int,
                    warn: Callable[[str], None] | None = None, model: torch.nn.Module | None = None,
                    main: bool = True) -> Path | None:
    """Write ``checkpoints/step-N/`` atomically with its manifest and prune all but the newest
    ``keep``. ``rng``: this process's RNG states, or a list of every process's (rank order).

    ``model`` given (``train.strategy: fsdp``): the weights and optimizer state go into ``dcp/``
    with Distributed Checkpoint, which every process must call (each writes its shard); only the
    ``main`` process writes the rest and renames the folder into place. Otherwise process 0 alone calls.

    Returns the folder (None on other processes), or None when it could not be written (OSError:
    a full disk, no permission): then ``warn`` is told (raised when ``warn`` is None) and nothing
    older is removed."""
    root = Path(run_dir) / CHECKPOINTS
    out = root / f"step-{state['step']}"
    staging = root / f".{out.name}.{SHARDS}"  # every process's shard is written here first
    error: BaseException | None = None
    if model is not None:
        error = _save_shards(staging, model, optimizer, main)
        if not main:
            return None

    def fill(tmp: Path) -> None:
        if error is not None:
            raise error
        if model is not None:
            os.replace(staging, tmp / SHARDS)
        else:
            _save_trainable(_whole(params), tmp)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
        write_manifest(tmp, {"step": state["step"]})

    try:
        atomic_dir(out, fill)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        if warn is None:
            raise
        previous = latest_checkpoint(run_dir)
        warn(f"checkpoint {out.name} could not be written ({e.strerror or e}); "
             + (f"the previous one, {previous.name}, is intact" if previous else "there is no earlier checkpoint")
             + "; training goes on and the next save tries again")
        return None
    for old in sorted(_step_dirs(root), key=_step_of)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return out


def _save_shards(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, main: bool) -> OSError | None:
    """Every process writes its shard of the trainable weights and optimizer state into ``folder``
    (Distributed Checkpoint; process 0 also the ``.metadata`` index). A collective. Returns the
    error (as an OSError, the same on every process) instead of raising, so that all go on."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    if main:
        shutil.rmtree(folder, ignore_errors=True)  # a killed save's leftovers
        folder.mkdir(parents=True)
    distributed.barrier()
    try:
        weights, optim = get_state_dict(model, optimizer, options=_dcp_options())
        dcp.save({"model": weights, "optim": optim}, checkpoint_id=str(folder))
        return None
    except Exception as e:  # noqa: BLE001  (dcp raises CheckpointException, wrapping each process's OSError)
        if not isinstance(e, OSError) and "CheckpointException" not in type(e).__name__:
            raise
        return e if isinstance(e, OSError) else OSError(str(e).splitlines()[0][:300])


def _dcp_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=False)  # trainable tensors only (LoRA: the adapters)


def _whole(params: dict[str, torch.nn.Parameter], model: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The trainable tensors whole, on the CPU. Under FSDP (``model`` given) they are gathered from
    every process: a collective that every process must call; process 0 gets them, the others {}."""
    if model is None:
        return {n: p.detach().contiguous().cpu() for n, p in params.items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                ignore_frozen_params=True))
    return {n: full[n].contiguous() for n in params if n in full}


def save_best(run_dir: Path, params: dict[str, torch.nn.Parameter], step: int, val_loss: float,
              warn: Callable[[str], None] | None = None, model: torch.nn.Module | None = None,
              main: bool = True) -> bool:
    """Write ``checkpoints/best/`` (weights of the best validation loss so far) atomically.
    ``model`` given (FSDP): every process calls, the weights are gathered whole and ``main`` writes.
    Returns False (after ``warn``) when it could not be written; the earlier best stays."""
    tensors = _whole(params, model)
    if not main:
        return True

    def fill(tmp: Path) -> None:
        _save_trainable(tensors, tmp)
        (tmp / "state.json").write_text(json.dumps({"step": step, "val_loss": val_loss}))
        write_manifest(tmp, {"step": step})

    try:
        atomic_dir(Path(run_dir) / CHECKPOINTS / BEST, fill)
    except OSError as e:
        if warn is None:
            raise
        warn(f"the best model (step {step}) could not be written ({e.strerror or e}); the earlier best is kept")
        return False
    return True


def write_manifest(folder: Path, extra: dict[str, Any]) -> None:
    """``manifest.json``: every other file's size in bytes and SHA-256 (by path relative to
    ``folder``, subfolders included), plus ``extra``."""
    files = {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p != folder / MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"format": 1, **extra, "files": files}, indent=2))


def verify(folder: Path) -> str | None:
    """What is wrong with a checkpoint folder (each damaged file, joined by "; "), or None when
    every file matches its manifest. A folder written before manifests existed is accepted as it is."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return None if (folder / "state.json").is_file() else "no manifest.json and no state.json"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"manifest.json unreadable ({e})"
    key = (str(folder), tuple((n, *_stamp(folder / n)) for n in files))  # the files as they are now
    if key in _VERIFIED:  # checked in this process and untouched since: a resume does not hash them twice
        return _VERIFIED[key]
    problems = []
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif (size := path.stat().st_size) != want["bytes"]:
            problems.append(f"{name} has {size:,} bytes, the manifest says {want['bytes']:,} (truncated?)")
        elif _sha256(path) != want["sha256"]:
            problems.append(f"{name} does not match its SHA-256 in the manifest (altered on disk)")
    answer = "; ".join(problems) or None
    settled = time.time_ns() - 2_000_000_000
    if all(mtime < settled for _, _, mtime in key[1]):  # as git does: a file changed within
        _VERIFIED[key] = answer  # the timestamp granularity of its last check could change again unseen
    return answer


_VERIFIED: dict[tuple[Any, ...], str | None] = {}  # verify's answers by folder and its files' (size, mtime)


def _stamp(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
        return st.st_size, st.st_mtime_ns
    except OSError:
        return -1, -1


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest ``step-N`` folder (not checked; see ``load_checkpoint``), or None."""
    dirs = _step_dirs(Path(run_dir) / CHECKPOINTS)
    return max(dirs, key=_step_of) if dirs else None


def newest_good_checkpoint(run_dir: Path) -> Path | None:
    """The newest ``step-N`` folder that matches its manifest (what ``load_checkpoint`` will use,
    unless a file fails to load), or None."""
    for ckpt in sorted(_step_dirs(Path(run_dir) / CHECKPOINTS), key=_step_of, reverse=True):
        if verify(ckpt) is None:
            return ckpt
    return None


def load_checkpoint(run_dir: Path, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                    scheduler: Any, rank: int = 0, warn: Callable[[str], None] = print,
                    model: torch.nn.Module | None = None, sharded: bool = False) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and this process's RNG from the newest good
    checkpoint; return its loop state (``state.json``, with ``checkpoint``: the folder used).

    A checkpoint written under FSDP (``dcp/``) is read with Distributed Checkpoint into ``model``
    (needed then), at whatever number of processes this run has: a collective when distributed.
    ``sharded``: this run's parameters are FSDP shards, which cannot take a checkpoint of whole
    weights (written by ``train.strategy: ddp``): CheckpointError says so.

    A damaged checkpoint (see ``verify``) or one that fails to load is skipped for the one
    before it, and ``warn`` names both. Raises FileNotFoundError when there is no checkpoint and
    CheckpointError when none is usable."""
    root = Path(run_dir) / CHECKPOINTS
    candidates = sorted(_step_dirs(root), key=_step_of, reverse=True)
    if not candidates:
        raise FileNotFoundError(f"{run_dir}: no checkpoint to resume from (looked in {CHECKPOINTS}/)")
    problems = []
    for i, ckpt in enumerate(candidates):
        problem = verify(ckpt)
        if problem is None and sharded and not (ckpt / SHARDS).is_dir():
            raise CheckpointError(f"{ckpt} holds whole weights (written with train.strategy: ddp or one process); "
                                  "this run shards them (train.strategy: fsdp). Resume with --set train.strategy=ddp")
        if problem is None:
            try:
                if (ckpt / SHARDS).is_dir():
                    if model is None:
                        raise ValueError("a sharded (dcp/) checkpoint needs the model to load into")
                    _load_shards(ckpt / SHARDS, model, optimizer)
                else:
                    load_trainable(ckpt, params)
                    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
                scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
                rng = torch.load(ckpt / "rng.pt", weights_only=False)
                state = json.loads((ckpt / "state.json").read_text())
            except (OSError, ValueError, RuntimeError, KeyError, EOFError) as e:
                problem = f"it failed to load ({type(e).__name__}: {str(e)[:200]})"
            else:
                if isinstance(rng, list):  # one per process: this rank's, or rank 0's for a new rank
                    rng = rng[rank] if rank < len(rng) else rng[0]
                runtime.set_rng_state(rng)
                return state | {"checkpoint": str(ckpt)}
        problems.append(f"{ckpt.name}: {problem}")
        following = candidates[i + 1].name if i + 1 < len(candidates) else None
        warn(f"checkpoint {ckpt} is damaged: {problem}; "
             + (f"resuming from the one before it, {following}" if following else "no earlier checkpoint is left"))
    raise CheckpointError(f"{run_dir}: no usable checkpoint: " + "; ".join(problems)
                          + f". Start the run again: {command('train', 'CONFIG', '--overwrite')} (the prepared data is kept)")


def _load_shards(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read a Distributed Checkpoint of trainable weights and optimizer state into ``model`` and
    ``optimizer``, resharded to this run's processes (one process: whole tensors)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    weights, optim = get_state_dict(model, optimizer, options=_dcp_options())
    dcp.load({"model": weights, "optim": optim}, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optim, options=_dcp_options())


def load_best(run_dir: Path, params: dict[str, torch.nn.Parameter], model: torch.nn.Module | None = None,
              best_step: int | None = None, warn: Callable[[str], None] | None = None) -> None:
    """Load ``checkpoints/best/`` into ``params`` (after checking it); under FSDP (``model``
    given: every process calls) each process keeps its shard.

    A damaged or missing ``best/`` is not the end of the run: the step checkpoint of the same step
    (``best_step``, from the loop state) holds the same weights; they are loaded and ``best/`` is
    written again from them (``warn`` says so). Raises CheckpointError, naming the way forward,
    when no intact copy of the best weights is left."""
    folder = Path(run_dir) / CHECKPOINTS / BEST
    recover_dir(folder)
    problem = verify(folder) if folder.is_dir() else "it is missing"
    source = folder
    if problem:
        source = _same_step(run_dir, best_step)
        if source is None:
            kept = latest_checkpoint(run_dir)
            raise CheckpointError(
                f"{folder}: {problem}, and no intact checkpoint of its step ({best_step if best_step is not None else '?'}) "
                "is kept, so the best weights are lost. "
                + (f"To end the run with the weights of {kept.name} instead, delete {folder} and resume "
                   f"({command('train', 'CONFIG', '--resume', '--allow-changes')} with a larger train.max_steps "
                   "trains on from there); or start again " if kept else "Start again ")
                + f"with {command('train', 'CONFIG', '--overwrite')} (the prepared data is kept)")
        if warn is not None:
            warn(f"{folder} is damaged ({problem}); its weights are taken from {source.name} (the same step) "
                 "and best/ is written again from them")
    if model is None:
        load_trainable(source, params)
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        if (source / SHARDS).is_dir():
            raise CheckpointError(f"{folder}: {problem}; its step checkpoint {source.name} is sharded and cannot stand "
                                  f"in for it. Start again with {command('train', 'CONFIG', '--overwrite')}")
        set_model_state_dict(model, load_file(str(source / "trainable.safetensors")),
                             options=StateDictOptions(full_state_dict=True, strict=False))
    if source is not folder and model is None:
        state = json.loads((source / "state.json").read_text())
        save_best(run_dir, params, int(state["step"]), float(state.get("best_val_loss") or float("nan")), warn)


def _same_step(run_dir: Path, step: int | None) -> Path | None:
    """The intact ``step-N`` checkpoint of step ``step`` (whole weights), or None."""
    if step is None:
        return None
    ckpt = Path(run_dir) / CHECKPOINTS / f"step-{step}"
    return ckpt if ckpt.is_dir() and (ckpt / "trainable.safetensors").is_file() and verify(ckpt) is None else None


def load_trainable(ckpt: Path, params: dict[str, torch.nn.Parameter]) -> None:
    """Copy ``trainable.safetensors`` of ``ckpt`` into ``params``. ValueError when a tensor is missing."""
    saved = load_file(str(ckpt / "trainable.safetensors"))
    missing = set(params) - set(saved)
    if missing:
        raise ValueError(f"{ckpt}: checkpoint lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[0]}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n])


def _save_trainable(tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """The trainable tensors (whole, on the CPU) as ``folder/trainable.safetensors`` (what ``load_trainable`` reads)."""
    save_file(tensors, str(folder / "trainable.safetensors"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _step_of(path: Path) -> int:
    return int(path.name.split("-")[1])


def _step_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]
