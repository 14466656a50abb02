"""What a run will cost before it runs: parameters, tokens, FLOPs, peak memory, time and money.

``estimate(cfg)`` (``tunesmith estimate``) prepares the data as training would, counts the
tokens of every planned step (after truncation, length grouping and packing), and predicts:

* FLOPs: ``flops.flops_per_token`` (its formula and source are there) times the run's tokens.
* Peak memory (MiB): the process before the model (measured) + weights + gradients (fp32, one
  per trainable parameter) + AdamW's two fp32 moments + activations of the largest micro-batch.
  Activations are not guessed from a formula: one forward of the prepared model at three
  sequence lengths runs under ``torch.autograd.graph.saved_tensors_hooks``, which sees every
  tensor kept for backward; ``bytes(rows, T) = rows * (a*T + b*T^2) + c`` is fitted to them
  (``c``: what one forward keeps whatever its size, e.g. the fused head's weight gradient).
  With gradient checkpointing the same measurement runs with checkpointing on, plus the
  layer inputs it keeps (fp32) and one layer recomputed at a time. A calibration run then
  measures its own peak: what it used beyond the fixed parts, over the fit's prediction for its
  largest micro-batch, is ``activation_factor`` (>= 1: gradients of activations, temporaries and
  the allocator come on top of the saved tensors), applied to the run's largest micro-batch.
* Time: from a calibration run of this config on this machine (the real training loop for a few
  steps, about ``estimate.calibrate_seconds``), or from ``estimate.device_tflops`` (a device's
  sustained training TFLOP/s). Validations are timed on the validation split's own batches.
* Cost: predicted hours times ``estimate.price_per_hour``.

The result goes to ``<run>/estimate.json``; ``train`` prints it at start and records predicted
against actual in ``train_result.json`` (``estimate``), which the report shows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from tunesmith import runtime
from tunesmith.training import flops
from tunesmith.runtime.commands import command
from tunesmith.config import Config, to_dict, train_settings
from tunesmith.io import atomic_write_json
from tunesmith.training.losses import target_loss_sum
from tunesmith.training.loop import tokens_of

MIB = 2**20
FILE = "estimate.json"


# ---------------------------------------------------------------- the plan: steps and tokens


def plan(cfg: Config, train_data: list[Any]) -> dict[str, Any]:
    """Every planned optimizer step's tokens, as the loop will batch them (``train.step_batches``).

    Returns steps, epochs, steps_per_epoch, tokens (real, per run), padded_tokens (what the
    model computes on), target_tokens, tokens_per_epoch, and the largest micro-batch as
    ``max_micro`` = (rows, padded length)."""
    from tunesmith.training.loop import step_batches

    t = cfg.train
    lengths = [tokens_of(e) for e in train_data]  # a preference pair: both its sides
    sides = 2 if any(getattr(e, "rejected", None) is not None for e in train_data[:1]) else 1
    groups = [(e.kind, e.task) for e in train_data]
    groups = groups if len(set(groups)) > 1 else None
    steps_per_epoch = math.ceil(math.ceil(len(train_data) / t.batch_size) / t.grad_accum)
    total = t.max_steps or t.epochs * steps_per_epoch
    tokens = padded = targets = 0
    biggest = (0, 0)
    per_epoch = sum(lengths)
    for step in range(total):
        epoch, pos = divmod(step, steps_per_epoch)
        for mb in step_batches(lengths, t, epoch, pos, groups):
            rows = [lengths[i] for i in mb]
            tokens += sum(rows)
            targets += sum(train_data[i].n_targets for i in mb)
            shape = ((math.ceil(sum(rows) / t.max_seq_len), t.max_seq_len) if t.packing else
                     (len(rows) * sides, math.ceil(max(rows) / sides)))  # pairs: chosen and rejected rows side by side
            padded += shape[0] * shape[1]
            biggest = max(biggest, shape, key=lambda s: (s[0] * s[1], s[1]))
    return {"steps": total, "steps_per_epoch": steps_per_epoch, "epochs": total / steps_per_epoch,
            "train_examples": len(train_data), "tokens_per_epoch": per_epoch, "tokens": tokens,
            "padded_tokens": padded, "target_tokens": targets, "max_micro": list(biggest), "rows_per_example": sides}


def evaluations(cfg: Config, steps: int, steps_per_epoch: int) -> int:
    """How many validations a run of ``steps`` makes (every eval_every, each epoch's end, the last step)."""
    return sum(1 for s in range(1, steps + 1) if s % cfg.train.eval_every == 0 or s % steps_per_epoch == 0 or s == steps)


# ---------------------------------------------------------------- memory


def _parameter_storages(model: torch.nn.Module) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in model.parameters()}


def saved_bytes(model: torch.nn.Module, rows: int, length: int, bf16: bool, target_share: float) -> int:
    """Bytes of the tensors one forward of (rows, length) tokens keeps for backward (each storage
    once; the parameters themselves not counted). Runs the training loss under autocast."""
    dev = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (rows, length), generator=g).to(dev)
    if _inner(model).get_output_embeddings() is None:  # a classification head: one label per row
        labels = torch.zeros(rows, dtype=torch.long, device=dev)
    else:
        labels = torch.full_like(ids, -100)
        n = max(1, round(target_share * length))
        labels[:, length - n:] = ids[:, length - n:]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    params = _parameter_storages(model)
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        with contextlib.suppress(RuntimeError):  # e.g. a tensor without storage
            s = t.untyped_storage()
            if s.data_ptr() not in params:
                seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        return t

    was_training = model.training
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), runtime.autocast(dev, bf16):
            loss, _ = target_loss_sum(model, batch)
        del loss
    finally:
        model.train(was_training)
    return sum(seen.values())


def activation_model(model: torch.nn.Module, bf16: bool, target_share: float, checkpointing: bool,
                     lengths: tuple[int, int, int] = (32, 64, 128)) -> dict[str, float]:
    """Fit ``bytes(rows, T) = rows * (a*T + b*T^2) + c`` to saved-tensor measurements at three
    lengths (one row each); with ``checkpointing`` measured with activation checkpointing on.
    Returns a, b, c (bytes)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    new = hasattr(inner, "activation_checkpointing_enable")  # transformers 5.x's name
    if checkpointing:
        if new:
            inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        ys = [saved_bytes(model, 1, n, bf16, target_share) for n in lengths]
    finally:
        if checkpointing:
            inner.activation_checkpointing_disable() if new else inner.gradient_checkpointing_disable()
    x = torch.tensor([[n, n * n, 1.0] for n in lengths], dtype=torch.float64)
    a, b, c = torch.linalg.solve(x, torch.tensor(ys, dtype=torch.float64)).tolist()
    return {"a": max(a, 0.0), "b": max(b, 0.0), "c": max(c, 0.0)}


def activations(fit: dict[str, float], rows: int, length: int) -> float:
    """Predicted bytes kept for backward by one micro-batch of ``rows`` x ``length`` tokens."""
    return rows * (fit["a"] * length + fit["b"] * length * length) + fit["c"]


def rss_mib() -> float:
    """This process's resident memory now (MiB; 0 where /proc is missing)."""
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def machine_memory_mib(dev: torch.device) -> float | None:
    """Memory a run may use: the GPU's total, or the machine's RAM (MemTotal)."""
    if dev.type == "cuda":
        return torch.cuda.get_device_properties(dev).total_memory / MIB
    with contextlib.suppress(OSError):
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 1024
    return None


def memory(model: torch.nn.Module, cfg: Config, max_micro: tuple[int, int], bf16: bool, target_share: float,
           baseline_mib: float) -> dict[str, Any]:
    """The peak memory parts in MiB, with and without gradient checkpointing, and the fits used."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / MIB
    grads = sum(p.numel() * 4 for p in trainable) / MIB  # fp32 gradients (parameters are fp32 masters)
    optim = 2 * sum(p.numel() * 4 for p in trainable) / MIB  # AdamW: exp_avg and exp_avg_sq
    rows, length = max_micro
    plain = activation_model(model, bf16, target_share, checkpointing=False)
    ckpt = activation_model(model, bf16, target_share, checkpointing=True)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers, width = inner.config.num_hidden_layers, inner.config.hidden_size
    act = activations(plain, rows, length) / MIB
    # checkpointing keeps each layer's input (fp32 residual stream), and recomputes one layer at a time
    kept_inputs = layers * rows * length * width * 4 / MIB
    act_ckpt = activations(ckpt, rows, length) / MIB + kept_inputs + (act - plain["c"] / MIB) / max(layers, 1)
    fixed = baseline_mib + weights + grads + optim
    return {"baseline": baseline_mib, "weights": weights, "gradients": grads, "optimizer": optim,
            "activations": act, "activations_checkpointed": act_ckpt,
            "peak": fixed + act, "peak_checkpointed": fixed + act_ckpt,
            "chosen": "peak_checkpointed" if cfg.train.gradient_checkpointing else "peak",
            "fits": {"plain": plain, "checkpointed": ckpt}, "max_micro_batch": [rows, length]}


def advice(mem: dict[str, Any], cfg: Config, limit_mib: float | None) -> list[str]:
    """Settings under which the predicted peak fits ``limit_mib`` (empty when it fits already)."""
    chosen = mem[mem["chosen"]]
    if limit_mib is None or chosen <= limit_mib:
        return []
    fixed = mem["baseline"] + mem["weights"] + mem["gradients"] + mem["optimizer"]
    fit = mem["fits"]["plain"]
    rows, length = mem["max_micro_batch"]
    out = []
    if not cfg.train.gradient_checkpointing and mem["peak_checkpointed"] <= limit_mib:
        out.append(f"train.gradient_checkpointing=true: {mem['peak_checkpointed']:,.0f} MiB (steps ~30% slower)")
    for div in (2, 4, 8, 16):
        r = max(1, rows // div)
        peak = fixed + activations(fit, r, length) / MIB
        if peak <= limit_mib and r < rows:
            out.append(f"train.batch_size={max(1, cfg.train.batch_size // div)} train.grad_accum={cfg.train.grad_accum * div} "
                       f"(the same examples per step): {peak:,.0f} MiB")
            break
    if cfg.method == "full" and chosen - mem["gradients"] - mem["optimizer"] <= limit_mib:
        out.append("method=lora: no gradients or optimizer state for the frozen weights "
                   f"(about {chosen - mem['gradients'] - mem['optimizer']:,.0f} MiB)")
    if not out:
        out.append(f"none of gradient checkpointing, a smaller micro-batch{' or LoRA' if cfg.method == 'full' else ''} "
                   "alone: shorten train.max_seq_len or train.batch_tokens, combine them, or use a bigger device")
    if fixed > limit_mib:
        out.append(f"the weights, gradients and optimizer alone take {fixed:,.0f} MiB: a smaller model, method=lora, "
                   "or train.strategy=fsdp over several devices")
    return out


# ---------------------------------------------------------------- time


def _objective(cfg: Config, model: torch.nn.Module, pad_id: int) -> Any:
    """The loss a calibration run trains with: the task's, or a preference run's objective. Its reference is scored
    each step with the adapters off (LoRA: the same work as scoring it once before an epoch), or, for full
    fine-tuning, taken as 0 (the precomputed pass is not timed)."""
    if cfg.task != "preference":
        return None
    from tunesmith.training import preference as P

    return P.PreferenceLoss(cfg.preference, model, pad_id, "adapter" if cfg.method == "lora" else "precomputed")


def calibrate(model: torch.nn.Module, cfg: Config, train_data: list[Any], val_data: Any, pad_id: int,
              seconds: float) -> dict[str, float]:
    """Tokens per second of the real training loop on this machine: ``train`` runs this config
    for about ``seconds`` (at least 3 steps) in a scratch folder; the first step (warm-up) is
    timed apart. Validation speed: one validation of up to 4 batches. The model's weights change."""
    from tunesmith.training.loop import train
    from tunesmith.training.losses import validation_loss

    base = train_settings(cfg)
    cal = dataclasses.replace(base, eval_every=10**9, save_every=0, keep_checkpoints=1,
                              early_stopping=dataclasses.replace(cfg.train.early_stopping, patience=0))
    rows = val_data if not isinstance(val_data, dict) else [r for v in val_data.values() for r in v]
    some = rows[: 4 * cfg.train.batch_size] or train_data[: cfg.train.batch_size]
    start_rss = rss_mib()
    with tempfile.TemporaryDirectory(prefix="tunesmith-calibrate-") as tmp:
        result = train(model, train_data, some, cal, Path(tmp), pad_id, show_progress=False,
                       until_seconds=seconds, until_step=None, min_steps=3, objective=_objective(cfg, model, pad_id))
    steps = [r for r in result.history if r.get("type") == "train"]
    done = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=max(len(steps), 1)))
    later = steps[1:] or steps
    tok_s = sum(r["tokens"] for r in later) / max(sum(r["step_seconds"] for r in later), 1e-9)
    warmup = max(0.0, steps[0]["step_seconds"] - steps[0]["tokens"] / tok_s) if steps else 0.0
    dev = next(model.parameters()).device
    bf16 = runtime.use_bf16(cfg.train.precision, dev)
    runtime.reset_peak_memory(dev)
    before = torch.cuda.memory_allocated(dev) / MIB if dev.type == "cuda" else rss_mib()
    start = time.perf_counter()
    validation_loss(model, some, cfg.train.batch_size, pad_id, bf16)
    val_tok_s = sum(tokens_of(e) for e in some) / max(time.perf_counter() - start, 1e-9)
    val_extra = runtime.peak_memory_mib(dev).get("gpu" if dev.type == "cuda" else "rss", before) - before
    return {"tokens_per_s": tok_s, "warmup_seconds": warmup, "steps_timed": len(steps),
            "validation_tokens_per_s": val_tok_s, "start_rss_mib": start_rss, "validation_extra_mib": val_extra,
            "peak_rss_mib": (result.peak_memory_mib or {}).get("gpu" if dev.type == "cuda" else "rss"),
            "max_micro": plan(done, train_data)["max_micro"]}


# ---------------------------------------------------------------- the estimate


def config_key(cfg: Config) -> str:
    """A fingerprint of what decides a run's cost (the config without output, evaluation and estimate settings)."""
    d = to_dict(cfg)
    for k in ("output_dir", "eval", "estimate", "name"):
        d.pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def estimate_for(cfg: Config, model: torch.nn.Module, train_data: list[Any], val_data: Any, pad_id: int,
                 baseline_mib: float, calibrate_seconds: float = 0.0, device_tflops: float | None = None,
                 price_per_hour: float | None = None, device_memory_gib: float | None = None) -> dict[str, Any]:
    """The estimate for a prepared model (``methods.prepare`` done) and encoded data.

    ``baseline_mib``: the process's memory besides the model's weights. Time comes from a
    calibration run when ``calibrate_seconds`` > 0 (changes the model's weights: use a copy you
    throw away), else from ``device_tflops`` (sustained TFLOP/s), else it is left out.
    Returns a JSON-ready dict (see the module docstring)."""
    dev = next(model.parameters()).device
    bf16 = runtime.use_bf16(cfg.train.precision, dev)
    p = plan(cfg, train_data)
    total = sum(x.numel() for x in model.parameters())
    trainable = sum(x.numel() for x in model.parameters() if x.requires_grad)
    share = p["target_tokens"] / max(p["tokens"], 1)
    mean_len = p["tokens_per_epoch"] / max(p["train_examples"], 1)
    per_token = flops.flops_per_token(model, mean_len, share)
    val_rows = val_data if not isinstance(val_data, dict) else [r for v in val_data.values() for r in v]
    val_tokens = sum(tokens_of(e) for e in val_rows)
    n_evals = evaluations(cfg, p["steps"], p["steps_per_epoch"])
    out: dict[str, Any] = {
        "config_key": config_key(cfg), "method": cfg.method, "device": dev.type, "precision": "bf16" if bf16 else "fp32",
        "parameters": total, "trainable_parameters": trainable, **{k: v for k, v in p.items()},
        "validation_tokens": val_tokens, "evaluations": n_evals, "flops_per_token": per_token,
        "flops": per_token * p["tokens"],
        "memory_mib": memory(model, cfg, tuple(p["max_micro"]), bf16, share, baseline_mib),
    }
    memory_gib = device_memory_gib or cfg.estimate.device_memory_gib
    limit = memory_gib * 1024 if memory_gib else machine_memory_mib(dev)
    out["machine_memory_mib"], out["memory_of"] = limit, "the given device" if memory_gib else ("this GPU" if dev.type == "cuda" else "this machine")
    out["machine"] = platform.node()
    out["advice"] = advice(out["memory_mib"], cfg, limit)
    price = cfg.estimate.price_per_hour if price_per_hour is None else price_per_hour
    device_tflops = cfg.estimate.device_tflops if device_tflops is None else device_tflops
    speed: dict[str, float] | None = None
    if calibrate_seconds > 0:
        speed = calibrate(model, cfg, train_data, val_data, pad_id, calibrate_seconds) | {"source": "calibration"}
    elif device_tflops:
        tok_s = device_tflops * 1e12 / per_token
        speed = {"tokens_per_s": tok_s, "warmup_seconds": 0.0, "validation_tokens_per_s": 3 * tok_s,
                 "source": f"device {device_tflops:g} TFLOP/s"}  # a forward is ~1/3 of a training step
    if speed and speed.get("peak_rss_mib"):
        _correct_activations(out["memory_mib"], speed, dev)
        out["advice"] = advice(out["memory_mib"], cfg, limit)
    if speed:
        train_s = p["tokens"] / speed["tokens_per_s"] + speed["warmup_seconds"]
        eval_s = n_evals * val_tokens / speed["validation_tokens_per_s"]
        out["time"] = speed | {"train_seconds": train_s, "validation_seconds": eval_s, "seconds": train_s + eval_s}
        if price:
            out["cost"] = {"price_per_hour": price, "cost": (train_s + eval_s) / 3600 * price}
    return out


def _correct_activations(mem: dict[str, Any], speed: dict[str, Any], dev: torch.device) -> None:
    """Scale the activation prediction by what the calibration run really used beyond the fixed
    parts (saved tensors are most, not all, of it: gradients of activations, the allocator and
    temporaries come on top); the factor is kept as ``activation_factor``."""
    fit = mem["fits"]["plain"]
    predicted = activations(fit, *speed["max_micro"]) / MIB
    start = 0.0 if dev.type == "cuda" else speed["start_rss_mib"]  # the GPU allocator's peak counts from 0
    used = speed["peak_rss_mib"] - start - mem["gradients"] - mem["optimizer"]
    if dev.type == "cuda":
        used -= mem["weights"]
    # what the process held when training started beyond the model (e.g. heap kept by glibc)
    held = 0.0 if dev.type == "cuda" else max(0.0, start - mem["baseline"] - mem["weights"])
    # a validation pass (no gradients, but whole batches of logits) is a peak of its own
    scale_activations(mem, max(1.0, used / predicted) if predicted > 0 and used > 0 else 1.0,
                      speed.get("validation_extra_mib"), held)


def scale_activations(mem: dict[str, Any], k: float, validation: float | None = None, held: float = 0.0) -> None:
    """Multiply the predicted activations by ``k`` (a calibration's ``activation_factor``) and redo
    the peaks; ``validation``: the measured extra of a validation pass (a peak of its own);
    ``held``: memory the calibration process held at its start beyond baseline and weights."""
    mem["activation_factor"] = k
    mem["held"] = held
    fixed = mem["baseline"] + held + mem["weights"] + mem["gradients"] + mem["optimizer"]
    for key, peak in (("activations", "peak"), ("activations_checkpointed", "peak_checkpointed")):
        mem[key] *= k
        mem[peak] = fixed + mem[key]
    if validation is not None:
        mem["validation"] = validation
        for peak in ("peak", "peak_checkpointed"):
            mem[peak] = max(mem[peak], mem["baseline"] + held + mem["weights"] + mem["optimizer"] + validation)


def _inner(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def estimate(cfg: Config, console: Any = None, calibrate_seconds: float | None = None, device_tflops: float | None = None,
             price_per_hour: float | None = None, device_memory_gib: float | None = None) -> dict[str, Any]:
    """``tunesmith estimate``: prepare the data, load the model, predict; write ``<run>/estimate.json``.

    ``calibrate_seconds`` (default ``cfg.estimate.calibrate_seconds``; 0 = no calibration run) is
    ignored when ``device_tflops`` is given. Raises what ``finetune`` raises for bad config, data
    or model (ConfigError, DataError, ModelError, RunError)."""
    from rich.console import Console

    from tunesmith import methods
    from tunesmith.data.render import encode_examples
    from tunesmith.models import load_base, ready_tokenizer, uses_head
    from tunesmith.runs.data import multitask_data, preference_data
    from tunesmith.data.prepare import load_splits

    console = console or Console()
    if cfg.method == "prompt":
        from tunesmith.runs.errors import RunError

        raise RunError("method prompt trains nothing: there is no training cost to estimate")
    model, tokenizer = load_base(cfg)
    ready_tokenizer(tokenizer, cfg, console)
    head = uses_head(cfg)
    if cfg.tasks:
        train_set, val_set, _ = multitask_data(cfg, tokenizer, console)
    elif cfg.task == "preference":
        train_set, val_set, _, _ = preference_data(cfg, tokenizer, console)
        if cfg.method != "lora":  # the calibration steps take the reference as 0: its pass before training is not timed
            for p in train_set + val_set:
                p.reference = [0.0, 0.0, 0.0]
    else:
        splits = load_splits(cfg, cfg.run_dir / "data", tokenizer)
        train_set, _ = encode_examples(cfg, tokenizer, splits.train, head)
        val_set, _ = encode_examples(cfg, tokenizer, splits.validation, head)
    runtime.seed_everything(cfg.train.seed)
    model = methods.prepare(model, cfg).to(runtime.device())
    # what the process holds besides the weights once data and model are ready (as `train` measures it)
    baseline = rss_mib() - sum(p.numel() * p.element_size() for p in model.parameters()) / MIB
    seconds = cfg.estimate.calibrate_seconds if calibrate_seconds is None else calibrate_seconds
    result = estimate_for(cfg, model, train_set, val_set, tokenizer.pad_token_id, baseline,
                          0.0 if device_tflops else seconds, device_tflops, price_per_hour, device_memory_gib)
    if cfg.replay.ratio > 0:
        result["note"] = "replay rows are not counted (they are added when training starts)"
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cfg.run_dir / FILE, result)
    return result


def saved_for(cfg: Config) -> dict[str, Any] | None:
    """The run folder's estimate when it was made for this config on this machine (else None)."""
    path = cfg.run_dir / FILE
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return saved if saved.get("config_key") == config_key(cfg) and saved.get("machine") == platform.node() else None


def against_actual(predicted: dict[str, Any], train_result: dict[str, Any], wall_seconds: float) -> dict[str, Any]:
    """Predicted vs measured time and peak memory, with relative errors ((predicted - actual) / actual)."""
    mem = predicted.get("memory_mib") or {}
    out: dict[str, Any] = {"predicted_peak_mib": mem.get(mem.get("chosen", "peak")),
                           "actual_peak_mib": (train_result.get("peak_memory_mib") or {}).get("gpu" if predicted.get("device") == "cuda" else "rss")}
    t = predicted.get("time") or {}
    if t:
        out |= {"predicted_train_seconds": t["train_seconds"], "actual_train_seconds": train_result.get("train_seconds"),
                "predicted_seconds": t["seconds"], "actual_seconds": wall_seconds, "time_source": t.get("source")}
    for key in ("peak_mib", "train_seconds", "seconds"):
        p, a = out.get(f"predicted_{key}"), out.get(f"actual_{key}")
        if p is not None and a:
            out[f"error_{key}"] = (p - a) / a
    # the whole run does fewer steps when early stopping ends it: compare per step then
    done, planned = train_result.get("steps"), predicted.get("steps")
    if t and done and planned and done != planned:
        out["note"] = f"the run made {done} of {planned} planned steps: times compared per step"
        for key in ("train_seconds", "seconds"):
            if out.get(f"actual_{key}"):
                out[f"error_{key}"] = (out[f"predicted_{key}"] * done / planned - out[f"actual_{key}"]) / out[f"actual_{key}"]
    return out


def describe(est: dict[str, Any]) -> list[str]:
    """The estimate in lines a person reads (what ``tunesmith estimate`` and ``train`` print)."""
    m = est["memory_mib"]
    lines = [f"parameters: {est['parameters']:,} ({est['trainable_parameters']:,} trainable, "
             f"{100 * est['trainable_parameters'] / max(est['parameters'], 1):.2f}%)",
             f"data: {est['train_examples']:,} training examples, {est['tokens_per_epoch']:,} tokens per epoch; "
             f"{est['steps']:,} steps ({est['epochs']:.2f} epochs) = {est['tokens']:,} tokens "
             f"({est['padded_tokens']:,} with padding), {est['evaluations']} validations of {est['validation_tokens']:,} tokens",
             f"compute: {est['flops_per_token'] / 1e9:.2f} GFLOP per token, {est['flops'] / 1e15:.3f} PFLOP in all",
             f"peak memory: {m['peak']:,.0f} MiB (process {m['baseline'] + m.get('held', 0):,.0f} + weights {m['weights']:,.0f} + gradients "
             f"{m['gradients']:,.0f} + optimizer {m['optimizer']:,.0f} + activations {m['activations']:,.0f} for a "
             f"{m['max_micro_batch'][0]} x {m['max_micro_batch'][1]} micro-batch"
             + (" of rows: each pair's two answers" if est.get("rows_per_example", 1) == 2 else "")
             + "); with gradient checkpointing "
             f"{m['peak_checkpointed']:,.0f} MiB" + (" (on)" if m["chosen"] == "peak_checkpointed" else "")
             + ("" if m.get("activation_factor") else "; uncalibrated: saved tensors only, the real peak is "
                f"often higher ({command('estimate')} measures it)")]
    if est.get("machine_memory_mib"):
        chosen = m[m["chosen"]]
        lines.append(f"{est.get('memory_of', 'this machine')} has {est['machine_memory_mib']:,.0f} MiB: "
                     + ("fits" if chosen <= est["machine_memory_mib"] else "DOES NOT FIT; these settings would:"))
        lines += [f"  - {a}" for a in est.get("advice", [])]
    t = est.get("time")
    if t:
        lines.append(f"time: {_hms(t['seconds'])} ({_hms(t['train_seconds'])} training at {t['tokens_per_s']:,.0f} tokens/s, "
                     f"{_hms(t['validation_seconds'])} validating; from {t['source']})")
    else:
        lines.append(f"time: not predicted (run `{command('estimate', 'CONFIG')}` for a calibrated prediction, or give --device-tflops)")
    if est.get("cost"):
        lines.append(f"cost: {est['cost']['cost']:.4f} at {est['cost']['price_per_hour']:g} per hour")
    return lines


def _hms(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
