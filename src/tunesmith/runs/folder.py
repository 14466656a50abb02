"""A run on disk: ``runs/<name>/`` holds everything one fine-tuning run produced.

``finetune(cfg)`` goes config -> model -> data -> method -> train -> save -> evaluate -> report;
``evaluate_run(run_dir)`` re-evaluates a finished run from its folder alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from tunesmith import methods, runtime
from tunesmith.training import distributed
from tunesmith.evaluation import forgetting
from tunesmith.runtime import threads
from tunesmith.training import mitigations as training
from tunesmith.training import preference
from tunesmith.evaluation import metrics as M
from tunesmith.api import ApiModel
from tunesmith.config import Config, ConfigError, diff, load_config, save_config, task_config, train_settings
from tunesmith.data import Example
from tunesmith.data.prepare import Splits, content_hash, load_splits
from tunesmith.data.render import encode_examples
from tunesmith.evaluation.evaluate import (Evaluation, compare, evaluate_model, latency, reference, references,
                                small_test_warning, task_metrics)
from tunesmith.evaluation.answers import CACHE, AnswerStore, EvaluationStopped
from tunesmith.evaluation.answers import fingerprint as answers_fingerprint
from tunesmith.io import atomic_write_json, atomic_write_jsonl, read_jsonl
from tunesmith.models import (ModelError, context_length, load_base, load_classifier, load_model, load_tokenizer, needs_chat_template, ready_tokenizer, resolve_model, uses_head, unwrap, TESTED_FAMILIES)
from tunesmith.runtime.progress import make_progress
from tunesmith.runs.data import multitask_data, preference_data, print_data_summary
from tunesmith.runs.preference_eval import evaluate_preference_run
from tunesmith.runs.errors import RunError, not_trained
from tunesmith.runs.phase import clear_phase, set_phase
from tunesmith.runtime.commands import command
from tunesmith.runtime.stopping import StopRequests
from tunesmith.report.html import load_json, metrics_table, write_report
from tunesmith.runs import estimate, index, trackers
from tunesmith.training.checkpoint import SHARDS, load_best, newest_good_checkpoint
from tunesmith.training.loop import latest_checkpoint, result_dict, train


@dataclass
class Run:
    """What ``finetune`` returns: where the run lives and its headline results."""

    dir: Path
    config: Config
    train: dict[str, Any]
    eval: dict[str, Any]


def finetune(cfg: Config, resume: bool = False, overwrite: bool = False, until_step: int | None = None,
             console: Console | None = None, base_from: Path | None = None, allow_changes: bool | list[str] = False,
             evaluate: bool = True, on_validation: Callable[[int, float], bool] | None = None) -> Run:
    """Fine-tune ``cfg.model`` on ``cfg.data`` with ``cfg.method``, then evaluate against the base.

    ``resume`` continues from the newest checkpoint, after comparing ``cfg`` with the run's saved
    config (see ``check_resume``; ``allow_changes``: True accepts every change to the training,
    a list of keys exactly those).
    ``base_from``: a finished run on the same model, test split and evaluation settings whose base
    model results are reused instead of evaluating the base again (see ``evaluate_run``).
    Raises RunError (folder in use, nothing to resume, refused changes), ConfigError, DataError,
    ModelError, and ``train.NonFiniteLossError`` when the loss diverges.
    ``evaluate=False`` stops after saving the trained model (no test split: a search's trials);
    ``on_validation`` goes to ``train`` (a search's pruner).
    """
    main = distributed.world().main
    try:
        with run_lock(cfg.run_dir) if main else contextlib.nullcontext():
            return _finetune(cfg, resume, overwrite, until_step, console, base_from, allow_changes, evaluate, on_validation)
    finally:
        if main:  # finished, stopped or failed: the index says which (after the lock is released)
            clear_phase(cfg.run_dir)
            index.record(cfg.run_dir)
            if cfg.report_to and cfg.run_dir.is_dir():
                trackers.sync(cfg.run_dir)


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``<output_dir>/.<name>.lock`` (an exclusive ``flock``) while a run trains in ``run_dir``.
    Raises RunError naming the holder's process id when another process holds it: two trainings
    (say a resume next to a run left going by a killed launcher) never write one folder."""
    import fcntl

    run_dir = Path(run_dir)
    path = run_dir.parent / f".{run_dir.name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise RunError(f"{run_dir}: another tunesmith process (pid {holder}) is training in this run folder; "
                           f"wait for it to end or stop it first (kill -TERM {holder}: it checkpoints and exits)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _finetune(cfg: Config, resume: bool, overwrite: bool, until_step: int | None, console: Console | None,
              base_from: Path | None, allow_changes: bool | list[str], evaluate: bool = True,
              on_validation: Callable[[int, float], bool] | None = None) -> Run:
    console = console or Console()
    run_dir = cfg.run_dir
    w = distributed.init()  # several processes under torchrun: process 0 writes, the others follow
    if not w.main:
        console = Console(quiet=True)
    with distributed.main_first():
        # process 0 checks the folder and prepares the data; the others (torchrun) then reuse them
        resumed_at = _open_run_dir(cfg, resume, overwrite, allow_changes, console) if w.main else None
        if w.main:
            set_phase(run_dir, "preparing", "loading the model, preparing and encoding the data")
        if cfg.replay.ratio > 0 and w.main:
            training.replay_source(cfg)  # a replay file that cannot serve fails now, not after preparing the data

        model, tokenizer, train_set, val_set, splits, replay = _model_and_data(cfg, console, w.main)
    if replay:
        console.print(f"replay: {replay['rows']:,} row{'' if replay['rows'] == 1 else 's'} of {replay['data']} "
                      f"({replay['kind']}; {replay['achieved_ratio_' + replay['by']]:.1%} of the training {replay['by']})"
                      + ("; " + replay["note"] if replay.get("note") else ""), highlight=False)

    if resume and w.main:
        save_config(cfg, run_dir / "config.yaml")
    runtime.seed_everything(cfg.train.seed)  # adapters are initialised at random: the same seed, the same run
    model = methods.prepare(model, cfg)
    sharded = w.distributed and cfg.train.strategy == "fsdp"
    if not sharded:  # FSDP moves each process's shards to its device itself (the whole model never goes there)
        model = model.to(runtime.device())
    trainable, total = methods.count_parameters(model)
    if cfg.method == "prompt":  # nothing to train: write the prompt, then evaluate it like any tuned model
        del model
        return _prompt_run(cfg, splits, total, console, base_from, w.main)
    console.print(f"[bold]method[/bold] {cfg.method}" + (f" on {w.size} processes ({cfg.train.strategy})" if w.distributed else "")
                  + f": {trainable:,} trainable of {total:,} parameters "
                  f"({100 * trainable / total:.2f}%); {len(train_set)} train / "
                  f"{sum(map(len, val_set.values())) if isinstance(val_set, dict) else len(val_set)} validation examples")
    predicted = None
    if w.main and not w.distributed and not resume:  # what the run will cost (a resumed run: only part of it)
        predicted = _predict(cfg, model, train_set, val_set, tokenizer.pad_token_id, console)
    started = time.perf_counter()
    train_cfg = train_settings(cfg)
    with distributed.main_first():  # EWC's Fisher (and a preference run's reference): made by process 0, read by the others
        if cfg.task == "preference":
            with _progress(console) as progress:
                objective, mitigations = preference.build(cfg, model, train_set, val_set, run_dir, tokenizer.pad_token_id,
                                                          lambda line: console.print(line, highlight=False), progress), {}
        else:
            objective, mitigations = training.build(cfg, model, tokenizer, run_dir, resume or not w.main,
                                                    tokenizer.pad_token_id)
    mitigations = ({"replay": replay} if replay else {}) | mitigations
    if w.main:
        set_phase(run_dir, "training")
    result = train(model, train_set, val_set, train_cfg, run_dir, tokenizer.pad_token_id, resume=resume,
                   until_step=until_step, objective=objective, on_validation=on_validation)
    if w.main:
        set_phase(run_dir, "saving", "the trained model")
    distributed.shutdown()  # the rest (saving, evaluating) is process 0's alone
    if not w.main:
        return Run(run_dir, cfg, result_dict(result), {})
    if resumed_at is not None and resumed_at >= result.total_steps:
        console.print(f"the run had already finished training ({result.steps} steps): saving and evaluating it")
    summary = _train_summary(cfg, result, trainable, total, w, mitigations)
    if predicted is not None:
        summary["estimate"] = estimate.against_actual(predicted, summary, time.perf_counter() - started)
        _print_against(summary["estimate"], console)
    atomic_write_json(run_dir / "train_result.json", summary)
    if result.interrupted:
        console.print(f"[yellow]stopped at step {result.steps}/{result.total_steps}; continue with: {_resume_command(cfg, w)}[/yellow]")
        return Run(run_dir, cfg, summary, {})
    if sharded:  # the trained model is in shards: process 0 builds it whole again with the best weights
        del model
        model = _whole_model(cfg, run_dir)
    methods.save_final(model, tokenizer, cfg, run_dir)
    del model
    if not evaluate:
        return Run(run_dir, cfg, summary, {})
    evaluation = evaluate_run(run_dir, console=console, base_from=base_from)
    return Run(run_dir, cfg, summary, evaluation)


def _prompt_run(cfg: Config, splits: Splits, total: int, console: Console, base_from: Path | None, main: bool) -> Run:
    """Method prompt: the prompt (system prompt and shots) written, then evaluated like a tuned model."""
    distributed.shutdown()
    if not main:
        return Run(cfg.run_dir, cfg, {}, {})
    console.print(f"[bold]method[/bold] prompt: {cfg.prompt.shots}-shot ({cfg.prompt.selection}), no training")
    methods.prompt.save(cfg, splits.train, cfg.run_dir)
    summary = {"steps": 0, "train_seconds": 0.0, "trainable_parameters": 0, "total_parameters": total}
    atomic_write_json(cfg.run_dir / "train_result.json", summary)
    return Run(cfg.run_dir, cfg, summary, evaluate_run(cfg.run_dir, console=console, base_from=base_from))


def _train_summary(cfg: Config, result: Any, trainable: int, total: int, w: distributed.World,
                   mitigations: dict[str, Any]) -> dict[str, Any]:
    """train_result.json: the loop's result, the model's size, the processes, the mitigations."""
    summary = result_dict(result) | {"trainable_parameters": trainable, "total_parameters": total,
                                     "processes": w.size, "strategy": cfg.train.strategy if w.distributed else "none"}
    if "replay" in mitigations:  # the share the steps really trained (the plan above is for whole epochs)
        steps = [r for r in result.history if r.get("type") == "train" and "replay_target_tokens" in r]
        trained = sum(r["target_tokens"] for r in steps)
        mitigations["replay"]["trained_ratio_tokens"] = sum(r["replay_target_tokens"] for r in steps) / max(trained, 1)
    return summary | ({"mitigations": mitigations} if mitigations else {})


def _resume_command(cfg: Config, w: distributed.World) -> str:
    """The command that continues a stopped run (with the launch flags of a multi-process run)."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", w.size))
    again = f" --nproc {per_node}" + (f" --nnodes {w.size // per_node} and each machine's --node-rank, "
                                      "--rdzv-endpoint" if per_node < w.size else "")
    return f"{command('train', cfg.run_dir / 'config.yaml', '--resume')}{again if w.distributed else ''}"


def _model_and_data(cfg: Config, console: Console, main: bool) -> tuple[torch.nn.Module, Any, list[Any], Any, Splits | None,
                                                                    dict[str, Any] | None]:
    """The base model and its tokenizer, the encoded training and validation sets (with replay
    rows mixed in), the prepared splits (None for a multi-task run) and the replay summary.
    Raises RunError for a model and settings that cannot work together."""
    run_dir = cfg.run_dir
    splits = None
    console.print(f"[bold]model[/bold] {resolve_model(cfg.model).display_name} ({cfg.model})")
    head = uses_head(cfg)
    model, tokenizer = load_base(cfg)
    if head and cfg.method == "prompt":
        raise RunError(f"{cfg.model} is an encoder: method prompt needs a generative model")
    if head and (cfg.replay.ratio > 0 or cfg.distill.weight > 0 or cfg.anchor.method == "ewc"):
        raise RunError(f"{cfg.model} classifies with a head: replay, distillation and EWC work on next-token "
                       "predictions (use anchor.method: l2sp, or classifier: lm)")
    if cfg.method == "lora":  # a typo in the layer names is found before any data work
        methods.lora.check_target_modules(model, cfg.lora.target_modules)
    if (family := type(unwrap(model)).__name__) not in TESTED_FAMILIES:
        console.print(f"  note: {family} is not among the model families tunesmith tests end to end "
                      "(docs/support.md): training, evaluation and hf export use transformers' own code for it; "
                      "GGUF export and serving are untested", highlight=False)
    ready_tokenizer(tokenizer, cfg, console)
    if cfg.tasks:  # several tasks: each prepared into data/<name>/, validated apart, trained on one mixed list
        train_set, val_set, report = multitask_data(cfg, tokenizer, console)
        if main:
            atomic_write_json(run_dir / "data_report.json", report)
    elif cfg.task == "preference":  # pairs (or thumbs up/down): read, split and encoded side by side
        train_set, val_set, splits, report = preference_data(cfg, tokenizer, console)
        if main:
            atomic_write_json(run_dir / "data_report.json", report)
    else:
        splits = load_splits(cfg, run_dir / "data", tokenizer, say=lambda line: console.print(line, highlight=False))
        console.print(("reusing the prepared data in " if splits.reused else "prepared the data into ") + str(run_dir / "data"))
        for note in splits.notes:
            console.print(f"  {note}", highlight=False)
        train_set, train_stats = encode_examples(cfg, tokenizer, splits.train, head)
        val_set, val_stats = encode_examples(cfg, tokenizer, splits.validation, head)
        report = splits.report | {"notes": splits.notes, "encoded": {"train": train_stats, "validation": val_stats}}
        if main:
            atomic_write_json(run_dir / "data_report.json", report)
        print_data_summary(report, cfg, console, len(splits.test))
    if not train_set or not val_set:
        raise RunError("no training or validation example has a target token left; check max_seq_len and the data")
    with _progress(console) as progress:  # general data mixed in (replay.ratio); instructions answered by the base
        if cfg.replay.ratio > 0:
            model.to(runtime.device())  # the base may answer the replayed instructions: on the training device
        train_set, replay = training.with_replay(cfg, tokenizer, train_set, model, progress)
    return model, tokenizer, train_set, val_set, splits, replay


def _predict(cfg: Config, model: torch.nn.Module, train_set: list[Any], val_set: Any, pad_id: int,
             console: Console) -> dict[str, Any] | None:
    """The estimate printed at the start of training: computed now (no calibration run), with the
    time of the run folder's ``estimate.json`` when it was made for this config. Never fails the run."""
    try:
        weights = sum(p.numel() * p.element_size() for p in model.parameters()) / estimate.MIB
        est = estimate.estimate_for(cfg, model, train_set, val_set, pad_id, max(0.0, estimate.rss_mib() - weights))  # weights not yet read in (mapped) count 0
        saved = estimate.saved_for(cfg)
        if saved and (saved.get("time") or {}).get("source") == "calibration":  # timed here; not a device's figure
            est["time"], est["cost"] = saved["time"], saved.get("cost")
        if saved and (saved.get("memory_mib") or {}).get("activation_factor"):  # measured by its calibration run
            estimate.scale_activations(est["memory_mib"], saved["memory_mib"]["activation_factor"],
                                       saved["memory_mib"].get("validation"), saved["memory_mib"].get("held", 0.0))
            est["advice"] = estimate.advice(est["memory_mib"], cfg, est.get("machine_memory_mib"))
    except Exception as e:  # noqa: BLE001 - an estimate is advice: the run goes on without it
        console.print(f"[yellow]no estimate: {type(e).__name__}: {e}[/yellow]", highlight=False)
        return None
    console.print("[bold]estimate[/bold] " + "\n  ".join(estimate.describe(est)), highlight=False)
    return est


def _print_against(row: dict[str, Any], console: Console) -> None:
    """Predicted against actual time and memory, one line."""
    parts = []
    if row.get("actual_seconds") is not None and row.get("predicted_seconds") is not None:
        parts.append(f"time {estimate._hms(row['predicted_seconds'])} predicted, {estimate._hms(row['actual_seconds'])} "
                     f"taken ({_off(row['error_seconds'])})")
    if row.get("actual_peak_mib") and row.get("predicted_peak_mib"):
        parts.append(f"peak memory {row['predicted_peak_mib']:,.0f} MiB predicted, {row['actual_peak_mib']:,.0f} MiB used "
                     f"({_off(row['error_peak_mib'])})")
    if parts:
        console.print("estimate vs actual: " + "; ".join(parts) + (f" ({row['note']})" if row.get("note") else ""),
                      highlight=False)


def _off(error: float) -> str:
    """How far a prediction was from what happened, in words: ``error`` = (predicted - actual) / actual,
    e.g. -0.45 -> "the prediction was 45% low: actual 1.8x it" (a bare "-45%" read either way)."""
    if abs(error) < 0.005:
        return "as predicted"
    side = "low" if error < 0 else "high"
    ratio = f": actual {1 / (1 + error):.1f}x it" if error <= -0.2 else ""
    return f"the prediction was {abs(error):.0%} {side}{ratio}"


def _whole_model(cfg: Config, run_dir: Path) -> torch.nn.Module:
    """After FSDP training: the base model prepared for ``cfg.method`` again, on the CPU, with the
    best trainable weights (``checkpoints/best``, written whole) loaded into it."""
    runtime.seed_everything(cfg.train.seed)
    model = methods.prepare(load_base(cfg)[0], cfg)
    load_best(run_dir, {n: p for n, p in model.named_parameters() if p.requires_grad})
    return model


def _open_run_dir(cfg: Config, resume: bool, overwrite: bool, allow_changes: bool | list[str],
                  console: Console) -> int | None:
    """Check that the run may start (or resume) in ``cfg.run_dir`` before anything is written;
    return the step resumed from (None for a new run). A new run's config is saved here; a
    resumed one's only once its data is ready, so a failed resume changes nothing."""
    run_dir = cfg.run_dir
    trained = (run_dir / "metrics.jsonl").exists() or (run_dir / "checkpoints").exists()
    if trained and not (resume or overwrite):
        raise RunError(f"{run_dir} already holds a run; resume it with --resume, or pass --overwrite, or pick another name")
    step = None
    if resume:
        if latest_checkpoint(run_dir) is None:
            raise RunError(f"{run_dir}: no checkpoint to resume from; start the run without --resume")
        changed = check_resume(run_dir, cfg, allow_changes)
        good = newest_good_checkpoint(run_dir)  # a damaged newest one is skipped (training says so)
        step = json.loads((good / "state.json").read_text())["step"] if good else None
        console.print(f"resuming from {good} (step {step})" if good else "resuming: no checkpoint passes its check",
                      highlight=False)
        for line in changed.lines(step):
            console.print(f"  {line}", highlight=False)
    if needs_chat_template(cfg):  # a base model without a template stops here, before any data work
        ready_tokenizer(load_tokenizer(cfg.model), cfg)
    if overwrite and not resume and run_dir.exists():
        for child in run_dir.iterdir():  # prepared data stays: it is reused when still up to date
            if child.name not in ("data", estimate.FILE):  # an estimate made for this config stays (it is checked)
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        save_config(cfg, run_dir / "config.yaml")
        atomic_write_json(run_dir / "run.json", {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    index.record(run_dir)  # listed (as training) from the start
    return step


# Settings a resumed run may change freely: they decide when to evaluate and save, and how to
# evaluate at the end (data.max_test_examples: how much of the test split), not what is trained.
RESUME_SAFE = ("train.eval_every", "train.save_every", "train.keep_checkpoints", "train.num_threads",
               "train.gradient_checkpointing", "output_dir", "eval.", "prompt.", "estimate.",
               "search.", "report_to", "mlflow.", "data.max_test_examples")
# Settings that decide what the checkpoint's tensors are: resuming under other values is meaningless.
RESUME_REFUSED = ("model", "task", "method", "classifier", "lora.r", "lora.alpha", "lora.target_modules", "data.labels")


@dataclass
class ResumeChanges:
    """What differs from the config a run was trained with: ``training`` (applied to the optimisation
    from the resumed step on) and ``other`` (evaluation, reporting, checkpoint cadence: no retraining);
    each key -> (saved value, new value)."""

    training: dict[str, tuple[Any, Any]] = dataclasses.field(default_factory=dict)
    other: dict[str, tuple[Any, Any]] = dataclasses.field(default_factory=dict)

    def lines(self, step: int | None) -> list[str]:
        """What the resume line says about them, the training changes first (they retrain)."""
        out = []
        if self.training:
            out.append(f"changes to training, applied from step {step if step is not None else '?'} on: "
                       + _listed(self.training))
        if self.other:
            out.append("changes to evaluation and bookkeeping only (nothing is trained again for them): "
                       + _listed(self.other))
        return out

    def __bool__(self) -> bool:
        return bool(self.training or self.other)


def _listed(changes: dict[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changes.items()))


def check_resume(run_dir: Path, cfg: Config, allow_changes: bool | list[str]) -> ResumeChanges:
    """Compare ``cfg`` with the config saved in ``run_dir``; return the accepted changes.

    Changes to ``RESUME_SAFE`` settings (evaluation, reporting, checkpoint cadence) are always
    accepted and retrain nothing; to ``RESUME_REFUSED`` ones (shapes, model, labels) always
    refused; any other change alters the optimisation (learning rate, batch, schedule, steps, data)
    and is refused unless ``allow_changes`` is True (all of them) or lists its key (exactly those:
    ``--allow-change KEY``), in which case the loop applies it from the resumed step on. Raises
    RunError listing the changed keys with their old and new values.
    """
    try:
        saved = load_config(run_dir / "config.yaml")
    except ConfigError as e:
        raise RunError(f"{run_dir}/config.yaml: the saved config cannot be read, so the run cannot be resumed ({e})") from None
    every = {k: v for k, v in diff(saved, cfg).items() if k != "name"}
    result = ResumeChanges(other={k: v for k, v in every.items() if k.startswith(RESUME_SAFE)})
    changes = {k: v for k, v in every.items() if not k.startswith(RESUME_SAFE)}
    if "train.strategy" in changes:  # what matters is the checkpoints' format: sharded (dcp/) ones load anywhere
        newest = newest_good_checkpoint(run_dir)
        if cfg.train.strategy == "fsdp" and newest is not None and not (newest / SHARDS).is_dir():
            raise RunError(f"{run_dir}: cannot resume with train.strategy: fsdp: its checkpoint {newest.name} holds whole "
                           f"weights (written with train.strategy: {saved.train.strategy}), which sharded training "
                           f"cannot load. Resume with train.strategy: {saved.train.strategy}, or start a new run")
        result.other["train.strategy"] = changes.pop("train.strategy")  # the result is the same run
    report = load_json(run_dir / "data" / "data_report.json")
    if report.get("content_hash") and report["content_hash"] != content_hash(cfg) and not any(
            k.startswith("data.") for k in changes):  # same settings, other bytes: the files were edited
        changes["data files"] = ("as prepared for the checkpoint", "changed since")
    refused = {k: v for k, v in changes.items() if k in RESUME_REFUSED}
    if refused:
        raise RunError(f"{run_dir}: cannot resume: these settings change what the checkpoint holds: {_listed(refused)}. "
                       "Resume with the saved config, or start a new run under another name")
    allowed = set(changes) if allow_changes is True else set(allow_changes or [])
    if not_allowed := {k: v for k, v in changes.items() if k not in allowed}:
        raise RunError(f"{run_dir}: cannot resume: these settings change the training: {_listed(not_allowed)}. "
                       f"Resume with the saved config ({command('train', run_dir / 'config.yaml', '--resume')}), "
                       f"or accept them from the resumed step on: --allow-change KEY for each one "
                       f"({' '.join('--allow-change ' + k for k in sorted(not_allowed) if k != 'data files')}"
                       f"{' --allow-changes' if 'data files' in not_allowed else ''}), or --allow-changes for all")
    result.training = changes
    return result


# What `tunesmith eval --set` may change: how to evaluate, and how much of the test split to use.
EVAL_OVERRIDABLE = ("eval.", "data.max_test_examples")


def evaluate_run(run_dir: str | Path, console: Console | None = None, base_from: Path | None = None,
                 overrides: list[str] | None = None) -> dict[str, Any]:
    """Evaluate a finished run's tuned model (and its base) on the test split; write eval.json,
    predictions.jsonl and report.html.

    Records for each model the seconds, examples/s and tokens/s of the batched evaluation, and for
    the tuned model its latency: milliseconds to answer one example alone (``eval.latency_examples``).
    ``base_from``: another run folder whose base-model results are reused when they were made on
    the same test examples with the same model and evaluation settings (``compare`` evaluates the
    base once); otherwise the base is evaluated here.

    A multi-task run (``tasks:``) is tested on each task's test split as a single-task run would
    be: eval.json holds a ``tasks`` block (name -> that task's single-task results) and the macro
    average of their headline metrics (``macro``); predictions go to ``predictions/<task>.jsonl``.
    A run started from another run (``model: runs/X``) is also tested on that run's tasks
    (``eval.previous_tasks``): a ``previous_tasks`` block with the earlier run's own score and the drop.
    ``overrides``: ``eval.KEY=VALUE`` (or ``data.max_test_examples=N``) settings for this evaluation
    only (config.yaml is not changed; eval.json records them as ``eval_overrides``); with
    ``eval.general=none`` the run's earlier forgetting block is kept. Raises RunError for any other key.
    """
    console = console or Console()
    run_dir = Path(run_dir)
    overrides = list(overrides or [])
    cfg = run_config(run_dir, overrides)
    if cfg.task == "preference":  # held-out pairs ranked by the starting and the tuned model
        return evaluate_preference_run(run_dir, cfg, console, overrides)
    earlier_forgetting = (load_json(run_dir / "eval.json") or {}).get("forgetting") if overrides else None
    dev = runtime.device()
    threads.use_threads(cfg.train.num_threads, lambda line: console.print(line, highlight=False))
    bf16 = runtime.INFERENCE_BF16  # evaluated in the precision every answer is served in (generate, serve)
    head = uses_head(cfg)
    base, tokenizer = load_classifier(cfg.model, list(cfg.data.labels), cfg.train.seed) if head else load_model(cfg.model)
    ready_tokenizer(tokenizer, cfg)
    jobs = _task_jobs(cfg, run_dir, tokenizer, bf16)  # one per task of the run (the run itself when single-task)
    tests_earlier = cfg.eval.previous_tasks and cfg.method != "prompt" and not head  # a head cannot answer generative tasks
    earlier = _previous_jobs(cfg, run_dir, tokenizer, bf16) if tests_earlier else {}
    every = list(jobs.values()) + list(earlier.values())
    main = next(iter(jobs.values()))
    results = main.results if not cfg.tasks else {
        "task": "multitask", "test_examples": sum(len(j.splits.test) for j in jobs.values()),
        "precision": runtime.INFERENCE_PRECISION, "metric": "macro"}
    if overrides:
        results["eval_overrides"] = overrides
    reused = (_reused_base(Path(base_from), cfg, main.splits.test) if base_from and cfg.eval.compare_with_base
              and not cfg.tasks else None)
    if reused is not None:
        main.evals["base"], main.results["base"] = reused, reused.metrics | {"reused_from": str(base_from)}
        console.print(f"base model: results reused from {base_from} (same model, test split and settings)")
    base.to(dev)
    stop = StopRequests()
    try:
        with stop, make_progress(console, on_update=_phase_writer(run_dir)) as progress:
            ctx = _EvalContext(run_dir, cfg, tokenizer, bf16, head, progress, lambda: stop.requested)
            _evaluate_models(ctx, base, every, main, results, reused is None, console)
    except EvaluationStopped as e:
        clear_phase(run_dir)
        index.record(run_dir)
        raise EvaluationStopped(f"{run_dir}: evaluation stopped ({stop.signal or 'on request'}): {e}; every answer made "
                                f"so far is kept in {run_dir / CACHE}/. Continue with: {command('eval', run_dir)}") from None
    for job in every:
        _compare_task(job)
    if results.get("forgetting") is None and earlier_forgetting and str(cfg.eval.general).lower() == "none":
        # eval.general=none for this evaluation only: the run's earlier forgetting measurement stays
        results["forgetting"] = earlier_forgetting | {"note": "measured by an earlier evaluation (eval.general: none now)"}
    if cfg.tasks:
        results["tasks"] = {name: job.results for name, job in jobs.items()}
        results |= macro_average(results["tasks"])
    if earlier:
        results["previous_tasks"] = {name: job.results | _earlier_score(job) for name, job in earlier.items()}
    set_phase(run_dir, "evaluating", "writing eval.json and the report")
    _write_evaluation(run_dir, results, main, jobs if cfg.tasks else {}, earlier, console)
    shutil.rmtree(run_dir / CACHE, ignore_errors=True)  # the answers are in eval.json and predictions now
    clear_phase(run_dir)
    index.record(run_dir)  # after the phase is cleared, so the index says evaluated (not evaluating)
    return results


def run_config(run_dir: str | Path, overrides: list[str] | None = None) -> Config:
    """The saved config of a finished run, with ``overrides`` (``eval.*`` settings for one
    evaluation). Raises RunError for a folder that is no run, a config that cannot be read, an
    unfinished run, or an override of anything but evaluation settings (ConfigError for a bad one)."""
    run_dir, overrides = Path(run_dir), list(overrides or [])
    if not (run_dir / "config.yaml").is_file():
        raise RunError(f"{run_dir}: " + ("not a run folder (no config.yaml)" if run_dir.exists() else "no such folder"))
    if outside := [o for o in overrides if not o.strip().startswith(EVAL_OVERRIDABLE)]:
        raise RunError(f"tunesmith eval --set takes evaluation settings only ({', '.join(EVAL_OVERRIDABLE)}); not "
                       f"{', '.join(outside)}: other settings would no longer describe how the run was trained "
                       "(train again with --set)")
    try:
        cfg = load_config(run_dir / "config.yaml", overrides)
    except ConfigError as e:
        if overrides:  # the overrides' own problems, as the user typed them
            raise
        raise RunError(f"{run_dir}/config.yaml cannot be read: {e}") from None
    artifact = run_dir / methods.METHODS[cfg.method].ARTIFACT
    if not artifact.is_dir():
        raise not_trained(run_dir, artifact.name)
    return cfg


@dataclass
class _EvalContext:
    """What every model's evaluation in ``evaluate_run`` shares: the run, its settings, the
    tokenizer, the precision, whether it is a head, the progress display and the stop request."""

    run_dir: Path
    cfg: Config
    tokenizer: Any
    bf16: bool
    head: bool
    progress: Progress
    should_stop: Callable[[], bool]

    def evaluate(self, job: _TaskEval, name: str, model: torch.nn.Module | ApiModel,
                 questions: list[Example] | None = None) -> None:
        identity = (_api_identity(model) if isinstance(model, ApiModel) else
                    _weights_identity(self.cfg.model) if name == "base" else _artifact_identity(self.run_dir, self.cfg))
        _evaluate_on(job, name, model, self.tokenizer, self.bf16, self.head, self.progress, questions,
                     self.run_dir, identity, self.should_stop)


def _evaluate_models(ctx: _EvalContext, base: torch.nn.Module, every: list[_TaskEval], main: _TaskEval,
                     results: dict[str, Any], with_base: bool, console: Console) -> None:
    """The base model (unless reused), the forgetting probe's base side, the tuned model (or the
    prompt method's questions), then the forgetting check: each into its job's results."""
    cfg, dev = ctx.cfg, runtime.device()
    if cfg.eval.compare_with_base and with_base:
        for job in every:  # the base first: a LoRA merge below changes its weights in place
            ctx.evaluate(job, "base", base)
    probe = (forgetting.Probe(ctx.tokenizer, cfg, ctx.bf16, cfg.eval.batch_size, ctx.should_stop)
             if cfg.method != "prompt" else None)
    observed = probe.observe(base, ctx.progress) if probe else None  # before a merge changes base
    if skipped := forgetting.skipped(cfg, probe, bool(ctx.head)):
        console.print(f"forgetting on general data: not measured ({skipped})", highlight=False)
    if cfg.method == "prompt":  # the base model (or a remote one), asked with the prompt method's shots
        asked = ApiModel(cfg.prompt.api) if cfg.prompt.api.base_url else base
        ctx.evaluate(main, "tuned", asked, methods.prompt.apply(cfg, main.splits.train, main.splits.test))
        return
    artifact = ctx.run_dir / methods.METHODS[cfg.method].ARTIFACT
    if cfg.method == "lora":  # merged for evaluation: same outputs, no adapter overhead per layer
        tuned = methods.lora.load(base, artifact).merge_and_unload()
    elif ctx.head:
        tuned, _ = load_classifier(str(artifact), list(cfg.data.labels))
    else:
        tuned, _ = load_model(str(artifact))
    tuned = tuned.to(dev)
    for job in every:
        ctx.evaluate(job, "tuned", tuned)
    # forgetting on general data (eval.general), after the task evaluations
    results["forgetting"] = probe.compare(tuned, observed, ctx.progress, cfg.eval.bootstrap_resamples) if probe else None
    if results["forgetting"] is not None:
        console.print(forgetting.summary_line(results["forgetting"]), highlight=False)


def _write_evaluation(run_dir: Path, results: dict[str, Any], main: _TaskEval, tasks: dict[str, _TaskEval],
                      earlier: dict[str, _TaskEval], console: Console) -> None:
    """Write eval.json, the predictions (a single-task run ``main``: predictions.jsonl; each of ``tasks``
    and ``earlier``: predictions/<name>.jsonl, predictions/previous-<name>.jsonl) and report.html;
    print the tables and warnings."""
    atomic_write_json(run_dir / "eval.json", results)
    if not tasks:
        atomic_write_jsonl(run_dir / "predictions.jsonl",
                           [prediction_row(ex, i, main.evals) for i, ex in enumerate(main.splits.test)])
    for name, job in (tasks | {f"previous-{n}": j for n, j in earlier.items()}).items():
        atomic_write_jsonl(run_dir / "predictions" / f"{name}.jsonl",
                           [prediction_row(ex, i, job.evals) for i, ex in enumerate(job.splits.test)])
    write_report(run_dir)
    trackers.sync(run_dir)
    if not tasks:
        print_table(results, console)
    for name, job in tasks.items():
        print_table(job.results, console, f" ({name})")
    if tasks and "macro" in results:
        print_macro(results, console)
    for name, job in earlier.items():
        print_table(job.results, console, f" (earlier task {name}; base = the model this run started from)")
        prev = results.get("previous_tasks", {}).get(name, {})
        then, drop = (prev.get("earlier") or {}).get("tuned"), prev.get("drop")
        if then is not None and drop is not None:
            console.print(f"earlier task {name}: {job.results['metric']} {then:.4f} when its run ended, "
                          f"{job.results['tuned'][job.results['metric']]:.4f} now: "
                          + (f"{drop:.4f} forgotten" if drop > 0 else "nothing forgotten"), highlight=False)
    for job in (list(tasks.values()) or [main]) + list(earlier.values()):
        for w in job.results.get("warnings", []):
            console.print(f"[yellow]warning: {w}[/yellow]", highlight=False)


@dataclass
class _TaskEval:
    """One task a run is tested on: its single-task config, its splits, each model's evaluation
    (``evals``: base | tuned) and the task's part of eval.json (``results``)."""

    cfg: Config
    splits: Splits
    evals: dict[str, Evaluation] = dataclasses.field(default_factory=dict)
    results: dict[str, Any] = dataclasses.field(default_factory=dict)
    earlier_run: Path | None = None  # for a previous run's task: that run's folder


def _task_job(cfg: Config, data_dir: Path, tokenizer: Any, bf16: bool) -> _TaskEval:
    """A task's test split (prepared into ``data_dir`` if not yet) and the head of its results."""
    splits = load_splits(cfg, data_dir, tokenizer)
    test = splits.test
    results: dict[str, Any] = {"task": cfg.task, "test_examples": len(test), "precision": "bf16" if bf16 else "fp32",
                               "metric": M.headline(cfg.task, cfg.eval.metric)}
    if small_test_warning(len(test)):
        results["warnings"] = [small_test_warning(len(test))]
    if cfg.task == "classification":
        results["label_words"] = dict(cfg.data.labels)
    return _TaskEval(cfg, splits, results=results)


def _task_jobs(cfg: Config, run_dir: Path, tokenizer: Any, bf16: bool) -> dict[str, _TaskEval]:
    """The run's own tasks: the run itself, or each of ``tasks:`` (data in ``data/<name>/``)."""
    if not cfg.tasks:
        return {cfg.name: _task_job(cfg, run_dir / "data", tokenizer, bf16)}
    return {t.name: _task_job(task_config(cfg, t), run_dir / "data" / t.name, tokenizer, bf16) for t in cfg.tasks}


def _previous_jobs(cfg: Config, run_dir: Path, tokenizer: Any, bf16: bool) -> dict[str, _TaskEval]:
    """The tasks of the run ``cfg.model`` started from (none unless ``model:`` is a run folder), and
    of the run that one started from, and so on (A -> B -> C tests A and B), each tested with its
    run's own task settings; the data prepared into ``data/previous/<name>/``."""
    jobs: dict[str, _TaskEval] = {}
    source = resolve_model(cfg.model)
    while source.kind == "run":
        earlier_dir = Path(source.location)
        earlier = load_config(earlier_dir / "config.yaml")
        tasks = {t.name: task_config(earlier, t) for t in earlier.tasks} or {earlier.name: earlier}
        for name, c in tasks.items():
            if name not in jobs:  # the latest run to train a task of that name is the one compared with
                jobs[name] = _task_job(c, run_dir / "data" / "previous" / name, tokenizer, bf16)
                jobs[name].earlier_run = earlier_dir
        try:
            source = resolve_model(earlier.model)
        except ModelError:  # that run's own starting point is gone: its tasks are still tested above
            break
    return jobs


def _evaluate_on(job: _TaskEval, name: str, model: torch.nn.Module | ApiModel, tokenizer: Any, bf16: bool, head: bool,
                 progress: Progress, questions: list[Example] | None = None, run_dir: Path | None = None,
                 identity: str = "", should_stop: Callable[[], bool] | None = None) -> None:
    """Evaluate ``model`` as ``name`` (base | tuned) on one task's test examples, as asked
    (``questions``: e.g. with the prompt method's shots; the test split by default); store the
    Evaluation and the metrics with the batched evaluation's speed (and the tuned model's latency).
    With ``run_dir``, answers are kept in its eval_cache/ as they are made (``identity``: the
    model's weights or endpoint), so a stopped evaluation continues there."""
    cfg, e = job.cfg, job.cfg.eval
    questions = job.splits.test if questions is None else questions
    store = AnswerStore(None, "")
    if run_dir is not None:
        key = f"{name}-{job.cfg.name}" if job.earlier_run is None else f"{name}-previous-{job.cfg.name}"
        store = AnswerStore(run_dir / CACHE / f"{key}.jsonl", answers_fingerprint(
            identity, runtime.INFERENCE_PRECISION, [ex.messages if ex.text is None else ex.text for ex in questions],
            [ex.label for ex in questions], cfg.task, dict(cfg.data.labels), cfg.data.chat_template, cfg.train.max_seq_len,
            cfg.data.truncation_side, dataclasses.replace(e, bootstrap_resamples=0, latency_examples=0)))
    t0 = time.perf_counter()
    job.evals[name] = ev = evaluate_model(
        model, tokenizer, questions, cfg.task, cfg.data.labels, cfg.train.max_seq_len, e.batch_size, e.max_new_tokens,
        bf16, progress, e.label_scoring, e.classify_by, e.bootstrap_resamples, head=head, side=cfg.data.truncation_side,
        store=store, should_stop=should_stop, description=f"evaluating {name}" + (f" ({job.cfg.name})" if job.earlier_run else ""))
    seconds = time.perf_counter() - t0
    fresh = len(questions) - ev.from_store  # rates are of the answers made now (a resumed evaluation kept the rest)
    job.results[name] = ev.metrics | {
        "seconds": seconds, "examples_per_s": fresh / max(seconds, 1e-9) if fresh else None,
        "tokens_per_s": ev.fresh_tokens / max(seconds, 1e-9) if ev.fresh_tokens else None}
    if ev.from_store:
        job.results[name]["answers_resumed"] = ev.from_store
    if cut := _cut_summary(ev.cuts, model, tokenizer):
        job.results[name]["prompts_cut"] = cut
        job.results.setdefault("warnings", []).append(
            f"{name}: {cut['examples']} of {len(questions)} prompts were longer than the model's context "
            f"({cut['context']:,} tokens) and were shortened, {cut['tokens_removed']:,} tokens in all ({cut['where']}); "
            "those answers saw only part of their input")
    if name == "tuned" and e.latency_examples and cfg.task != "text":  # raw text: nothing to answer
        job.results[name]["latency"] = latency(model, tokenizer, questions[: e.latency_examples], cfg.task,
                                               cfg.data.labels, cfg.train.max_seq_len, e.max_new_tokens, bf16,
                                               e.label_scoring, e.classify_by, head, progress,
                                               side=cfg.data.truncation_side, should_stop=should_stop)


def _cut_summary(cuts: list[dict[str, Any] | None], model: Any, tokenizer: Any) -> dict[str, Any] | None:
    """How many prompts were cut to the model's context, the tokens removed, and where (None: none were)."""
    done = [(i, c) for i, c in enumerate(cuts) if c]
    if not done:
        return None
    context = context_length(model, tokenizer) if not isinstance(model, ApiModel) else 0
    wheres = sorted({c["where"] for _, c in done})
    return {"examples": len(done), "tokens_removed": sum(c["removed"] for _, c in done), "context": context,
            "where": "; ".join(wheres[:3]) + (" ..." if len(wheres) > 3 else ""),
            "first": [{"example": i, **c} for i, c in done[:5]]}


def _phase_writer(run_dir: Path) -> Callable[[str, float, float | None, float | None, float | None], None]:
    """The progress display's ``on_update``: the evaluation's phase and progress into phase.json."""
    def write(description: str, completed: float, total: float | None, rate: float | None, eta: float | None) -> None:
        set_phase(run_dir, "evaluating", description, completed, total, eta)
    return write


def _files_identity(path: Path) -> list[Any]:
    """Names, sizes and modification times of a file or of a folder's files (what changes when weights do)."""
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else []
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def _weights_identity(spec: str) -> str:
    """The base model's identity: its ``model:`` value and, when local, its files."""
    try:
        source = resolve_model(spec)
    except ModelError:
        return spec
    return json.dumps([spec, _files_identity(Path(source.location)) if source.kind != "hub" else []])


def _artifact_identity(run_dir: Path, cfg: Config) -> str:
    """The tuned model's identity: its saved artifact's files (a further resume changes them)."""
    return json.dumps(_files_identity(run_dir / methods.METHODS[cfg.method].ARTIFACT))


def _api_identity(model: ApiModel) -> str:
    return json.dumps([model.name, getattr(model, "base_url", "")])


def _compare_task(job: _TaskEval) -> None:
    """Paired tuned-vs-base tests and the examples where they disagree, when the base was evaluated."""
    if "base" not in job.evals:
        return
    test, cfg = job.splits.test, job.cfg
    job.results["tuned_vs_base"] = compare(job.evals["tuned"], job.evals["base"], len(test), cfg.eval.bootstrap_resamples)
    if cfg.task != "text":
        job.results["disagreements"] = _disagreements(test, job.evals["base"].predictions, job.evals["tuned"].predictions, cfg)


def macro_average(tasks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The macro average of the tasks' headline metrics (each task's ``metric``), for base and tuned:
    ``{"macro": {...}, "base": {"macro": b}, "tuned": {"macro": t}}`` (base only when every task has one).
    Averaging mixes the metrics' scales: tasks with different headline metrics (accuracy, F1, ROUGE-L)
    count equally; a perplexity (lower is better) should not be averaged with them."""
    out: dict[str, Any] = {"macro": {"metrics": {n: r["metric"] for n, r in tasks.items()}}}
    for side in ("base", "tuned"):
        values = [r[side][r["metric"]] for r in tasks.values() if r["metric"] in (r.get(side) or {})]
        if values and len(values) == len(tasks):
            avg = sum(values) / len(values)
            out["macro"][side], out[side] = avg, {"macro": avg}
    if "base" in out:
        out["macro"]["change"] = out["macro"]["tuned"] - out["macro"]["base"]
    return out


def _earlier_score(job: _TaskEval) -> dict[str, Any]:
    """For a task of the run this one started from: that run's own tuned score on it (from its
    eval.json; else this evaluation's base, the same model) and the drop since (> 0: forgotten)."""
    metric = job.results["metric"]
    ev = load_json(job.earlier_run / "eval.json") if job.earlier_run else {}
    own = ev["tasks"].get(job.cfg.name, {}) if ev.get("tasks") else ev
    score = (own.get("tuned") or {}).get(metric) if own.get("metric") == metric else None
    source = f"{job.earlier_run}/eval.json"
    if score is None and metric in (job.results.get("base") or {}):
        score, source = job.results["base"][metric], "the base model here (the earlier run's model) on this test split"
    now = job.results["tuned"][metric]
    drop = None if score is None else (now - score if metric in M.LOWER_IS_BETTER else score - now)
    return {"earlier": {"run": str(job.earlier_run), "metric": metric, "tuned": score, "from": source}, "drop": drop}


def prediction_row(ex: Example, i: int, evals: dict[str, Evaluation]) -> dict[str, Any]:
    """One line of predictions.jsonl: the reference(s), each model's prediction and its loss on the
    example ([summed NLL, target tokens]), so methods can be compared pairwise later."""
    row: dict[str, Any] = {"reference": reference(ex)}
    if ex.references:
        row["references"] = references(ex)
    for name, e in evals.items():
        row[name] = e.predictions[i]
        if e.nll is not None:
            row[f"{name}_nll"] = [e.nll[0][i], e.nll[1][i]]
    return row


def stats_from_predictions(rows: list[dict[str, Any]], side: str, task: str,
                           label_words: dict[str, str]) -> tuple[dict[str, Any], dict[str, M.Stat]]:
    """The metrics of one model (``side``: base or tuned) rebuilt from predictions.jsonl rows."""
    refs = [r.get("references") or [r["reference"]] for r in rows]
    nll = ([r[f"{side}_nll"][0] for r in rows], [r[f"{side}_nll"][1] for r in rows]) \
        if rows and all(f"{side}_nll" in r for r in rows) else None
    return task_metrics(task, refs, [r[side] for r in rows], label_words, nll)


def _reused_base(source: Path, cfg: Config, test: list[Example]) -> Evaluation | None:
    """The base model's evaluation from run folder ``source``, if it was made on exactly these test
    examples with the same model and settings that decide its answers; None otherwise."""
    try:
        theirs = load_config(source / "config.yaml")
        ev = load_json(source / "eval.json")
        rows = read_jsonl(source / "predictions.jsonl")
    except (OSError, ValueError, ConfigError):
        return None
    same = (theirs.model == cfg.model and theirs.task == cfg.task and theirs.classifier == cfg.classifier
            and dataclasses.replace(theirs.data, max_train_examples=None) == dataclasses.replace(cfg.data, max_train_examples=None)
            and theirs.train.max_seq_len == cfg.train.max_seq_len
            and theirs.train.precision == cfg.train.precision and theirs.train.seed == cfg.train.seed
            and dataclasses.replace(theirs.eval, bootstrap_resamples=0, latency_examples=0, batch_size=0)
            == dataclasses.replace(cfg.eval, bootstrap_resamples=0, latency_examples=0, batch_size=0))
    refs = [reference(ex) for ex in test]
    if not same or "base" not in ev or [r.get("reference") for r in rows] != refs or any("base" not in r for r in rows):
        return None
    preds = [r["base"] for r in rows]
    nll = ([r["base_nll"][0] for r in rows], [r["base_nll"][1] for r in rows]) if all("base_nll" in r for r in rows) else None
    # metrics as measured there (intervals, timing); the resamplable statistics for paired tests
    return Evaluation(ev["base"], preds, stats_from_predictions(rows, "base", cfg.task, cfg.data.labels)[1], nll=nll)


def print_table(results: dict[str, Any], console: Console, where: str = "") -> None:
    """Base vs tuned (one task's results): each metric with its change; ``where`` ends the title."""
    table = Table(title=f"base vs tuned on {results['test_examples']} test examples{where}")
    for col in ("metric", "base", "tuned", "change"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for row in metrics_table(results):
        table.add_row(*row)
    console.print(table)


def print_macro(results: dict[str, Any], console: Console) -> None:
    """The multi-task summary: each task's headline metric (base, tuned, change) and their macro average."""
    table = Table(title="macro average over the tasks (each task's headline metric)")
    for col in ("task", "metric", "base", "tuned", "change"):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")

    def row(name: str, metric: str, base: float | None, tuned: float | None) -> tuple[str, ...]:
        change = f"{tuned - base:+.4f}" if base is not None and tuned is not None else ""
        return (name, metric, "" if base is None else f"{base:.4f}", "" if tuned is None else f"{tuned:.4f}", change)

    for name, r in results.get("tasks", {}).items():
        m = r["metric"]
        table.add_row(*row(name, m, (r.get("base") or {}).get(m), (r.get("tuned") or {}).get(m)))
    macro = results["macro"]
    table.add_row(*row("[bold]macro[/bold]", "mean", macro.get("base"), macro.get("tuned")))
    console.print(table)
    metrics = sorted({r["metric"] for r in results.get("tasks", {}).values()})
    if len(metrics) > 1:
        mixed = len({m in M.LOWER_IS_BETTER for m in metrics}) > 1
        console.print(f"[yellow]note: the macro average mixes different metrics ({', '.join(metrics)}): a summary, "
                      "not a measurement; judge each task by its own row and the interval in its table above"
                      + (". Some of these are better lower and some higher: their mean means nothing" if mixed else "")
                      + "[/yellow]", highlight=False)


def _disagreements(test: list[Example], base: list[str], tuned: list[str], cfg: Config, limit: int = 12) -> list[dict[str, str]]:
    out = []
    for ex, b, t in zip(test, base, tuned):
        if b != t:
            user = [m["content"] for m in ex.messages if m["role"] == "user"][-1]
            ref = ex.label if cfg.task == "classification" else [m for m in ex.messages if m["role"] == "assistant"][-1]["content"]
            words = cfg.data.labels
            out.append({"input": user, "reference": words.get(ref, ref) if ref else "",
                        "base": words.get(b, b), "tuned": words.get(t, t)})
        if len(out) >= limit:
            break
    return out


def _progress(console: Console) -> Progress:
    return make_progress(console, extra=None)
