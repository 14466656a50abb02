"""Training on several processes with PyTorch's own stack: torchrun starts them, DDP syncs gradients.

``tunesmith train CONFIG --nproc N`` (or ``torchrun --nproc-per-node N -m tunesmith train CONFIG``)
runs one process per device (or per CPU share on a CPU machine: gloo). Every process reads the
same prepared data and takes its share of each optimizer step's micro-batches, so a global step
trains on the same examples as the single-process run; the loss is normalised by the target
tokens of the whole global step, and gradients are summed across processes by
``torch.nn.parallel.DistributedDataParallel``. Process 0 alone prepares data (the others wait, then
reuse it), logs, validates, writes checkpoints and evaluates.

This module holds the little the loop needs: who am I (``World``), joining the process group,
"main first" sections, and the few collectives the loop uses (a sum, a broadcast, a gather).
Everything is a no-op in a single process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from tunesmith.errors import TunesmithError
from tunesmith.runtime.commands import PROGRAM_ENV, program


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (torchrun's RANK, WORLD_SIZE, LOCAL_RANK)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world() -> World:
    """The world as torchrun describes it in the environment (one process when unset)."""
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


def init() -> World:
    """Join the process group when started by torchrun (nccl on CUDA, gloo on CPU); pin this
    process to its GPU. Idempotent; a single process does nothing."""
    w = world()
    if w.distributed and not dist.is_initialized():
        _stop_with_parent()  # torchrun killed (kill -9): this worker stops too (SIGTERM: checkpoint, exit)
        if torch.cuda.is_available():
            torch.cuda.set_device(w.local_rank)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return w


EXIT_FILE = "TUNESMITH_EXIT_FILE"  # set by ``launch``: process 0 writes the exit code the launcher returns


def under_launcher() -> bool:
    """This process is a worker started by ``tunesmith train --nproc`` (not by torchrun directly)."""
    return bool(os.environ.get(EXIT_FILE)) and "WORLD_SIZE" in os.environ


def report_exit(code: int) -> int:
    """A worker's exit code under the launcher: process 0 writes the run's real code (2: refused,
    75: stopped resumable) for the launcher to return, and every worker exits 0 for a planned
    stop, so torchrun does not report it as a crash with a traceback. Elsewhere ``code`` as is."""
    if not under_launcher():
        return code
    if world().main:
        with open(os.environ[EXIT_FILE], "w") as f:
            f.write(str(code))
    return 0 if code in (0, 2, 75) else code


def _stop_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies (prctl PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(sig), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def shutdown() -> None:
    """Leave the process group (after the last collective)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class MainFailed(TunesmithError, RuntimeError):
    """Raised on the processes that did not fail when another one failed inside ``main_first``
    (the one that failed raises its own error; process 0 prints what failed where). They stop
    instead of waiting for it in the next collective or crashing on a closed link."""


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Process 0 runs the block first (it may write: prepared data, caches); the others run it
    after, and find what it wrote. If any process fails in the block, all stop: the others raise
    MainFailed naming the first failure."""
    w = world()
    if not w.distributed:
        yield
        return
    if not w.main:
        failed = broadcast(None)  # process 0's outcome: None, or its error
        if failed:
            raise MainFailed(f"process 0 stopped: {failed}")
    error: BaseException | None = None
    try:
        yield
    except BaseException as e:
        error = e
    mine = None if error is None else f"{type(error).__name__}: {error}"
    if w.main:
        broadcast(mine)  # the followers wait for this before running the block
        if error is not None:  # the followers stop at the broadcast above: no gathering
            raise error
    outcomes = all_gather(mine)  # the followers' outcomes, for everyone: one failure stops them all
    if error is not None:
        raise error
    failed = next((f"process {r}: {o}" for r, o in enumerate(outcomes) if o), None)
    if failed:
        raise MainFailed(failed)


def all_gather(obj: Any) -> list[Any]:
    """Every process's ``obj`` in rank order, on every process (pickled)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def sum_floats(values: list[float]) -> list[float]:
    """Each value summed over the processes (float64 on the collective's device)."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return t.tolist()


def any_true(flag: bool) -> bool:
    """True on every process when it is true on any."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([int(flag)], device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast(obj: Any) -> Any:
    """Process 0's ``obj`` on every process (pickled)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any) -> list[Any] | None:
    """Every process's ``obj`` in rank order on process 0 (None elsewhere)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def launch(argv: list[str], nproc: int, nnodes: int = 1, node_rank: int = 0, rdzv_endpoint: str | None = None) -> int:
    """Run ``tunesmith <argv>`` under torchrun with ``nproc`` processes on this node (of
    ``nnodes``); return the run's exit code (what process 0 reported: 0, 2 refused, 75 stopped
    resumable; else torchrun's). One node: ``--standalone``; several: a c10d rendezvous at
    ``rdzv_endpoint`` (host:port of node 0), the same command on every node with its own
    ``node_rank``. SIGTERM or Ctrl-C sent to this process is passed to the workers themselves
    (the first: they finish the step, checkpoint and exit; a second Ctrl-C: at once), and this
    waits for them. Raises ValueError when several nodes have no endpoint."""
    if nnodes > 1 and not rdzv_endpoint:
        raise ValueError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (node 0's address, the same on every node)")
    run = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    if nnodes > 1:
        run += [f"--nnodes={nnodes}", f"--node-rank={node_rank}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}"]
    else:
        run += ["--standalone"]
    env = dict(os.environ)
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in env:  # split the cores, do not oversubscribe
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    fd, exit_file = tempfile.mkstemp(prefix="tunesmith-exit-")
    os.close(fd)
    env[EXIT_FILE] = exit_file
    env.setdefault(PROGRAM_ENV, program())  # the workers' hints name the program the user typed, not python -m
    command = run + ["-m", "tunesmith", *argv]
    # torchrun in its own session: a Ctrl-C in the terminal reaches this launcher only, which passes
    # it to the workers themselves (torchrun would give them 30 s, then kill them mid-checkpoint);
    # and if this launcher is killed (kill -9), Linux sends torchrun SIGTERM, which stops the workers
    proc = subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=_stop_with_parent)

    def forward(signum: int, frame: Any) -> None:  # a stop for the launcher is a stop for the run
        for pid in children(proc.pid) or [proc.pid]:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            try:
                code = proc.wait()
                break
            except KeyboardInterrupt:  # a handler raced the wait: keep waiting for the checkpoint
                continue
        try:
            told = open(exit_file).read().strip()
        except OSError:
            told = ""
        return int(told) if code == 0 and told.isdigit() else code
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        with contextlib.suppress(OSError):
            os.unlink(exit_file)


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (torchrun's: the workers), from /proc (Linux; [] elsewhere)."""
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        return []
    return out
