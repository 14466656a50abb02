"""Multi-task and continual learning on the embedded model (SmolLM2-135M-Instruct), LoRA r=16.

Four runs, each through ``tunesmith.finetune`` with the shipped example configs:

- ``sst2``: single-task SST-2 (examples/sst2.yaml: 75 steps, batch 16, lr 3e-4)
- ``trec``: single-task TREC (examples/trec.yaml: 60 steps, batch 16, lr 3e-4)
- ``joint``: one adapter on SST-2 + TREC (examples/sst2_trec.yaml: 135 steps = 75 + 60, the same
  batch and lr, equal task weights), each task tested on its own test split
- ``continual``: TREC (trec.yaml) started from the ``sst2`` run (``model: runs/<sst2>``), whose
  evaluation also tests SST-2 again: the drop is "SST-2 forgotten after learning TREC"

Headline metrics: SST-2 accuracy, TREC macro F1 (as the configs say); both are reported for both.
The base model is evaluated in the two single-task runs only (the same base for the other two).
Targets (issue 12): the joint adapter within 2 points of each single-task run; the continual run
shows SST-2's drop.

    python benchmarks/multitask.py                     # full: writes benchmarks/results/multitask.{json,md}
    python benchmarks/multitask.py --max-steps 2 --test-examples 16 --val-examples 16 --out /tmp/mt   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import machine  # noqa: E402  (the machine description every benchmark records)

RUNS = ("sst2", "trec", "joint", "continual")


def configs(args: argparse.Namespace, runs_dir: Path) -> dict[str, Any]:
    """The four run configs (``tunesmith.Config``), with the command line's caps applied."""
    from tunesmith.config import load_config

    common = [f"output_dir={runs_dir}", f"model={args.model}", "eval.latency_examples=0"]
    if args.no_general:
        common.append("eval.general=none")
    if args.max_steps:
        common += [f"train.max_steps={args.max_steps}", f"train.eval_every={max(1, args.max_steps // 3)}"]
    cfgs = {
        "sst2": load_config(EXAMPLES / "sst2.yaml", common + ["name=mt-sst2"]),
        "trec": load_config(EXAMPLES / "trec.yaml", common + ["name=mt-trec"]),
        "joint": load_config(EXAMPLES / "sst2_trec.yaml", common + ["name=mt-joint", "eval.compare_with_base=false"]),
        "continual": load_config(EXAMPLES / "trec.yaml", common + ["name=mt-sst2-then-trec", "eval.compare_with_base=false"]),
    }
    if args.max_steps:  # the joint run trains as long as the two single-task runs together
        cfgs["joint"].train.max_steps = 2 * args.max_steps
    cfgs["continual"].model = str(runs_dir / cfgs["sst2"].name)
    for cfg in cfgs.values():
        for data in [t.data for t in cfg.tasks] or [cfg.data]:
            data.max_test_examples = args.test_examples or None
            data.max_validation_examples = args.val_examples or None
    return cfgs


def scores(result: dict[str, Any]) -> dict[str, float | None]:
    """Accuracy and macro F1 of one task's results (eval.json shape), tuned and base."""
    tuned, base = result.get("tuned") or {}, result.get("base") or {}
    return {"accuracy": tuned.get("accuracy"), "f1": tuned.get("f1"),
            "base_accuracy": base.get("accuracy"), "base_f1": base.get("f1")}


def summarize(name: str, run_dir: Path, seconds: float) -> dict[str, Any]:
    """What one run measured: per task (sst2, trec) its scores, plus time and the run's extras."""
    ev = json.loads((run_dir / "eval.json").read_text())
    train = json.loads((run_dir / "train_result.json").read_text())
    out: dict[str, Any] = {"run": name, "dir": str(run_dir), "steps": train["steps"], "best_step": train["best_step"],
                           "train_seconds": train["train_seconds"], "wall_seconds": seconds, "tasks": {}}
    if name == "sst2":
        out["tasks"]["sst2"] = scores(ev)
    elif name == "trec":
        out["tasks"]["trec"] = scores(ev)
    elif name == "joint":
        out["tasks"] = {n: scores(r) for n, r in ev["tasks"].items()}
        out["macro"] = ev["macro"]
        out["mixing"] = json.loads((run_dir / "data_report.json").read_text())["mixing"]
    else:
        out["tasks"]["trec"] = scores(ev)
        (earlier,) = ev["previous_tasks"].values()
        out["tasks"]["sst2"] = scores(earlier)
        out["sst2_earlier"] = earlier["earlier"]
        out["sst2_drop"] = earlier["drop"]  # in SST-2's headline metric (accuracy); > 0: forgotten
    if ev.get("forgetting"):
        out["forgetting"] = ev["forgetting"].get("change")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--max-steps", type=int, default=0, help="override every run's steps (joint: twice this); 0 = the configs'")
    p.add_argument("--test-examples", type=int, default=0, help="cap each test split (0 = all)")
    p.add_argument("--val-examples", type=int, default=0, help="cap each validation split (0 = all)")
    p.add_argument("--no-general", action="store_true", help="skip the general-data forgetting check (eval.general: none)")
    p.add_argument("--runs", default="", help="folder for the run folders (default: a temporary one)")
    p.add_argument("--only", default=",".join(RUNS), help="runs to do, of " + ",".join(RUNS))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)

    from tunesmith import finetune

    runs_dir = Path(args.runs or tempfile.mkdtemp(prefix="tunesmith-multitask-"))
    cfgs = configs(args, runs_dir)
    results: dict[str, Any] = {}
    for name in [r for r in RUNS if r in args.only.split(",")]:
        t0 = time.perf_counter()
        run = finetune(cfgs[name], overwrite=True)
        results[name] = summarize(name, run.dir, time.perf_counter() - t0)
        print(json.dumps(results[name]["tasks"]), flush=True)
    settings = {"model": args.model, "max_steps": args.max_steps or "as the configs", "test_examples": args.test_examples or "all",
                "validation_examples": args.val_examples or "as prepared", "general_check": not args.no_general,
                "threads": os.environ.get("OMP_NUM_THREADS", "torch default")}
    doc = {"machine": machine(), "settings": settings, "runs": results, "targets": targets(results)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "multitask.json").write_text(json.dumps(doc, indent=2))
    (out / "multitask.md").write_text(markdown(doc))
    print((out / "multitask.md").read_text())
    return 0


def targets(results: dict[str, Any]) -> dict[str, Any]:
    """Joint vs single-task per task (points of the headline metric) and the continual run's SST-2 drop."""
    out: dict[str, Any] = {}
    for task, metric, single in (("sst2", "accuracy", "sst2"), ("trec", "f1", "trec")):
        if "joint" in results and single in results:
            a, b = results["joint"]["tasks"][task][metric], results[single]["tasks"][task][metric]
            out[f"joint_vs_single_{task}_points"] = 100 * (a - b)
    if "continual" in results:
        out["continual_sst2_drop_points"] = 100 * results["continual"]["sst2_drop"]
    return out


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def markdown(doc: dict[str, Any]) -> str:
    m, s, runs, t = doc["machine"], doc["settings"], doc["runs"], doc["targets"]
    lines = ["# Multi-task and continual learning: one LoRA on SST-2 + TREC, and SST-2 -> TREC", "",
             f"- Date: {m['date']}",
             f"- Machine: {m['cpu']}, {m['cores']} cores ({m['threads']} torch threads), flags {', '.join(m['flags'])}",
             "- Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
             f"- Settings: {json.dumps(s)}",
             "- Runs: `benchmarks/multitask.py` (examples/sst2.yaml, trec.yaml, sst2_trec.yaml; continual = trec.yaml "
             "with `model:` the sst2 run). Scores in %, SST-2 accuracy and TREC macro F1 are the headline metrics.", "",
             "| run | steps (best) | train s | SST-2 accuracy | SST-2 F1 | TREC accuracy | TREC macro F1 |",
             "|---|---|---|---|---|---|---|"]
    base = {"sst2": (runs.get("sst2") or {}).get("tasks", {}).get("sst2", {}),
            "trec": (runs.get("trec") or {}).get("tasks", {}).get("trec", {})}
    if base["sst2"] or base["trec"]:
        lines.append(f"| base model | - | - | {_pct(base['sst2'].get('base_accuracy'))} | {_pct(base['sst2'].get('base_f1'))} "
                     f"| {_pct(base['trec'].get('base_accuracy'))} | {_pct(base['trec'].get('base_f1'))} |")
    for name, r in runs.items():
        a, b = r["tasks"].get("sst2", {}), r["tasks"].get("trec", {})
        label = {"continual": "continual SST-2 -> TREC (SST-2 tested after)"}.get(name, name)
        lines.append(f"| {label} | {r['steps']} ({r['best_step']}) | {r['train_seconds']:.0f} | {_pct(a.get('accuracy'))} | "
                     f"{_pct(a.get('f1'))} | {_pct(b.get('accuracy'))} | {_pct(b.get('f1'))} |")
    lines += ["", "## Targets", ""]
    for task in ("sst2", "trec"):
        key = f"joint_vs_single_{task}_points"
        if key in t:
            ok = "met" if abs(t[key]) <= 2 or t[key] > 0 else "NOT met"
            lines.append(f"- Joint vs single-task {task.upper()}: {t[key]:+.1f} points (target: within 2 points; {ok})")
    if "continual_sst2_drop_points" in t:
        c = runs["continual"]
        lines.append(f"- Continual SST-2 -> TREC: SST-2 accuracy {_pct(c['sst2_earlier']['tuned'])} after SST-2 training, "
                     f"{_pct(c['tasks']['sst2']['accuracy'])} after TREC: a drop of {t['continual_sst2_drop_points']:.1f} "
                     "points (measured by the continual run's own evaluation, eval.json previous_tasks)")
    if "joint" in runs:
        mix = runs["joint"]["mixing"]
        lines += ["", "## Joint run: mixing", "", "| task | train rows | share drawn | repeats |", "|---|---|---|---|"]
        lines += [f"| {n} | {x['rows']} | {100 * x['share']:.1f}% | x{x['repeats']:.2f} |" for n, x in mix["tasks"].items()]
        macro = runs["joint"]["macro"]
        lines.append(f"\nMacro average of the headline metrics (SST-2 accuracy, TREC F1): {_pct(macro.get('tuned'))}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
