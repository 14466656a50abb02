"""Atomic file writes: a crash or Ctrl-C never leaves a half-written file behind."""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename it over."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, default_file_mode())  # mkstemp makes 0600: give the file the mode open() would
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def atomic_dir(path: Path, fill: Callable[[Path], None]) -> None:
    """Build a folder in a temporary sibling with ``fill(tmp)``, fsync its files, then rename it
    into place (and fsync the parent folder, so the rename itself survives a power cut).

    An existing folder at ``path`` is replaced only once the new one is complete: it is first
    renamed to ``.<name>.old``; a crash between the two renames leaves that copy, which
    ``recover_dir`` (called here and by readers) renames back. Any error (a full disk) removes the
    temporary folder and leaves ``path`` as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        fill(tmp)
        default_modes(tmp)  # mkdtemp made it 0700; what fill's writers left (safetensors: 0600) too
        fsync_tree(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def recover_dir(path: Path) -> None:
    """Undo a replacement ``atomic_dir`` was killed in the middle of: ``path`` missing but its
    ``.<name>.old`` copy complete."""
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    if not path.exists() and old.is_dir():
        os.replace(old, path)


def fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder``, then each folder (their entries)."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without directory handles: the rename is all we can do
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    """Write records as JSON lines, atomically."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line and flush it (a killed run keeps every line written before)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill: everything before it stands
                break
    return out


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once, at import: setting it later from a thread would race other file creations


def default_file_mode() -> int:
    """The mode ``open()`` gives a new file here (0o666 less the umask)."""
    return 0o666 & ~_UMASK


def default_modes(path: Path) -> None:
    """Give ``path`` (a file, or a folder and everything under it) the modes a plain ``open()`` or
    ``mkdir`` would have: 0o666 (0o777 for folders and executables) less the umask.

    Not every writer honours the umask: safetensors (>= 0.8) writes through a temporary file and
    leaves 0600 (safetensors issue 782), ``mkstemp``/``mkdtemp`` make 0600/0700; a serving user
    other than the trainer could then not read the weights.
    """
    path = Path(path)
    _set_default_mode(path)
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                _set_default_mode(Path(root) / name)


def _set_default_mode(path: Path) -> None:
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode):
        return  # chmod would follow the link to a file that is not ours
    executable = stat.S_ISDIR(st.st_mode) or st.st_mode & 0o111
    want = (0o777 if executable else 0o666) & ~_UMASK
    if stat.S_IMODE(st.st_mode) != want:
        os.chmod(path, want)


def flatten_dict(d: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as ``{dotted.key: leaf}`` (lists and other values are leaves)."""
    if not isinstance(d, dict):
        return {prefix[:-1]: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out |= flatten_dict(v, f"{prefix}{k}.")
    return out
