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
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


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
        if torch.cuda.is_available():
            torch.cuda.set_device(w.local_rank)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return w


def shutdown() -> None:
    """Leave the process group (after the last collective)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Process 0 runs the block first (it may write: prepared data, caches); the others run it
    after, and find what it wrote."""
    w = world()
    if w.distributed and not w.main:
        barrier()
    try:
        yield
    finally:
        if w.distributed and w.main:
            barrier()


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
    ``nnodes``); return torchrun's exit code. One node: ``--standalone``; several: a c10d
    rendezvous at ``rdzv_endpoint`` (host:port of node 0), the same command on every node with
    its own ``node_rank``. SIGTERM sent to this process is passed on to torchrun (which passes it
    to the workers: they finish the step, checkpoint and exit), and this waits for them; Ctrl-C
    reaches them all from the terminal, and this waits too. Raises ValueError when several nodes have no endpoint."""
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
    command = run + ["-m", "tunesmith", *argv]
    proc = subprocess.Popen(command, env=env)
    forwarded: list[int] = []

    def forward(signum: int, frame: Any) -> None:  # a stop for the launcher is a stop for the run
        forwarded.append(signum)
        if signum == signal.SIGINT:  # Ctrl-C reaches the whole terminal group (torchrun, workers) by itself
            return
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:  # a handler raced the wait: keep waiting for the checkpoint
                continue
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)

