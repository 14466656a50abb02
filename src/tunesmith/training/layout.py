"""How the processes share a training step: one process, several with DDP, or several with FSDP2.

``Layout`` is the one object that knows (as litgpt's Fabric does): the loop asks it for this
process's micro-batches, runs ``backward`` through it (DDP's or FSDP's gradient sync on a step's
last pass only), has it ``reduce`` the step's loss over the processes, measure the gradient norm,
validate, and save (process 0 writes; under FSDP every process writes its shard). In a single
process every method is the plain thing.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable

import torch

from tunesmith import runtime
from tunesmith.data.render import Encoded
from tunesmith.models import unwrap
from tunesmith.training import distributed
from tunesmith.training.checkpoint import load_best, load_checkpoint, save_best, save_checkpoint
from tunesmith.training.losses import TaskLoss, target_loss_sum, validation_loss
from tunesmith.training.state import LoopState


class Layout:
    """The processes of this run and how a step's work is split among them.

    ``strategy``: ``"ddp"`` (each process a whole copy, gradients all-reduced) or ``"fsdp"``
    (FSDP2: each process holds a shard of every parameter). With one process both are the
    plain single-process loop."""

    def __init__(self, model: torch.nn.Module, objective: TaskLoss, strategy: str) -> None:
        w = distributed.world()
        self.model, self.objective = model, objective
        self.main, self.rank, self.size, self.distributed = w.main, w.rank, w.size, w.distributed
        self.sharded = w.distributed and strategy == "fsdp"
        self.shards = model if strategy == "fsdp" else None  # checkpoints in Distributed Checkpoint's format (dcp/)
        self.root: torch.nn.Module | None = None  # the loss module DDP or FSDP wraps (several processes)
        if w.distributed:
            self.root = fully_sharded(model, objective, w) if self.sharded else data_parallel(model, objective)

    def passes(self, micro: list[list[int]]) -> list[tuple[list[int], bool, bool]]:
        """This process's passes of a step: (micro-batch, counted, synced). Every process makes as
        many passes as the busiest one under FSDP (each forward gathers parameters from all), at
        least one under DDP; a pass beyond its share (counted False) adds 0. Gradients are synced
        on the last pass only."""
        mine = micro[self.rank :: self.size]
        n = -(-len(micro) // self.size) if self.sharded else max(len(mine), 1)
        return [(mine[k] if k < len(mine) else micro[0], k < len(mine), self.root is None or k == n - 1)
                for k in range(n)]

    def backward(self, batch: dict[str, torch.Tensor], examples: list[Encoded], n_targets: int, counted: bool,
                 synced: bool, bf16: bool) -> float:
        """One micro-batch's loss (normalised over the whole step) and its backward pass; the loss."""
        dev = batch["input_ids"].device
        with runtime.autocast(dev, bf16), no_sync(self.root, synced):
            if self.root is None:
                loss = self.objective.loss(self.model, batch, examples, n_targets)
                loss.backward()
            else:
                loss = self.root(batch, examples, n_targets, counted=counted)
                # DDP and FSDP average gradients over the processes; the loss is already a share of the step's sum
                (loss * self.size).backward()
        return float(loss.detach())

    def reduce(self, step_loss: float, parts: dict[str, float]) -> tuple[float, dict[str, float]]:
        """The step's loss and its summed parts over every process."""
        if self.root is None:
            return step_loss, parts
        summed = [k for k in SUMMED_PARTS if k in parts]
        step_loss, *values = distributed.sum_floats([step_loss] + [parts[k] for k in summed])
        return step_loss, parts | dict(zip(summed, values))

    def clip_grad_norm(self, params: dict[str, torch.nn.Parameter], max_norm: float) -> float:
        """Clip the gradients to ``max_norm``; their norm before (over every process's shards)."""
        norm = torch.nn.utils.clip_grad_norm_(list(params.values()), max_norm)
        if hasattr(norm, "full_tensor"):  # FSDP: a DTensor
            norm = norm.full_tensor()
        return float(norm)

    def validation_loss(self, val_data: Any, batch_size: int, pad_id: int, bf16: bool) -> tuple[float, dict[str, Any]]:
        """The validation loss of the model as it is (process 0 measures; every process gets it)."""
        own = getattr(self.objective, "validation_loss", None)  # a preference objective validates its own loss
        if own is not None and not self.sharded:
            return distributed.broadcast(own(self.model, val_data, batch_size, pad_id, bf16) if self.main else None)
        if self.sharded:  # every process takes part in each forward (its shards are needed)
            measured = validation_loss(self.model, val_data, batch_size, pad_id, bf16,
                                       loss_sum=lambda b: self.root(b, evaluate=True))
        else:
            measured = validation_loss(self.model, val_data, batch_size, pad_id, bf16) if self.main else None
        return distributed.broadcast(measured)

    def any_true(self, flag: bool) -> bool:
        """Whether any process says so (a stop signal reaches one process, every one stops)."""
        return distributed.any_true(flag) if self.distributed else flag

    def save_checkpoint(self, run_dir: Path, params: dict[str, torch.nn.Parameter], optimizer: Any, scheduler: Any,
                        state: LoopState, keep: int, warn: Callable[[str], None]) -> None:
        rngs = distributed.gather(runtime.rng_state())  # every process's RNG, in rank order (on process 0)
        if self.main or self.sharded:  # sharded: every process writes its shard
            save_checkpoint(run_dir, params, optimizer, scheduler, state.to_json(), rngs, keep, warn, model=self.shards,
                            main=self.main)

    def save_interrupted(self, run_dir: Path, params: dict[str, torch.nn.Parameter], optimizer: Any, scheduler: Any,
                         state: LoopState, step_rng: dict[str, Any], keep: int, warn: Callable[[str], None]) -> None:
        """A second Ctrl-C mid-step: the checkpoint before the step, with the step's RNG (redone on resume)."""
        if self.sharded:  # a sharded checkpoint needs every process, which may not be listening now
            warn("stopped at once: no checkpoint of this step (sharded run); the last one is kept")
        elif self.main:  # no collective here: the other processes' RNG is not saved (they start from process 0's)
            save_checkpoint(run_dir, params, optimizer, scheduler, state.to_json(), [step_rng], keep, warn, model=self.shards)

    def save_best(self, run_dir: Path, params: dict[str, torch.nn.Parameter], step: int, val_loss: float,
                  warn: Callable[[str], None]) -> None:
        if self.main or self.sharded:  # sharded: the weights are gathered whole to process 0
            save_best(run_dir, params, step, val_loss, warn, model=self.model if self.sharded else None, main=self.main)

    def load_checkpoint(self, run_dir: Path, params: dict[str, torch.nn.Parameter], optimizer: Any, scheduler: Any,
                        warn: Callable[[str], None]) -> dict[str, Any]:
        return load_checkpoint(run_dir, params, optimizer, scheduler, rank=self.rank, warn=warn, model=self.model,
                               sharded=self.sharded)

    def load_best(self, run_dir: Path, params: dict[str, torch.nn.Parameter], best_step: int | None,
                  warn: Callable[[str], None]) -> None:
        """At the end of training: the weights of ``best_step`` (None: keep the weights as they are)."""
        distributed.barrier()  # process 0's last writes (best, checkpoint) are complete for every process
        if best_step is not None:
            load_best(run_dir, params, model=self.model if self.sharded else None, best_step=best_step, warn=warn)


SUMMED_PARTS = ("ce", "kl")  # loss parts accumulated over micro-batches: summed over the processes too


class StepLoss(torch.nn.Module):
    """The objective's loss as a module, so DistributedDataParallel can wrap it: DDP's forward
    prepares its gradient sync, then this runs the objective on the real model (whose fused
    head loss calls the decoder and the head directly)."""

    def __init__(self, model: torch.nn.Module, objective: TaskLoss) -> None:
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: dict[str, torch.Tensor], examples: list[Encoded] | None = None, n_targets: int = 0,
                counted: bool = True, evaluate: bool = False) -> Any:
        if evaluate:  # validation: the summed loss and its target count (FSDP: through the root's hooks)
            return target_loss_sum(self.model, batch)
        if not counted:  # a process with no micro-batch this step: the same graph, contributing 0
            return target_loss_sum(self.model, batch)[0] * 0.0
        return self.objective.loss(self.model, batch, examples, n_targets)


def data_parallel(model: torch.nn.Module, objective: TaskLoss) -> torch.nn.Module:
    """The loss wrapped in DistributedDataParallel (process group already joined)."""
    from torch.nn.parallel import DistributedDataParallel

    dev = next(model.parameters()).device
    return DistributedDataParallel(StepLoss(model, objective), device_ids=[dev.index] if dev.type == "cuda" else None)


def fully_sharded(model: torch.nn.Module, objective: TaskLoss, w: distributed.World) -> torch.nn.Module:
    """The loss module with FSDP2 (``fully_shard``): each transformer block (the model's
    ``_no_split_modules``, as transformers and Accelerate shard) is its own group, gathered just
    before it runs and freed after; the rest (embeddings, final norm, head) belongs to the root,
    the loss module, so the fused head loss sees whole weights inside its forward. Parameters
    become DTensor shards (in place: same names) and move to this process's device. LoRA works
    as is: FSDP2 shards frozen and trainable tensors alike."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (w.size,))
    blocks = set(getattr(unwrap(model), "_no_split_modules", None) or ())
    for module in list(model.modules()):
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh)
    root = StepLoss(model, objective)
    fully_shard(root, mesh=mesh)
    return root


def no_sync(root: torch.nn.Module | None, synced: bool) -> contextlib.AbstractContextManager[Any]:
    """Gradients of a micro-batch that is not the step's last stay local (no all-reduce or
    reduce-scatter): DDP's ``no_sync``, FSDP2's ``set_requires_gradient_sync(False)``."""
    if root is None or synced:
        return contextlib.nullcontext()
    if hasattr(root, "no_sync"):
        return root.no_sync()
    return fsdp_no_sync(root)


@contextlib.contextmanager
def fsdp_no_sync(root: Any) -> Any:
    root.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        root.set_requires_gradient_sync(True)
