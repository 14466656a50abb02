"""The training loop: one function, read top to bottom, plus the loss and checkpoint helpers.

Loss: summed cross-entropy over target tokens, divided by the number of target tokens in the
whole optimizer step (all micro-batches together), so batch 8 x accum 1 == batch 2 x accum 4.
The LM head runs only at target positions, so the (B, T, V) logits tensor is never built.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, field
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import get_cosine_schedule_with_warmup

from tunesmith.errors import TunesmithError
from tunesmith import runtime
from tunesmith.training import flops, prefix
from tunesmith.runtime import threads
from tunesmith.runtime.progress import make_progress
from tunesmith.runtime.stopping import StopRequests
from tunesmith.config import TrainConfig
from tunesmith.data.render import Encoded, collate, collate_packed
from tunesmith.models import unwrap
from tunesmith.training.checkpoint import (CHECKPOINTS, latest_checkpoint, load_best, load_checkpoint, load_trainable,  # noqa: F401
                                  save_best, save_checkpoint)
from tunesmith.io import append_jsonl, atomic_write_jsonl, read_jsonl
from tunesmith.training.layout import SUMMED_PARTS, Layout
from tunesmith.training.state import LoopState
from tunesmith.training.losses import TaskLoss

METRICS = "metrics.jsonl"


class OutOfMemoryError(TunesmithError, RuntimeError):
    """A training step did not fit in memory; the message names the step, the micro-batch and the
    settings that would use less (smaller micro-batch at the same step size, a token budget,
    gradient checkpointing, shorter rows)."""


class NonFiniteLossError(TunesmithError, RuntimeError):
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
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    runtime.seed_everything(cfg.seed)
    layout = Layout(model, objective or TaskLoss(), cfg.strategy)  # one process, DDP or FSDP: who does what
    dev = next(model.parameters()).device
    bf16 = runtime.use_bf16(cfg.precision, dev)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}  # under FSDP: DTensor shards
    optimizer = _adamw(params, cfg, dev, layout.sharded)
    data = _DataFacts.of(train_data, model, dev, bf16)
    plan = EpochPlan(data.lengths, cfg, data.groups)
    state = LoopState(per_step=plan.per_step, val_fingerprint=data_fingerprint(val_data),
                      train_fingerprint=data_fingerprint(train_data))  # what a checkpoint saves besides the weights
    total_steps = plan.total_steps(state)
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, total_steps)
    progress = make_progress(disable=not (show_progress and layout.main))
    say = progress.console.print if layout.main else (lambda *a, **k: None)  # process 0 alone speaks
    warn = lambda message: say(f"[yellow]{message}[/yellow]", highlight=False)  # noqa: E731
    _announce(layout, cfg, data, bf16, say)
    validate = lambda: layout.validation_loss(val_data, cfg.batch_size, pad_id, bf16)  # noqa: E731
    if resume:
        state, scheduler, total_steps = _resume(layout, run_dir, params, optimizer, scheduler, total_steps, plan, cfg,
                                                train_data, val_data, validate, warn)
    elif (run_dir / METRICS).exists() and layout.main:
        (run_dir / METRICS).unlink()
    _gradient_checkpointing(model, cfg)
    model.train()
    runtime.reset_peak_memory(dev)
    stopped_early = interrupted = pruned = False
    task = progress.add_task("train", total=total_steps, completed=state.step, info="")
    speed = _Speed()
    with progress, StopRequests() as stop:
        while state.step < total_steps and not stopped_early:
            step_rng = runtime.rng_state()  # a Ctrl-C mid-step checkpoints this, so resume redoes the step exactly
            t0 = time.perf_counter()
            chunk, epoch_reached, epoch_ends = plan.take(state)
            micro = micro_batches(chunk, data.lengths, cfg, data.groups)
            try:
                done = _step(layout, train_data, micro, params, optimizer, scheduler, cfg, pad_id, dev, bf16)
            except (torch.OutOfMemoryError, RuntimeError) as e:
                optimizer.zero_grad(set_to_none=True)
                if not _is_oom(e):
                    raise
                longest = max((tokens_of(train_data[i]) for mb in micro for i in mb), default=0)
                raise OutOfMemoryError(_out_of_memory(run_dir, state.step + 1, cfg, longest, e)) from None
            except KeyboardInterrupt:  # a second Ctrl-C: stop now; the step is redone on resume
                optimizer.zero_grad(set_to_none=True)
                layout.save_interrupted(run_dir, params, optimizer, scheduler, state, step_rng, cfg.keep_checkpoints, warn)
                interrupted = True
                break
            if not (math.isfinite(done.loss) and math.isfinite(done.grad_norm)):  # no update was made: weights stay good
                raise NonFiniteLossError(_non_finite(run_dir, state.step + 1, "training loss", done.loss,
                                                     done.grad_norm, cfg))
            state.step += 1
            plan.advance(state, epoch_ends)
            state.target_tokens += done.n_targets
            seconds = time.perf_counter() - t0
            state.train_seconds += seconds
            record = _step_record(state.step, epoch_reached, done, train_data, micro, seconds, speed, data)
            if layout.main:
                append_jsonl(run_dir / METRICS, record)
            progress.update(task, advance=1, info=f"loss {done.loss:.4f} | {record['tokens_per_s']:,.0f} tok/s | "
                                                  f"MFU {record['mfu']:.0%}")

            # ---- once in a while: evaluate, early-stop, checkpoint
            step = state.step
            evaluate_now = step % cfg.eval_every == 0 or epoch_ends or step == total_steps
            if evaluate_now:
                stopped_early, pruned = _evaluate(layout, state, validate(), run_dir, params, cfg, on_validation,
                                                  step < total_steps, warn, say)
                speed.restart()  # evaluation time is not training time
            signalled = layout.any_true(stop.signal is not None)
            out_of_time = until_seconds is not None and state.train_seconds >= until_seconds and step >= min_steps
            stop_here = ((until_step is not None and until_step <= step) or signalled or out_of_time) and step < total_steps
            if evaluate_now or stop_here or (cfg.save_every and step % cfg.save_every == 0):
                layout.save_checkpoint(run_dir, params, optimizer, scheduler, state, cfg.keep_checkpoints, warn)
            if stop_here:
                if signalled:
                    warn(f"{stop.signal or 'a stop signal'}: stopped after step {step} with a checkpoint")
                interrupted = True
                break

    # the model ends at its best validation loss (an interrupted run keeps its weights: it continues from them)
    layout.load_best(run_dir, params, None if interrupted else state.best_step, warn)
    return TrainResult(
        steps=state.step, total_steps=total_steps, best_step=state.best_step,
        best_val_loss=state.best_val_loss, stopped_early=stopped_early, interrupted=interrupted,
        train_seconds=state.train_seconds, target_tokens=state.target_tokens,
        peak_memory_mib=runtime.peak_memory_mib(dev), pruned=pruned, history=read_jsonl(run_dir / METRICS),
    )


@dataclass
class _DataFacts:
    """What the loop needs to know of the training rows: lengths, groups spread over the steps,
    replay, and the FLOPs per token and matmul peak the MFU is measured against."""

    lengths: list[int]
    groups: list[Any] | None
    replaying: bool
    flops_per_token: float
    peak: float

    @classmethod
    def of(cls, train_data: list[Encoded], model: torch.nn.Module, dev: torch.device, bf16: bool) -> _DataFacts:
        lengths = [tokens_of(e) for e in train_data]
        groups = [(e.kind, e.task) for e in train_data]  # replay vs task rows, and each task: spread over the steps
        share = sum(e.n_targets for e in train_data) / max(sum(lengths), 1)
        return cls(lengths, groups if len(set(groups)) > 1 else None, any(e.kind == "replay" for e in train_data),
                   flops.flops_per_token(model, sum(lengths) / max(len(lengths), 1), share),
                   flops.matmul_peak(dev.type, bf16))  # MFU is against what this machine's matmul reaches


class _Speed:
    """Tokens per second since the last validation (evaluation time is not training time)."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.tokens, self.start = 0, time.perf_counter()

    def add(self, tokens: int) -> float:
        self.tokens += tokens
        return self.tokens / max(time.perf_counter() - self.start, 1e-9)


@dataclass
class _StepDone:
    loss: float  # the step's loss over every process (anchoring's penalty included)
    parts: dict[str, float]
    grad_norm: float
    lr: float  # the rate this step's update used
    n_targets: int
    shared: int = 0  # token positions a shared-prefix pass did not run (training.prefix)


def _adamw(params: dict[str, torch.nn.Parameter], cfg: TrainConfig, dev: torch.device, sharded: bool) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms and biases)."""
    return torch.optim.AdamW(
        [{"params": [p for p in params.values() if p.ndim >= 2], "weight_decay": cfg.weight_decay},
         {"params": [p for p in params.values() if p.ndim < 2], "weight_decay": 0.0}],
        lr=cfg.lr, fused=None if sharded else _fused_adamw(dev))  # one kernel over all tensors: ~7x faster on CPU


def _step(layout: Layout, train_data: list[Encoded], micro: list[list[int]], params: dict[str, torch.nn.Parameter],
          optimizer: torch.optim.Optimizer, scheduler: Any, cfg: TrainConfig, pad_id: int, dev: torch.device,
          bf16: bool) -> _StepDone:
    """One optimizer step over ``micro`` (this process's share of it): forward and backward of each
    micro-batch, the loss over every process, clipping, and the update unless the loss or the
    gradient norm is not finite (then nothing changes and the caller raises)."""
    objective = layout.objective
    n_targets = sum(train_data[i].n_targets for mb in micro for i in mb)
    objective.begin_step([train_data[i] for mb in micro for i in mb])
    prefix.take_saved()  # from here on, count this step's passes only
    step_loss = 0.0
    for mb, counted, synced in layout.passes(micro):
        examples = [train_data[i] for i in mb]
        rows = collate_packed(examples, pad_id, cfg.max_seq_len) if cfg.packing else collate(examples, pad_id)
        step_loss += layout.backward({k: v.to(dev) for k, v in rows.items()}, examples, n_targets, counted, synced, bf16)
        if dev.type == "cpu":
            runtime.trim_heap()  # keeps RSS near what is in use (glibc holds freed tensors' memory)
    step_loss, parts = layout.reduce(step_loss, objective.parts())
    step_loss += objective.end_step()  # weight anchoring: its gradient goes straight into .grad
    parts |= {k: v for k, v in objective.parts().items() if k not in SUMMED_PARTS}
    grad_norm = layout.clip_grad_norm(params, cfg.max_grad_norm)
    lr = scheduler.get_last_lr()[0]
    if math.isfinite(step_loss) and math.isfinite(grad_norm):
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return _StepDone(step_loss, parts, grad_norm, lr, n_targets, prefix.take_saved())


def _announce(layout: Layout, cfg: TrainConfig, data: _DataFacts, bf16: bool, say: Callable[..., None]) -> None:
    """The thread count (one per CPU this process may use, or train.num_threads) and the peak the
    progress bar's MFU is measured against, said once."""
    if not layout.distributed:
        threads.use_threads(cfg.num_threads, say if layout.main else None)
    say(f"MFU: model FLOPs done per second against this machine's {'bf16' if bf16 else 'fp32'} matmul peak, "
        f"{data.peak / 1e9:,.0f} GFLOP/s (measured now)", highlight=False)


def _step_record(step: int, epoch: int, done: _StepDone, train_data: list[Encoded], micro: list[list[int]],
                 seconds: float, speed: _Speed, data: _DataFacts) -> dict[str, Any]:
    """The step's line of metrics.jsonl."""
    tokens = sum(tokens_of(train_data[i]) for mb in micro for i in mb)
    tok_s = speed.add(tokens)
    run = 1 - done.shared / max(tokens, 1)  # share of the tokens' positions the passes really ran
    record = {"type": "train", "step": step, "epoch": epoch, "loss": done.loss, "lr": done.lr,
              "grad_norm": done.grad_norm, "tokens": tokens, "target_tokens": done.n_targets, "tokens_per_s": tok_s,
              "mfu": data.flops_per_token * tok_s * run / data.peak, "step_seconds": seconds} | done.parts
    if done.shared:  # the rows' common start (a system prompt) ran once per micro-batch
        record["shared_positions"] = done.shared
    if data.replaying:  # what this step really trained on of the replay rows (target tokens)
        record["replay_target_tokens"] = sum(train_data[i].n_targets for mb in micro for i in mb
                                             if train_data[i].kind == "replay")
    return record


def _evaluate(layout: Layout, state: LoopState, measured: tuple[float, dict[str, Any]], run_dir: Path,
              params: dict[str, torch.nn.Parameter], cfg: TrainConfig, on_validation: Callable[[int, float], bool] | None,
              more_to_come: bool, warn: Callable[[str], None], say: Callable[..., None]) -> tuple[bool, bool]:
    """A validation's consequences: the best weights kept, early stopping and pruning decided (the
    same on every process), the line logged. Returns (stopped early, pruned)."""
    val_loss, task_losses = measured
    step = state.step
    if not math.isfinite(val_loss):  # never "best", never the final model
        raise NonFiniteLossError(_non_finite(run_dir, step, "validation loss", val_loss, None, cfg))
    best = _early_stopping(state, val_loss, cfg.early_stopping.min_delta)
    if best:
        state.best_val_loss, state.best_step = val_loss, step
        layout.save_best(run_dir, params, step, val_loss, warn)
    stopped_early = 0 < cfg.early_stopping.patience <= state.bad_evals
    pruned = bool(on_validation is not None and on_validation(step, val_loss)) and more_to_come  # a pruner may answer numpy's bool
    if layout.main:
        ppl = {} if "val_nll_chosen" in task_losses else {"val_ppl": math.exp(min(val_loss, 50))}  # a preference loss has none
        append_jsonl(run_dir / METRICS, {"type": "eval", "step": step, "val_loss": val_loss, **ppl, "best": best}
                     | task_losses)
    say(f"step {step}: val loss {val_loss:.4f}" + (" (best)" if best else ""))
    return stopped_early or pruned, pruned


def _resume(layout: Layout, run_dir: Path, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
            scheduler: Any, total_steps: int, plan: EpochPlan, cfg: TrainConfig, train_data: list[Encoded], val_data: Any,
            validate: Callable[[], tuple[float, dict[str, Any]]], warn: Callable[[str], None]) -> tuple[dict[str, Any], Any, int]:
    """The state, scheduler and total steps of the newest checkpoint, with what changed since
    (training data, step size, hyperparameters, validation data) taken into account."""
    state = LoopState.from_json(layout.load_checkpoint(run_dir, params, optimizer, scheduler, warn))
    if note := plan.resume(state):
        warn(note)
    if state.train_fingerprint not in (None, data_fingerprint(train_data)):  # other training rows
        state.epoch_step, state.rest, state.per_step = 0, None, plan.per_step
        state.train_fingerprint = data_fingerprint(train_data)
        warn(f"the training data changed since this checkpoint: its place in the old data means nothing in the "
             f"new, so epoch {state.epoch + 1} starts again from the first example of the new data")
    if plan.total_steps(state) != total_steps:  # epochs re-planned at another step size: the schedule's length too
        total_steps, done = plan.total_steps(state), scheduler.last_epoch
        scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, total_steps)
        scheduler.last_epoch = done
    _apply_hyperparameters(optimizer, scheduler, cfg)  # a resume allowed to change them really changes them
    if layout.main:
        _truncate_metrics(run_dir / METRICS, state.step)
    if state.val_fingerprint not in (None, data_fingerprint(val_data)):
        _revalidate(state, validate(), data_fingerprint(val_data), run_dir, params, warn, layout.main,
                    layout.model if layout.sharded else None)
    return state, scheduler, total_steps


def _gradient_checkpointing(model: torch.nn.Module, cfg: TrainConfig) -> None:
    """Activations recomputed in backward (``train.gradient_checkpointing``); non-reentrant, so
    frozen inputs are fine."""
    if not cfg.gradient_checkpointing:
        return
    inner = unwrap(model)
    if hasattr(inner, "activation_checkpointing_enable"):  # transformers 5.x's name
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


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


def _early_stopping(state: LoopState, val_loss: float, min_delta: float) -> bool:
    """Update the patience count for ``val_loss``; return whether it is the lowest seen so far.

    Two questions with two answers: the best model is simply the lowest validation loss (a lower
    one always replaces it); ``min_delta`` only decides whether an evaluation counts as progress
    for patience, measured from the loss of the last evaluation that did count (as Keras does).
    """
    ref = state.patience_ref
    if ref is None or val_loss < ref - min_delta:
        state.patience_ref, state.bad_evals = val_loss, 0
    else:
        state.bad_evals += 1
    return state.best_val_loss is None or val_loss < state.best_val_loss


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

    def steps(self, state: LoopState) -> list[list[int]]:
        """The steps of the current epoch (the rest of it, re-cut, after a change of step size)."""
        if state.rest is not None:
            rest, k = state.rest, state.per_step
            return [rest[i : i + k] for i in range(0, len(rest), k)]
        key = (state.epoch, state.per_step)
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, epoch_steps(self.lengths, self.cfg, state.epoch, self.groups, state.per_step))
        return self._cached[1]

    def take(self, state: LoopState) -> tuple[list[int], float, bool]:
        """This step's examples, the epoch reached once it is done (fractional: examples seen / all)
        and whether it ends the epoch."""
        steps = self.steps(state)
        k = state.epoch_step
        before = len(self.lengths) - len(state.rest) if state.rest is not None else 0
        seen = before + sum(len(s) for s in steps[: k + 1])
        return steps[k], state.epoch + seen / max(len(self.lengths), 1), k + 1 >= len(steps)

    def advance(self, state: LoopState, epoch_ended: bool) -> None:
        if epoch_ended:
            state.epoch, state.epoch_step, state.rest, state.per_step = state.epoch + 1, 0, None, self.per_step
        else:
            state.epoch_step += 1

    def resume(self, state: LoopState) -> str | None:
        """Bring a checkpoint's position to this config (checkpoints of older versions held only the
        step count); a message when the step size changed and the epoch's rest was re-planned."""
        if state.epoch is None:
            state.epoch, state.epoch_step = divmod(state.step, math.ceil(len(self.lengths) / (state.per_step or self.per_step)))
        if state.per_step is None:
            state.per_step = self.per_step
        if state.per_step == self.per_step:
            return None
        old = state.per_step
        rest = [i for step in self.steps(state)[state.epoch_step:] for i in step]
        state.rest, state.epoch_step, state.per_step = rest, 0, self.per_step
        return (f"examples per step changed from {old} to {self.per_step} (train.batch_size x train.grad_accum): the "
                f"{len(rest)} examples of epoch {state.epoch + 1} not yet trained are trained next, at the new size, "
                "from where the run stopped")

    def total_steps(self, state: LoopState) -> int:
        """``max_steps``, else the steps done plus those left in this epoch and the epochs after it."""
        if self.cfg.max_steps:
            return self.cfg.max_steps
        if state.epoch >= self.cfg.epochs:
            return state.step
        per_epoch = math.ceil(len(self.lengths) / self.per_step)
        left = len(self.steps(state)) - state.epoch_step
        return state.step + left + (self.cfg.epochs - state.epoch - 1) * per_epoch


def tokens_of(e: Encoded) -> int:
    """The tokens a training pass runs for one row (a preference pair: both its sides)."""
    return getattr(e, "n_tokens", None) or len(e.input_ids)


def data_fingerprint(data: list[Encoded] | dict[str, list[Encoded]]) -> str:
    """A hash of encoded rows (ids and targets; each task's, for several): equal data, equal hash.
    Saved with each checkpoint, so a resume on another validation set is noticed."""
    h = hashlib.sha256()
    for name, rows in sorted(data.items()) if isinstance(data, dict) else [("", data)]:
        h.update(name.encode())
        for e in rows:
            other = getattr(e, "rejected", None)  # a preference pair: its rejected side too
            h.update(repr((e.input_ids, e.labels, e.class_label) + ((other.input_ids, other.labels) if other else ())).encode())
    return h.hexdigest()[:16]


def _revalidate(state: LoopState, measured: tuple[float, dict[str, Any]], fingerprint: str, run_dir: Path,
                params: dict[str, torch.nn.Parameter], warn: Callable[[str], None], main: bool,
                model: torch.nn.Module | None) -> None:
    """The validation set changed since the checkpoint (new data, another split, another length):
    the best-so-far loss was measured on the old one and means nothing now. The resumed weights
    are measured on the new set and become the best so far; patience starts again."""
    val_loss, task_losses = measured
    old, old_step = state.best_val_loss, state.best_step
    state.best_val_loss, state.best_step, state.patience_ref, state.bad_evals = val_loss, state.step, val_loss, 0
    state.val_fingerprint = fingerprint
    if main or model is not None:
        save_best(run_dir, params, state.step, val_loss, warn, model=model, main=main)
    if main:
        ppl = {} if "val_nll_chosen" in task_losses else {"val_ppl": math.exp(min(val_loss, 50))}
        append_jsonl(run_dir / METRICS, {"type": "eval", "step": state.step, "val_loss": val_loss, **ppl, "best": True,
                                         "revalidated": True} | task_losses)
    warn(f"the validation set changed since this checkpoint: the weights of step {state.step} score {val_loss:.4f} "
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


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint we resume from."""
    atomic_write_jsonl(path, [r for r in read_jsonl(path) if r.get("step", 0) <= step])


def result_dict(result: TrainResult) -> dict[str, Any]:
    d = asdict(result)
    d.pop("history")
    return d
