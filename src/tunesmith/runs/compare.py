"""Several methods on the same data and splits, measured side by side: the seed's table, measured.

``compare_methods(cfg, ["prompt", "lora", "full"])`` runs each method as its own run
(``runs/<name>-<method>/``, the prepared splits shared, the base model evaluated once), then
reads what each run recorded: trainable parameters, training time, tokens/s, peak memory,
inference latency (one example at a time) and batched throughput, artifact size, the test
metric with its 95% interval, the train-vs-validation loss gap (overfitting), and paired
bootstrap p-values between the best method and each other one (same test examples).

``data_sizes=[64, 256]`` adds the data needs: every method again on nested random subsets of the
training split (same recipe, same steps), and for each method the smallest size whose test
metric is not significantly below its score with all the data (the learning curve).
Writes ``compare.json``, ``compare.md`` and ``compare.html`` into ``runs/<name>-compare/``.
"""

from __future__ import annotations

import copy
import shutil
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from tunesmith.evaluation import learning_curve
from tunesmith.evaluation import metrics as M
from tunesmith.config import Config, ConfigError, load_config
from tunesmith.io import atomic_write_json, atomic_write_text, read_jsonl
from tunesmith.runtime.commands import command
from tunesmith.methods import METHODS
from tunesmith.report.html import load_json, write_compare_report
from tunesmith.report.tables import markdown, p_is, seconds_text, size_text
from tunesmith.runs import RunError, finetune, stats_from_predictions


@dataclass
class MethodResult:
    method: str
    run_dir: str
    metric: str
    value: float
    low: float
    high: float
    base_value: float | None
    trainable_parameters: int
    total_parameters: int
    train_seconds: float
    tokens_per_s: float | None
    peak_rss_mib: float | None
    peak_gpu_mib: float | None
    eval_seconds: float
    examples_per_s: float | None  # None when every answer came from a stopped evaluation's cache
    inference_tokens_per_s: float | None  # batched evaluation: tokens read (and written) per second
    latency_ms: float | None  # one example at a time: median milliseconds to an answer
    latency_p95_ms: float | None
    train_examples: int | None
    artifact_mib: float
    final_train_loss: float | None
    final_val_loss: float | None
    gap: float | None  # validation minus training loss at the end: large and growing = overfitting
    forgetting: float | None = None  # general-text perplexity change, relative to the base (+0.05 = 5% higher)
    general_kl: float | None = None  # KL(base || tuned) on general instructions, nats per token
    p_vs_best: float | None = None
    data_needs: int | None = None  # smallest training-set size not significantly below all the data
    curves: dict[str, list[list[float]]] = field(default_factory=dict)


def compare_methods(cfg: Config, method_names: list[str], console: Console | None = None,
                    data_sizes: list[int] | None = None, reuse: bool = False) -> dict[str, Any]:
    """Run every method in ``method_names`` on ``cfg``'s data; measure, compare, write the reports.

    ``data_sizes``: also run every method on that many training examples (nested seeded subsets)
    to measure each method's data needs. ``reuse``: a run folder that already holds a finished
    run of exactly the same config is measured as it is instead of run again (to continue an
    interrupted comparison, or to add data sizes or methods later).
    """
    console = console or Console()
    unknown = [m for m in method_names if m not in METHODS]
    if unknown or not method_names:
        raise RunError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if cfg.tasks:
        raise RunError("compare measures single-task runs; for a multi-task config (tasks:), train each method with "
                       f"{command('train', 'CONFIG', '--set', 'method=lora', '--set', 'name=...')} and read the runs' macro scores, "
                       "or compare the tasks one at a time")
    if cfg.task == "preference":
        raise RunError("compare does not yet measure preference runs; train each objective or method as its own run "
                       f"({command('train', 'CONFIG', '--set', 'preference.objective=simpo', '--set', 'name=...')}) "
                       "and read their eval.json (pairwise and reward accuracy with intervals)")
    if any(n < 1 for n in data_sizes or []):
        raise RunError(f"data sizes must be positive numbers of training examples, got {data_sizes}")
    out_dir = Path(cfg.output_dir) / f"{cfg.name}-compare"
    first: Path | None = None  # the first run: its prepared splits and base-model results are shared

    def run(method: str, size: int | None = None) -> MethodResult:
        nonlocal first
        c = copy.deepcopy(cfg)
        c.method, c.name = method, f"{cfg.name}-{method}" + (f"-n{size}" if size else "")
        if size:
            c.data.max_train_examples = size
        if reuse and _finished(c):
            console.print(f"[bold]{c.name}[/bold]: reusing the finished run in {c.run_dir} (same config)")
            first = first or c.run_dir
            return measure(c.run_dir, cfg.task, method, cfg.eval.metric)
        if first is not None:  # the same splits for every method (an older run's data folder is replaced)
            shutil.rmtree(c.run_dir / "data", ignore_errors=True)
            shutil.copytree(first / "data", c.run_dir / "data")
        console.rule(f"[bold]{method}" + (f" on {size:,} training examples" if size else ""))
        done = finetune(c, overwrite=True, console=console, base_from=first)
        if not done.eval:
            raise RunError(f"{method}: the run stopped before evaluation ({done.dir})")
        first = first or done.dir
        return measure(done.dir, cfg.task, method, cfg.eval.metric)

    results = [run(m) for m in method_names]
    curves: dict[str, list[MethodResult]] = {}
    for size in sorted(set(data_sizes or [])):
        for r in results:
            if r.train_examples is not None and size >= r.train_examples:
                console.print(f"[yellow]{r.method}: {size:,} is not below the {r.train_examples:,} training examples; skipped[/yellow]")
                continue
            curves.setdefault(r.method, []).append(run(r.method, size))
    doc = summarize(results, cfg.task, cfg.eval.bootstrap_resamples, curves, cfg.data.labels)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "compare.json", doc)
    atomic_write_text(out_dir / "compare.md", markdown(doc) + "\n")
    write_compare_report(out_dir, doc)
    return doc | {"dir": str(out_dir)}


def _finished(cfg: Config) -> bool:
    """Whether ``cfg.run_dir`` holds an evaluated run made with exactly ``cfg``."""
    folder = cfg.run_dir
    if not all((folder / f).is_file() for f in ("config.yaml", "eval.json", "predictions.jsonl", "train_result.json")):
        return False
    try:
        return load_config(folder / "config.yaml") == cfg
    except ConfigError:
        return False


def measure(run_dir: Path, task: str, method: str, metric: str = "auto") -> MethodResult:
    """Everything the comparison needs, read from a finished run's folder; ``metric`` is the
    headline (``eval.metric``)."""
    run_dir = Path(run_dir)
    evaluation = load_json(run_dir / "eval.json")
    training = load_json(run_dir / "train_result.json")
    history = read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
    metric = M.headline(task, metric)
    if metric not in evaluation["tuned"]:
        raise RunError(f"{run_dir}: eval.json has no {metric!r} for the tuned model (an API model has no perplexity); "
                       "choose another eval.metric")
    tuned, base = evaluation["tuned"], evaluation.get("base") or {}
    low, high = tuned["ci"][metric]
    train_steps = [r for r in history if r.get("type") == "train"]
    evals = [r for r in history if r.get("type") == "eval"]
    tail = train_steps[-max(1, len(train_steps) // 10):] if train_steps else []
    final_train = statistics.mean(r["loss"] for r in tail) if tail else None
    final_val = evals[-1]["val_loss"] if evals else None
    tokens = sum(r["tokens"] for r in train_steps)
    seconds = sum(r["step_seconds"] for r in train_steps)
    peak = training.get("peak_memory_mib") or {}
    latency = tuned.get("latency") or {}
    kept = (load_json(run_dir / "data_report.json").get("encoded") or {}).get("train", {}).get("kept")
    artifact = run_dir / METHODS[method].ARTIFACT
    return MethodResult(
        method=method, run_dir=str(run_dir), metric=metric, value=float(tuned[metric]), low=low, high=high,
        base_value=base.get(metric), trainable_parameters=int(training.get("trainable_parameters", 0)),
        total_parameters=int(training.get("total_parameters", 0)), train_seconds=float(training.get("train_seconds", 0.0)),
        tokens_per_s=tokens / seconds if seconds else None, peak_rss_mib=peak.get("rss"), peak_gpu_mib=peak.get("gpu"),
        eval_seconds=float(tuned["seconds"]), examples_per_s=tuned.get("examples_per_s"),
        inference_tokens_per_s=tuned.get("tokens_per_s"), latency_ms=latency.get("median_ms"),
        latency_p95_ms=latency.get("p95_ms"), train_examples=kept,
        artifact_mib=sum(f.stat().st_size for f in artifact.rglob("*") if f.is_file()) / 2**20,
        final_train_loss=final_train, final_val_loss=final_val,
        gap=final_val - final_train if final_train is not None and final_val is not None else None,
        curves={"train": [[r["step"], r["loss"]] for r in train_steps], "val": [[r["step"], r["val_loss"]] for r in evals]},
        forgetting=(evaluation.get("forgetting") or {}).get("change", {}).get("perplexity_relative"),
        general_kl=(evaluation.get("forgetting") or {}).get("tuned", {}).get("kl"),
    )


def summarize(results: list[MethodResult], task: str, resamples: int = M.RESAMPLES,
              curves: dict[str, list[MethodResult]] | None = None,
              label_words: dict[str, str] | None = None) -> dict[str, Any]:
    """Paired p-values of the best method against each other one, each method's data needs from
    its runs on fewer examples (``curves``), and the verdict in words. "Best" follows the metric's
    direction (lowest perplexity, highest accuracy)."""
    metric = results[0].metric
    best = min(results, key=lambda r: r.value) if metric in M.LOWER_IS_BETTER else max(results, key=lambda r: r.value)
    stats, sizes = {}, set()
    for r in results + [c for cs in (curves or {}).values() for c in cs]:
        stats[r.run_dir], n = _stat(Path(r.run_dir), task, r.metric, label_words)
        sizes.add(n)
    if len(sizes) != 1:
        raise RunError(f"the runs were tested on different numbers of examples {sorted(sizes)}; compare needs the same test split")
    for r in results:
        if r is not best:
            r.p_vs_best = M.paired_p_value(stats[best.run_dir], stats[r.run_dir], n, resamples)
    learning: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        points = []
        for c in sorted((curves or {}).get(r.method, []), key=lambda c: c.train_examples or 0):
            p = M.paired_p_value(stats[r.run_dir], stats[c.run_dir], n, resamples)  # against all the data
            points.append(_point(c, p))
            if r.data_needs is None and (not M.better(metric, r.value, c.value) or p >= 0.05):
                r.data_needs = c.train_examples
        if points:
            learning[r.method] = points + [_point(r, None)]
            r.data_needs = r.data_needs or r.train_examples
    fits = {m: learning_curve.fit(points, metric in M.LOWER_IS_BETTER) for m, points in learning.items()}
    return {"task": task, "metric": best.metric, "test_examples": n, "best": best.method,
            "p_floor": 1 / (1 + resamples),  # the smallest p the bootstrap can give
            "methods": [asdict(r) for r in results], "learning_curve": learning, "learning_fit": fits,
            "learning_fit_words": [learning_curve.in_words(f, metric, m) for m, f in fits.items()],
            "verdict": verdict(results, best)}


def _point(r: MethodResult, p_vs_all_data: float | None) -> dict[str, Any]:
    """One point of a learning curve: training examples, the metric with its interval, the paired
    p-value against the same method on all the data, the training time."""
    return {"train_examples": r.train_examples, "value": r.value, "low": r.low, "high": r.high,
            "p_vs_all_data": p_vs_all_data, "train_seconds": r.train_seconds, "run_dir": r.run_dir}


def _stat(run_dir: Path, task: str, metric: str, label_words: dict[str, str] | None = None) -> tuple[M.Stat, int]:
    """The headline metric of a run's tuned predictions, resamplable over test examples, and their number."""
    rows = read_jsonl(run_dir / "predictions.jsonl")
    labels = label_words or {r: r for r in sorted({r["reference"] for r in rows})}
    stats = stats_from_predictions(rows, "tuned", task, labels)[1]
    if metric not in stats:
        raise RunError(f"{run_dir}: predictions.jsonl cannot give {metric!r} (no per-example loss recorded)")
    return stats[metric], len(rows)


def verdict(results: list[MethodResult], best: MethodResult) -> str:
    """A few plain sentences: who wins, whether the others are significantly worse, at what cost."""
    words = [f"{best.method} scores best on {best.metric}: {best.value:.3f} (95% CI {best.low:.3f}-{best.high:.3f})"
             + (f", {'down' if best.metric in M.LOWER_IS_BETTER else 'up'} from {best.base_value:.3f} for the untuned base model."
                if best.base_value is not None else ".")]
    for r in results:
        if r is best:
            continue
        significant = r.p_vs_best is not None and r.p_vs_best < 0.05
        worse = "higher" if best.metric in M.LOWER_IS_BETTER else "lower"
        line = (f"{r.method}: {r.value:.3f}, " + (f"significantly {worse} (paired bootstrap {p_is(r.p_vs_best)})"
                if significant else f"not significantly different ({p_is(r.p_vs_best)})"))
        cost = [f"training {seconds_text(r.train_seconds)} vs {seconds_text(best.train_seconds)}",
                f"{size_text(r.artifact_mib)} vs {size_text(best.artifact_mib)} on disk"]
        if r.latency_ms is not None and best.latency_ms is not None:
            cost.append(f"{r.latency_ms:.0f} vs {best.latency_ms:.0f} ms per answer")
        words.append(f"{line}; {', '.join(cost)}.")
    needs = [r for r in results if r.data_needs is not None]
    if needs:
        words.append("Data needs (fewest training examples not significantly below all the data): "
                     + ", ".join(f"{r.method} {r.data_needs:,}" + (" (all of them)" if r.data_needs == r.train_examples else "")
                                 for r in needs) + ".")
    over = [r for r in results if r.gap is not None and r.final_train_loss and r.gap > 0.5 * r.final_train_loss]
    if over:
        words.append("Signs of overfitting (validation loss well above training loss at the end): "
                     + ", ".join(f"{r.method} (gap {r.gap:.3f})" for r in over) + ".")
    if not [r for r in results if r is not best and r.p_vs_best is not None and r.p_vs_best < 0.05]:
        words.append("No method is significantly better than the others on this test set; prefer the cheapest.")
    return " ".join(words)
