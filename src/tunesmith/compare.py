"""Several methods on the same data and splits, measured side by side: the seed's table, measured.

``compare_methods(cfg, ["prompt", "lora", "full"])`` runs each method as its own run
(``runs/<name>-<method>/``, the prepared splits shared), then reads what each run recorded:
trainable parameters, training time, tokens/s, peak memory, inference speed, artifact size,
the test metric with its 95% interval, the train-vs-validation loss gap (overfitting), and
paired bootstrap p-values between the best method and each other one (same test examples).
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

from tunesmith import metrics as M
from tunesmith.config import Config
from tunesmith.io import atomic_write_json, atomic_write_text, read_jsonl
from tunesmith.methods import METHODS
from tunesmith.report import load_json, write_compare_report
from tunesmith.runs import RunError, finetune


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
    examples_per_s: float
    artifact_mib: float
    final_train_loss: float | None
    final_val_loss: float | None
    gap: float | None  # validation minus training loss at the end: large and growing = overfitting
    p_vs_best: float | None = None
    curves: dict[str, list[list[float]]] = field(default_factory=dict)


def compare_methods(cfg: Config, method_names: list[str], console: Console | None = None) -> dict[str, Any]:
    """Run every method in ``method_names`` on ``cfg``'s data; measure, compare, write the reports."""
    console = console or Console()
    unknown = [m for m in method_names if m not in METHODS]
    if unknown or not method_names:
        raise RunError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    out_dir = Path(cfg.output_dir) / f"{cfg.name}-compare"
    results: list[MethodResult] = []
    shared_data: Path | None = None
    for method in method_names:
        c = copy.deepcopy(cfg)
        c.method, c.name = method, f"{cfg.name}-{method}"
        if shared_data is not None and not (c.run_dir / "data").exists():  # the same splits for every method
            shutil.copytree(shared_data, c.run_dir / "data")
        console.rule(f"[bold]{method}")
        run = finetune(c, overwrite=True, console=console)
        if not run.eval:
            raise RunError(f"{method}: the run stopped before evaluation ({run.dir})")
        results.append(measure(run.dir, cfg.task, method))
        shared_data = c.run_dir / "data"
    doc = summarize(results, cfg.task, cfg.eval.bootstrap_resamples)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "compare.json", doc)
    atomic_write_text(out_dir / "compare.md", markdown(doc) + "\n")
    write_compare_report(out_dir, doc)
    return doc | {"dir": str(out_dir)}


def headline_metric(task: str) -> str:
    return "accuracy" if task == "classification" else "rougeL"


def measure(run_dir: Path, task: str, method: str) -> MethodResult:
    """Everything the comparison needs, read from a finished run's folder."""
    run_dir = Path(run_dir)
    evaluation = load_json(run_dir / "eval.json")
    training = load_json(run_dir / "train_result.json")
    history = read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
    metric = headline_metric(task)
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
    artifact = run_dir / METHODS[method].ARTIFACT
    return MethodResult(
        method=method, run_dir=str(run_dir), metric=metric, value=float(tuned[metric]), low=low, high=high,
        base_value=base.get(metric), trainable_parameters=int(training.get("trainable_parameters", 0)),
        total_parameters=int(training.get("total_parameters", 0)), train_seconds=float(training.get("train_seconds", 0.0)),
        tokens_per_s=tokens / seconds if seconds else None, peak_rss_mib=peak.get("rss"), peak_gpu_mib=peak.get("gpu"),
        eval_seconds=float(tuned["seconds"]), examples_per_s=float(tuned["examples_per_s"]),
        artifact_mib=sum(f.stat().st_size for f in artifact.rglob("*") if f.is_file()) / 2**20,
        final_train_loss=final_train, final_val_loss=final_val,
        gap=final_val - final_train if final_train is not None and final_val is not None else None,
        curves={"train": [[r["step"], r["loss"]] for r in train_steps], "val": [[r["step"], r["val_loss"]] for r in evals]},
    )


def summarize(results: list[MethodResult], task: str, resamples: int = M.RESAMPLES) -> dict[str, Any]:
    """Paired p-values of the best method against each other one, and the verdict in words."""
    best = max(results, key=lambda r: r.value)
    stats, sizes = {}, set()
    for r in results:
        stats[r.method], n = _stat(Path(r.run_dir), task, r.metric)
        sizes.add(n)
    if len(sizes) != 1:
        raise RunError(f"the runs were tested on different numbers of examples {sorted(sizes)}; compare needs the same test split")
    for r in results:
        if r is not best:
            r.p_vs_best = M.paired_p_value(stats[best.method], stats[r.method], n, resamples)
    return {"task": task, "metric": best.metric, "test_examples": n, "best": best.method,
            "methods": [asdict(r) for r in results], "verdict": verdict(results, best)}


def _stat(run_dir: Path, task: str, metric: str) -> tuple[M.Stat, int]:
    """The headline metric of a run's tuned predictions, resamplable over test examples, and their number."""
    rows = read_jsonl(run_dir / "predictions.jsonl")
    refs, preds = [r["reference"] for r in rows], [r["tuned"] for r in rows]
    if task == "classification":
        return M.classification_stats(refs, preds, sorted(set(refs)))[metric], len(rows)
    return M.generation(refs, preds)[1][metric], len(rows)


def verdict(results: list[MethodResult], best: MethodResult) -> str:
    """A few plain sentences: who wins, whether the others are significantly worse, at what cost."""
    words = [f"{best.method} scores best on {best.metric}: {best.value:.3f} (95% CI {best.low:.3f}-{best.high:.3f})"
             + (f", up from {best.base_value:.3f} for the untuned base model." if best.base_value is not None else ".")]
    for r in results:
        if r is best:
            continue
        significant = r.p_vs_best is not None and r.p_vs_best < 0.05
        line = (f"{r.method}: {r.value:.3f}, " + (f"significantly lower (paired bootstrap p={_pval(r.p_vs_best)})"
                if significant else f"not significantly different (p={_pval(r.p_vs_best)})"))
        cost = []
        if best.train_seconds > 0 and r.train_seconds > 0:
            cost.append(f"{r.train_seconds / best.train_seconds:.1f}x the training time")
        if best.artifact_mib > 0:
            cost.append(f"{r.artifact_mib / best.artifact_mib:.2g}x the artifact size")
        if best.examples_per_s > 0:
            cost.append(f"{r.examples_per_s / best.examples_per_s:.2g}x the inference speed")
        words.append(line + (f"; {', '.join(cost)} of {best.method}." if cost else "."))
    over = [r for r in results if r.gap is not None and r.final_train_loss and r.gap > 0.5 * r.final_train_loss]
    if over:
        words.append("Signs of overfitting (validation loss well above training loss at the end): "
                     + ", ".join(f"{r.method} (gap {r.gap:.3f})" for r in over) + ".")
    if not [r for r in results if r is not best and r.p_vs_best is not None and r.p_vs_best < 0.05]:
        words.append("No method is significantly better than the others on this test set; prefer the cheapest.")
    return " ".join(words)


def table(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The comparison's column names and one row of formatted cells per method (Markdown and HTML)."""
    header = ["method", f"{doc['metric']} [95% CI]", "p vs best", "base", "trainable params", "train time",
              "train tok/s", "peak RSS MiB", "inference ex/s", "artifact MiB", "train loss", "val loss", "gap"]
    rows = [[r["method"], f"{r['value']:.4f} [{r['low']:.4f}, {r['high']:.4f}]", _pval(r["p_vs_best"]),
             _num(r["base_value"], ".4f"), f"{r['trainable_parameters']:,}", f"{r['train_seconds']:.0f} s",
             _num(r["tokens_per_s"], ".0f"), _num(r["peak_rss_mib"], ".0f"), f"{r['examples_per_s']:.2f}",
             f"{r['artifact_mib']:.2f}", _num(r["final_train_loss"], ".3f"), _num(r["final_val_loss"], ".3f"),
             _num(r["gap"], "+.3f")] for r in doc["methods"]]
    return header, rows


def markdown(doc: dict[str, Any]) -> str:
    """The comparison as a Markdown table, then the verdict."""
    header, rows = table(doc)
    lines = [f"Methods compared on {doc['test_examples']} test examples", "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines + ["", doc["verdict"]])


def _pval(p: float | None) -> str:
    return "best" if p is None else "<0.001" if p < 0.001 else f"{p:.3f}"


def _num(v: float | None, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)
