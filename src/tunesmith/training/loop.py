"""The training loop: one function, read top to bottom, plus the loss and checkpoint helpers.

Loss: summed cross-entropy over target tokens, divided by the number of target tokens in the
whole optimizer step (all micro-batches together), so batch 8 x accum 1 == batch 2 x accum 4.
The LM head runs only at target positions, so the (B, T, V) logits tensor is never built.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from dataclasses import asdict, dataclass, field
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import get_cosine_schedule_with_warmup

from tunesmith import runtime
from tunesmith.training import distributed
from tunesmith.training import flops
from tunesmith.runtime import threads
from tunesmith.runtime.progress import make_progress
from tunesmith.runtime.stopping import StopRequests
from tunesmith.config import TrainConfig
from tunesmith.data.render import Encoded, collate, collate_packed
from tunesmith.models import unwrap
from tunesmith.training.checkpoint import (CHECKPOINTS, latest_checkpoint, load_best, load_checkpoint, load_trainable,  # noqa: F401
                                  save_best, save_checkpoint)
from tunesmith.io import append_jsonl, atomic_write_jsonl, read_jsonl
from tunesmith.training.losses import target_loss_sum

METRICS = "metrics.jsonl"


class OutOfMemoryError(RuntimeError):
    """A training step did not fit in memory; the message names the step, the micro-batch and the
    settings that would use less (smaller micro-batch at the same step size, a token budget,
    gradient checkpointing, shorter rows)."""


class NonFiniteLossError(RuntimeError):
    """A training or validation loss (or the gradient norm) became NaN or infinite; the message
    names the step, the likely causes and the last good checkpoint."""


@dataclass
class TrainResult:
    steps: int  # optimizer steps done
    total_steps: int
    best_step: int | None
    best_val_loss: float | None
    stopped_early: bool
    interrupted: bool
    train_seconds: float
    target_tokens: int
    peak_memory_mib: dict[str, float] = field(default_factory=dict)  # rss (process), gpu (allocator)
    pruned: bool = False  # ended by ``on_validation`` (a search's pruner), not by early stopping
    history: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------- loss


LossSum = Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, int]]


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, data: list[Encoded], batch_size: int, pad_id: int, bf16: bool = False,
                  loss_sum: LossSum | None = None) -> float:
    """Mean loss per target token over ``data`` (model left in its previous mode).
    ``loss_sum``: how a batch's summed loss and target count are computed (default
    ``target_loss_sum(model, batch)``; under FSDP, through the sharded root module)."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(data), batch_size):
        batch = {k: v.to(dev) for k, v in collate(data[i : i + batch_size], pad_id).items()}
        with runtime.autocast(dev, bf16):
            loss, n = loss_sum(batch) if loss_sum else target_loss_sum(model, batch)
        total, count = total + float(loss), count + n
    model.train(was_training)
    return total / max(count, 1)


def validation_loss(model: torch.nn.Module, data: list[Encoded] | dict[str, list[Encoded]], batch_size: int,
                    pad_id: int, bf16: bool = False, loss_sum: LossSum | None = None) -> tuple[float, dict[str, Any]]:
    """The validation loss, and for several tasks (``data`` a dict name -> rows) their losses as
    ``{"task_val_loss": {name: loss}}`` with the loss their macro average (each task counts once,
    whatever its size); ``{}`` for one task."""
    if not isinstance(data, dict):
        return evaluate_loss(model, data, batch_size, pad_id, bf16, loss_sum), {}
    losses = {name: evaluate_loss(model, rows, batch_size, pad_id, bf16, loss_sum) for name, rows in data.items()}
    return sum(losses.values()) / len(losses), {"task_val_loss": losses}


class TaskLoss:
    """The loop's objective with no mitigation: the task cross-entropy, normalised over the step.

    The null object of ``tunesmith.training.mitigations.Mitigations`` (distillation, weight anchoring), which
    has the same four methods; see there. Costs nothing beyond ``target_loss_sum``."""

    def begin_step(self, examples: list[Encoded]) -> None:
        pass

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], examples: list[Encoded],
             n_targets: int) -> torch.Tensor:
        return target_loss_sum(model, batch)[0] / n_targets  # normalised over the whole optimizer step

    def end_step(self) -> float:
        return 0.0

    def parts(self) -> dict[str, float]:
        return {}


# ---------------------------------------------------------------- the loop


def train(
    model: torch.nn.Module,
    train_data: list[Encoded],
    val_data: list[Encoded] | dict[str, list[Encoded]],
    cfg: TrainConfig,
    run_dir: Path,
    pad_id: int,
    resume: bool = False,
    until_step: int | None = None,
    show_progress: bool = True,
    objective: TaskLoss | None = None,
    until_seconds: float | None = None,
    min_steps: int = 1,
    on_validation: Callable[[int, float], bool] | None = None,
) -> TrainResult:
    """Train the parameters of ``model`` that require grad; write metrics and checkpoints.

    ``resume`` continues exactly from the newest checkpoint in ``run_dir``. ``until_step``
    stops (with a checkpoint) after that many optimizer steps, as an interruption would;
    ``until_seconds`` likewise after the first step (at least ``min_steps``) at which this many
    seconds of steps have passed (``runs.estimate`` calibrates with it).
    ``on_validation(step, val_loss)`` is called after each validation; returning True ends the run
    there as early stopping would (``pruned`` in the result: a hyperparameter search's pruner).
    On return the model holds the weights of the best validation loss seen.
    ``val_data`` as a dict (task name -> rows, a multi-task run): each task's loss is logged and
    the validation loss (best checkpoint, early stopping) is their macro average.
    ``objective``: the training loss (``TaskLoss`` by default; ``training.Mitigations`` adds
    distillation and weight anchoring, whose parts are logged with each step).
    """
    objective = objective or TaskLoss()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    runtime.seed_everything(cfg.seed)
    w = distributed.world()  # several processes (torchrun): each takes its share of every step; process 0 writes
    sharded = w.distributed and cfg.strategy == "fsdp"  # FSDP2: each process holds a shard of every parameter
    shards = model if cfg.strategy == "fsdp" else None  # checkpoints in Distributed Checkpoint's format (dcp/)
    root = None  # the loss module that DDP or FSDP wraps (several processes)
    if w.distributed:
        root = _fully_sharded(model, objective, w) if sharded else _data_parallel(model, objective)
    dev = next(model.parameters()).device
    bf16 = runtime.use_bf16(cfg.precision, dev)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}  # under FSDP: DTensor shards
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params.values() if p.ndim >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params.values() if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        fused=None if sharded else _fused_adamw(dev),  # one kernel over all tensors: ~7x faster on CPU than foreach
    )
    lengths = [len(e.input_ids) for e in train_data]
    groups = [(e.kind, e.task) for e in train_data]  # replay vs task rows, and each task: spread over the steps
    groups = groups if len(set(groups)) > 1 else None
    replaying = any(e.kind == "replay" for e in train_data)
    share = sum(e.n_targets for e in train_data) / max(sum(lengths), 1)
    flops_per_token = flops.flops_per_token(model, sum(lengths) / max(len(lengths), 1), share)
    peak = flops.matmul_peak(dev.type, bf16)  # MFU is against what this machine's matmul reaches
    plan = EpochPlan(lengths, cfg, groups)
    state = {"step": 0, "best_val_loss": None, "best_step": None, "bad_evals": 0, "patience_ref": None,
             "target_tokens": 0, "train_seconds": 0.0, "epoch": 0, "epoch_step": 0, "per_step": plan.per_step,
             "rest": None, "val_fingerprint": data_fingerprint(val_data), "train_fingerprint": data_fingerprint(train_data)}
    total_steps = plan.total_steps(state)
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, total_steps)
    progress = make_progress(disable=not (show_progress and w.main))
    say = progress.console.print if w.main else (lambda *a, **k: None)  # process 0 alone speaks
    warn = lambda message: say(f"[yellow]{message}[/yellow]", highlight=False)  # noqa: E731

    if not w.distributed:  # one thread per CPU this process may use, or train.num_threads (tunesmith.runtime.threads)
        threads.use_threads(cfg.num_threads, say if w.main else None)

    def validate() -> tuple[float, dict[str, Any]]:
        """The validation loss of the model as it is (process 0 measures; every process gets it)."""
        if sharded:  # every process takes part in each forward (its shards are needed)
            measured = validation_loss(model, val_data, cfg.batch_size, pad_id, bf16, loss_sum=lambda b: root(b, evaluate=True))
        else:
            measured = validation_loss(model, val_data, cfg.batch_size, pad_id, bf16) if w.main else None
        return distributed.broadcast(measured)

    if resume:
        state = load_checkpoint(run_dir, params, optimizer, scheduler, rank=w.rank, warn=warn, model=model,
                                sharded=sharded)
        state.pop("checkpoint")
        if note := plan.resume(state):
            warn(note)
        if state.get("train_fingerprint") not in (None, data_fingerprint(train_data)):  # other training rows
            state.update(epoch_step=0, rest=None, per_step=plan.per_step, train_fingerprint=data_fingerprint(train_data))
            warn(f"the training data changed since this checkpoint: its place in the old data means nothing in the "
                 f"new, so epoch {state['epoch'] + 1} starts again from the first example of the new data")
        if plan.total_steps(state) != total_steps:  # epochs re-planned at another step size: the schedule's length too
            total_steps, done = plan.total_steps(state), scheduler.last_epoch
            scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, total_steps)
            scheduler.last_epoch = done
        _apply_hyperparameters(optimizer, scheduler, cfg)  # a resume allowed to change them really changes them
        if w.main:
            _truncate_metrics(run_dir / METRICS, state["step"])
        if state.get("val_fingerprint") not in (None, data_fingerprint(val_data)):
            _revalidate(state, validate(), data_fingerprint(val_data), run_dir, params, warn, w.main,
                        model if sharded else None)
    elif (run_dir / METRICS).exists() and w.main:
        (run_dir / METRICS).unlink()

    if cfg.gradient_checkpointing:  # activations recomputed in backward; non-reentrant: frozen inputs are fine
        inner = unwrap(model)
        if hasattr(inner, "activation_checkpointing_enable"):  # transformers 5.x's name
            inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    runtime.reset_peak_memory(dev)
    stopped_early = interrupted = pruned = False
    task = progress.add_task("train", total=total_steps, completed=state["step"], info="")
    window_tokens, window_start = 0, time.perf_counter()
    with progress, StopRequests() as stop:
        while state["step"] < total_steps and not stopped_early:
            step_rng = runtime.rng_state()  # a Ctrl-C mid-step checkpoints this, so resume redoes the step exactly
            micro: list[list[int]] = []  # this step's micro-batches (an out-of-memory message names their rows)
            try:
                # ---- once in a while: nothing; the step first
                t0 = time.perf_counter()
                chunk, epoch_reached, epoch_ends = plan.take(state)
                micro = micro_batches(chunk, lengths, cfg, groups)
                n_targets = sum(train_data[i].n_targets for mb in micro for i in mb)
                objective.begin_step([train_data[i] for mb in micro for i in mb])
                step_loss = 0.0
                mine = micro[w.rank :: w.size]  # this process's micro-batches (all of them in a single process)
                # every process makes as many passes as the busiest one under FSDP (each forward gathers
                # parameters from all), at least one under DDP; a pass beyond its share adds 0
                passes = -(-len(micro) // w.size) if sharded else max(len(mine), 1)
                for k in range(passes):
                    mb = mine[k] if k < len(mine) else micro[0]
                    examples = [train_data[i] for i in mb]
                    rows = collate_packed(examples, pad_id, cfg.max_seq_len) if cfg.packing else collate(examples, pad_id)
                    batch = {k: v.to(dev) for k, v in rows.items()}
                    synced = root is None or k == passes - 1  # gradients are summed on the last pass
                    with runtime.autocast(dev, bf16), _no_sync(root, synced):
                        if root is None:
                            loss = objective.loss(model, batch, examples, n_targets)  # normalised over the whole step
                        else:
                            loss = root(batch, examples, n_targets, counted=k < len(mine))
                        # DDP and FSDP average gradients over the processes; the loss is already a share of the step's sum
                        (loss * w.size if root is not None else loss).backward()
                    step_loss += float(loss.detach())
                    del loss, batch
                    if dev.type == "cpu":
                        runtime.trim_heap()  # keeps RSS near what is in use (glibc holds freed tensors' memory)
                parts = objective.parts()
                if root is not None:  # the step's loss and its parts over every process
                    summed = [k for k in SUMMED_PARTS if k in parts]
                    step_loss, *values = distributed.sum_floats([step_loss] + [parts[k] for k in summed])
                    parts |= dict(zip(summed, values))
                step_loss += objective.end_step()  # weight anchoring: its gradient goes straight into .grad
                parts |= {k: v for k, v in objective.parts().items() if k not in SUMMED_PARTS}
                grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
                if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor; the norm over every process's shards
                    grad_norm = grad_norm.full_tensor()
                if not (math.isfinite(step_loss) and math.isfinite(float(grad_norm))):  # before the update: weights stay good
                    raise NonFiniteLossError(_non_finite(run_dir, state["step"] + 1, "training loss", step_loss,
                                                         float(grad_norm), cfg))
                step_lr = scheduler.get_last_lr()[0]  # the rate this step's update used (logged below)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            except (torch.OutOfMemoryError, RuntimeError) as e:
                if not _is_oom(e):
                    raise
                optimizer.zero_grad(set_to_none=True)
                rows = [len(train_data[i].input_ids) for mb in micro for i in mb]
                raise OutOfMemoryError(_out_of_memory(run_dir, state["step"] + 1, cfg, max(rows, default=0), e)) from None
            except KeyboardInterrupt:  # a second Ctrl-C: stop now; the step is redone on resume
                optimizer.zero_grad(set_to_none=True)
                if sharded:  # a sharded checkpoint needs every process, which may not be listening now
                    warn("stopped at once: no checkpoint of this step (sharded run); the last one is kept")
                elif w.main:  # no collective here: the other processes' RNG is not saved (they start from process 0's)
                    save_checkpoint(run_dir, params, optimizer, scheduler, state, [step_rng], cfg.keep_checkpoints, warn,
                                    model=shards)
                interrupted = True
                break
            state["step"] += 1
            plan.advance(state, epoch_ends)
            state["target_tokens"] += n_targets
            dt = time.perf_counter() - t0
            state["train_seconds"] += dt
            tokens = sum(len(train_data[i].input_ids) for mb in micro for i in mb)
            window_tokens += tokens
            tok_s = window_tokens / max(time.perf_counter() - window_start, 1e-9)
            record = {"type": "train", "step": state["step"], "epoch": epoch_reached,
                      "loss": step_loss, "lr": step_lr, "grad_norm": float(grad_norm),
                      "tokens": tokens, "target_tokens": n_targets, "tokens_per_s": tok_s,
                      "mfu": flops_per_token * tok_s / peak, "step_seconds": dt} | parts
            if replaying:  # what this step really trained on of the replay rows (target tokens)
                record["replay_target_tokens"] = sum(train_data[i].n_targets for mb in micro for i in mb
                                                     if train_data[i].kind == "replay")
            if w.main:
                append_jsonl(run_dir / METRICS, record)
            progress.update(task, advance=1, info=f"loss {step_loss:.4f} | {tok_s:,.0f} tok/s | MFU {record['mfu']:.0%}")

            # ---- once in a while: evaluate, early-stop, checkpoint
            step = state["step"]
            evaluate_now = step % cfg.eval_every == 0 or epoch_ends or step == total_steps
            if evaluate_now:  # process 0 validates; every process gets its result (early stopping stays in step)
                val_loss, task_losses = validate()
                if not math.isfinite(val_loss):  # never "best", never the final model
                    raise NonFiniteLossError(_non_finite(run_dir, step, "validation loss", val_loss, None, cfg))
                best = _early_stopping(state, val_loss, cfg.early_stopping.min_delta)
                if best:
                    state.update(best_val_loss=val_loss, best_step=step)
                    if w.main or sharded:  # sharded: the weights are gathered whole to process 0
                        save_best(run_dir, params, step, val_loss, warn, model=model if sharded else None, main=w.main)
                stopped_early = 0 < cfg.early_stopping.patience <= state["bad_evals"]
                if on_validation is not None and on_validation(step, val_loss) and step < total_steps:
                    stopped_early = pruned = True
                if w.main:
                    append_jsonl(run_dir / METRICS, {"type": "eval", "step": step, "val_loss": val_loss,
                                                     "val_ppl": math.exp(min(val_loss, 50)), "best": best} | task_losses)
                say(f"step {step}: val loss {val_loss:.4f}" + (" (best)" if best else ""))
                window_tokens, window_start = 0, time.perf_counter()  # evaluation time is not training time
            signalled = distributed.any_true(stop.signal is not None) if w.distributed else stop.signal is not None
            out_of_time = until_seconds is not None and state["train_seconds"] >= until_seconds and step >= min_steps
            stop_here = ((until_step is not None and until_step <= step) or signalled or out_of_time) and step < total_steps
            if evaluate_now or stop_here or (cfg.save_every and step % cfg.save_every == 0):
                rngs = distributed.gather(runtime.rng_state())  # every process's RNG, in rank order (on process 0)
                if w.main or sharded:  # sharded: every process writes its shard
                    save_checkpoint(run_dir, params, optimizer, scheduler, state, rngs, cfg.keep_checkpoints, warn,
                                    model=shards, main=w.main)
            if stop_here:
                if signalled:
                    warn(f"{stop.signal or 'a stop signal'}: stopped after step {step} with a checkpoint")
                interrupted = True
                break

    distributed.barrier()  # process 0's last writes (best, checkpoint) are complete for every process
    if not interrupted and state["best_step"] is not None:  # the model ends at its best validation loss
        load_best(run_dir, params, model=model if sharded else None, best_step=state["best_step"], warn=warn)
    return TrainResult(
        steps=state["step"], total_steps=total_steps, best_step=state["best_step"],
        best_val_loss=state["best_val_loss"], stopped_early=stopped_early, interrupted=interrupted,
        train_seconds=state["train_seconds"], target_tokens=state["target_tokens"],
        peak_memory_mib=runtime.peak_memory_mib(dev), pruned=pruned, history=read_jsonl(run_dir / METRICS),
    )


def _apply_hyperparameters(optimizer: torch.optim.Optimizer, scheduler: Any, cfg: TrainConfig) -> None:
    """Put ``cfg``'s learning rate and weight decay into a just-loaded optimizer and scheduler.

    ``load_state_dict`` restores the saved values of both (the scheduler's ``base_lrs`` and each
    group's ``lr``/``weight_decay``); for an unchanged config this is a no-op, for a resume with
    ``--allow-changes`` it makes the new values take effect from the resumed step on, with the
    schedule (warmup, cosine over the new total) of the new config.
    """
    scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    for group, decay, factor in zip(optimizer.param_groups, (cfg.weight_decay, 0.0), scheduler.lr_lambdas):
        group.update(initial_lr=cfg.lr, weight_decay=decay, lr=cfg.lr * factor(scheduler.last_epoch))
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def _early_stopping(state: dict[str, Any], val_loss: float, min_delta: float) -> bool:
    """Update the patience count for ``val_loss``; return whether it is the lowest seen so far.

    Two questions with two answers: the best model is simply the lowest validation loss (a lower
    one always replaces it); ``min_delta`` only decides whether an evaluation counts as progress
    for patience, measured from the loss of the last evaluation that did count (as Keras does).
    """
    ref = state.get("patience_ref", state["best_val_loss"])  # checkpoints written before this key existed
    if ref is None or val_loss < ref - min_delta:
        state.update(patience_ref=val_loss, bad_evals=0)
    else:
        state["bad_evals"] += 1
    return state["best_val_loss"] is None or val_loss < state["best_val_loss"]


def _non_finite(run_dir: Path, step: int, what: str, value: float, grad_norm: float | None, cfg: TrainConfig) -> str:
    """The message for a NaN/inf loss: where, the likely causes, and the checkpoint to go back to."""
    last = latest_checkpoint(run_dir)
    norm = "" if grad_norm is None else f", gradient norm {grad_norm}"
    causes = (f"a learning rate too high for this model (train.lr={cfg.lr:g}; try 3-10x smaller), "
              f"numeric overflow in reduced precision (train.precision={cfg.precision}; try fp32), "
              "or examples with no target tokens / corrupt inputs")
    where = (f"the last good checkpoint is {last} (continue from it with --resume --allow-changes and a smaller "
             "--set train.lr=...)" if last else "no checkpoint was written before it; start again with a smaller train.lr")
    return f"step {step}: the {what} is {value}{norm}; training stopped. Likely causes: {causes}. {where}"


def _is_oom(e: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's failure (a RuntimeError saying so)."""
    text = str(e)
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def _out_of_memory(run_dir: Path, step: int, cfg: TrainConfig, longest: int, error: BaseException) -> str:
    """The message for a step that did not fit: the settings that would, the step size kept."""
    first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    fixes = []
    if cfg.batch_size > 1:
        half = cfg.batch_size // 2
        fixes.append(f"--set train.batch_size={half} --set train.grad_accum={cfg.grad_accum * cfg.batch_size // half} "
                     f"(the same {cfg.batch_size * cfg.grad_accum} examples per step, half the memory for activations)")
    budget = max(longest, 64) * max(cfg.batch_size // 2, 1)
    if not cfg.batch_tokens or cfg.batch_tokens > budget:
        fixes.append(f"--set train.batch_tokens={budget} (caps the padded tokens per micro-batch; long examples go alone)")
    if not cfg.gradient_checkpointing:
        fixes.append("--set train.gradient_checkpointing=true (recomputes activations in backward: far less memory, "
                     "about 30% slower)")
    fixes.append(f"--set train.max_seq_len={max(cfg.max_seq_len // 2, 16)} (shorter rows; longer examples are cut)")
    last = latest_checkpoint(run_dir)
    where = (f"Continue from {last.name} with --resume --allow-changes and one of them" if last
             else "Start again with one of them")
    return (f"step {step} did not fit in memory (micro-batch of {cfg.batch_size} examples, the longest {longest} "
            f"tokens; {first}). Settings that use less memory: " + "; ".join(fixes) + f". {where}.")


def _fused_adamw(dev: torch.device) -> bool | None:
    """torch >= 2.4 has a fused AdamW for CPU and CUDA tensors; None lets torch choose elsewhere."""
    return True if dev.type in ("cpu", "cuda") else None


def epoch_steps(lengths: list[int], cfg: TrainConfig, epoch: int, groups: list[Any] | None = None,
                per_step: int | None = None) -> list[list[int]]:
    """Example indices of each optimizer step of ``epoch``, ``per_step`` examples a step (default
    ``batch_size * grad_accum``; the last step of the epoch may hold fewer).

    The order of an epoch is a permutation seeded by (seed, epoch). With ``group_by_length``, each
    window of 64 steps is sorted by length, cut into steps, and the steps shuffled again: steps
    hold examples of similar length (little padding) without a short-to-long curriculum.

    ``groups`` (one key per example, e.g. task rows vs replay rows, or each task of a multi-task
    run): sorting by length would put a group of longer rows into the same steps (some steps all
    replay, others none). Instead each group is sorted by length apart and spread over the
    window's steps in proportion (every step gets its share of each group, of similar lengths).
    """
    g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    per_step = per_step or cfg.batch_size * cfg.grad_accum
    if not cfg.group_by_length:
        return [order[i : i + per_step] for i in range(0, len(order), per_step)]
    window, steps = per_step * 64, []
    for w0 in range(0, len(order), window):
        chunk = sorted(order[w0 : w0 + window], key=lambda i: -lengths[i])
        if groups is not None:  # rank within its group, as a fraction: groups interleave in proportion
            rank: dict[Any, int] = {}
            size = {k: sum(1 for i in chunk if groups[i] == k) for k in {groups[i] for i in chunk}}
            place = {}
            for i in chunk:
                k = groups[i]
                place[i] = (rank.get(k, 0) + 0.5) / size[k]
                rank[k] = rank.get(k, 0) + 1
            chunk = sorted(chunk, key=lambda i: place[i])
        cut = [chunk[i : i + per_step] for i in range(0, len(chunk), per_step)]
        g_window = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch * 1_009 + w0)
        steps += [cut[k] for k in torch.randperm(len(cut), generator=g_window).tolist()]
    return steps


def micro_batches(chunk: list[int], lengths: list[int], cfg: TrainConfig, groups: list[Any] | None = None) -> list[list[int]]:
    """One step's examples split into micro-batches: ``batch_size`` examples each, or within the
    ``batch_tokens`` budget (longest first). Which examples form a step does not depend on this."""
    if cfg.group_by_length and groups is not None:  # micro-batches of similar lengths within the step
        chunk = sorted(chunk, key=lambda i: -lengths[i])
    if cfg.batch_tokens:
        return _token_budget_batches(chunk, lengths, cfg.batch_size, cfg.batch_tokens)
    return [chunk[i : i + cfg.batch_size] for i in range(0, len(chunk), cfg.batch_size)]


def step_batches(lengths: list[int], cfg: TrainConfig, epoch: int, pos: int,
                  groups: list[Any] | None = None) -> list[list[int]]:
    """Micro-batches of step ``pos`` of ``epoch`` in a run that never changed its step size."""
    return micro_batches(epoch_steps(lengths, cfg, epoch, groups)[pos], lengths, cfg, groups)


class EpochPlan:
    """Which examples each optimizer step takes, and where a run is: the loop state's ``epoch``,
    ``epoch_step`` (steps done in it), ``per_step`` (examples a step) and ``rest`` (when the step
    size changed mid-epoch: that epoch's examples not yet trained, in their order). So a resume
    continues from the same example whatever ``batch_size`` or ``grad_accum`` it brings: every
    example of the epoch is trained once, then the next epoch is planned at the new size."""

    def __init__(self, lengths: list[int], cfg: TrainConfig, groups: list[Any] | None) -> None:
        self.lengths, self.cfg, self.groups = lengths, cfg, groups
        self.per_step = cfg.batch_size * cfg.grad_accum
        self._cached: tuple[tuple[int, int], list[list[int]]] | None = None

    def steps(self, state: dict[str, Any]) -> list[list[int]]:
        """The steps of the current epoch (the rest of it, re-cut, after a change of step size)."""
        if state.get("rest") is not None:
            rest, k = state["rest"], state["per_step"]
            return [rest[i : i + k] for i in range(0, len(rest), k)]
        key = (state["epoch"], state["per_step"])
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, epoch_steps(self.lengths, self.cfg, state["epoch"], self.groups, state["per_step"]))
        return self._cached[1]

    def take(self, state: dict[str, Any]) -> tuple[list[int], float, bool]:
        """This step's examples, the epoch reached once it is done (fractional: examples seen / all)
        and whether it ends the epoch."""
        steps = self.steps(state)
        k = state["epoch_step"]
        before = len(self.lengths) - len(state["rest"]) if state.get("rest") is not None else 0
        seen = before + sum(len(s) for s in steps[: k + 1])
        return steps[k], state["epoch"] + seen / max(len(self.lengths), 1), k + 1 >= len(steps)

    def advance(self, state: dict[str, Any], epoch_ended: bool) -> None:
        if epoch_ended:
            state.update(epoch=state["epoch"] + 1, epoch_step=0, rest=None, per_step=self.per_step)
        else:
            state["epoch_step"] += 1

    def resume(self, state: dict[str, Any]) -> str | None:
        """Bring a checkpoint's position to this config (checkpoints of older versions held only the
        step count); a message when the step size changed and the epoch's rest was re-planned."""
        if "epoch" not in state:
            per_step = state.get("per_step", self.per_step)
            state["epoch"], state["epoch_step"] = divmod(state["step"], math.ceil(len(self.lengths) / per_step))
        state.setdefault("per_step", self.per_step)
        state.setdefault("rest", None)
        if state["per_step"] == self.per_step:
            return None
        old = state["per_step"]
        rest = [i for step in self.steps(state)[state["epoch_step"]:] for i in step]
        state.update(rest=rest, epoch_step=0, per_step=self.per_step)
        return (f"examples per step changed from {old} to {self.per_step} (train.batch_size x train.grad_accum): the "
                f"{len(rest)} examples of epoch {state['epoch'] + 1} not yet trained are trained next, at the new size, "
                "from where the run stopped")

    def total_steps(self, state: dict[str, Any]) -> int:
        """``max_steps``, else the steps done plus those left in this epoch and the epochs after it."""
        if self.cfg.max_steps:
            return self.cfg.max_steps
        if state["epoch"] >= self.cfg.epochs:
            return state["step"]
        per_epoch = math.ceil(len(self.lengths) / self.per_step)
        left = len(self.steps(state)) - state["epoch_step"]
        return state["step"] + left + (self.cfg.epochs - state["epoch"] - 1) * per_epoch


def data_fingerprint(data: list[Encoded] | dict[str, list[Encoded]]) -> str:
    """A hash of encoded rows (ids and targets; each task's, for several): equal data, equal hash.
    Saved with each checkpoint, so a resume on another validation set is noticed."""
    h = hashlib.sha256()
    for name, rows in sorted(data.items()) if isinstance(data, dict) else [("", data)]:
        h.update(name.encode())
        for e in rows:
            h.update(repr((e.input_ids, e.labels, e.class_label)).encode())
    return h.hexdigest()[:16]


def _revalidate(state: dict[str, Any], measured: tuple[float, dict[str, Any]], fingerprint: str, run_dir: Path,
                params: dict[str, torch.nn.Parameter], warn: Callable[[str], None], main: bool,
                model: torch.nn.Module | None) -> None:
    """The validation set changed since the checkpoint (new data, another split, another length):
    the best-so-far loss was measured on the old one and means nothing now. The resumed weights
    are measured on the new set and become the best so far; patience starts again."""
    val_loss, task_losses = measured
    old, old_step = state.get("best_val_loss"), state.get("best_step")
    state.update(best_val_loss=val_loss, best_step=state["step"], patience_ref=val_loss, bad_evals=0,
                 val_fingerprint=fingerprint)
    if main or model is not None:
        save_best(run_dir, params, state["step"], val_loss, warn, model=model, main=main)
    if main:
        append_jsonl(run_dir / METRICS, {"type": "eval", "step": state["step"], "val_loss": val_loss,
                                         "val_ppl": math.exp(min(val_loss, 50)), "best": True, "revalidated": True}
                     | task_losses)
    warn(f"the validation set changed since this checkpoint: the weights of step {state['step']} score {val_loss:.4f} "
         f"on the new one and are the best so far (the earlier best, "
         + (f"{old:.4f} at step {old_step}" if old is not None else "none")
         + ", was measured on the old validation set and is discarded)")


def _token_budget_batches(chunk: list[int], lengths: list[int], max_examples: int, budget: int) -> list[list[int]]:
    """Split one step's examples into micro-batches of at most ``budget`` padded tokens (and
    ``max_examples`` examples), longest first: memory is bounded by the budget, whatever the
    lengths, while short examples still share a micro-batch. An example longer than the budget
    goes alone. The step's loss is the same however it is split (normalised over the step)."""
    out: list[list[int]] = []
    current: list[int] = []
    for i in sorted(chunk, key=lambda j: -lengths[j]):
        if current and (len(current) >= max_examples or lengths[current[0]] * (len(current) + 1) > budget):
            out.append(current)
            current = []
        current.append(i)
    return out + ([current] if current else [])


SUMMED_PARTS = ("ce", "kl")  # loss parts accumulated over micro-batches: summed over the processes too


class _StepLoss(torch.nn.Module):
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


def _data_parallel(model: torch.nn.Module, objective: TaskLoss) -> torch.nn.Module:
    """The loss wrapped in DistributedDataParallel (process group already joined)."""
    from torch.nn.parallel import DistributedDataParallel

    dev = next(model.parameters()).device
    return DistributedDataParallel(_StepLoss(model, objective), device_ids=[dev.index] if dev.type == "cuda" else None)


def _fully_sharded(model: torch.nn.Module, objective: TaskLoss, w: distributed.World) -> torch.nn.Module:
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
    root = _StepLoss(model, objective)
    fully_shard(root, mesh=mesh)
    return root


def _no_sync(root: torch.nn.Module | None, synced: bool) -> contextlib.AbstractContextManager[Any]:
    """Gradients of a micro-batch that is not the step's last stay local (no all-reduce or
    reduce-scatter): DDP's ``no_sync``, FSDP2's ``set_requires_gradient_sync(False)``."""
    if root is None or synced:
        return contextlib.nullcontext()
    if hasattr(root, "no_sync"):
        return root.no_sync()
    return _fsdp_no_sync(root)


@contextlib.contextmanager
def _fsdp_no_sync(root: Any) -> Any:
    root.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        root.set_requires_gradient_sync(True)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint we resume from."""
    atomic_write_jsonl(path, [r for r in read_jsonl(path) if r.get("step", 0) <= step])


def result_dict(result: TrainResult) -> dict[str, Any]:
    d = asdict(result)
    d.pop("history")
    return d
