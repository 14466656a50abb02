"""Forgetting and its mitigations on the embedded model: SST-2, full fine-tuning vs LoRA.

Every variant starts from ``examples/sst2.yaml`` (the demo's data, steps and test split) and
differs only in what the table names:

  full            full fine-tuning, no mitigation (the reference for forgetting)
  full+replay     ... with general text replayed (20% of the training target tokens)
  full+instr-replay ... with everyday instructions replayed, answered by the base model itself
                  (10% of the training examples; replay.data: instructions)
  full+distill    ... with a KL term toward the frozen base on the task's prompts
  full+l2sp       ... with L2-SP anchoring toward the pretrained weights
  full+ewc        ... with EWC (diagonal Fisher on general text)
  lora            LoRA alone (the demo's method)

For each: task accuracy on the SST-2 dev set (872 reviews, 95% bootstrap interval), general-text
perplexity of base and tuned (held-out Wikipedia articles), the tuned model's agreement with the
base's replies (ROUGE-L) and KL(base || tuned). The issue's target: a mitigation that cuts the
general-perplexity increase of plain full fine-tuning by at least half for at most 2 points of
task accuracy. The base model is evaluated once and reused by every variant.

    python benchmarks/forgetting.py                        # writes benchmarks/results/forgetting.{json,md}
    python benchmarks/forgetting.py --variants full,lora --steps 10 --test 100   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

VARIANTS: dict[str, list[str]] = {
    "full": ["method=full"],
    "full+replay": ["method=full", "replay.ratio=0.2", "replay.by=tokens"],
    # everyday instructions (not the scored ones) with the base model's own greedy replies: rehearses how it answered
    "full+instr-replay": ["method=full", "replay.data=instructions", "replay.ratio=0.1"],
    "full+distill": ["method=full", "distill.weight=1.0", "distill.on=prompts"],
    "full+l2sp": ["method=full", "anchor.method=l2sp", "anchor.strength=0.1"],
    # the Fisher of SmolLM2-135M on the general text averages 3e-7 per weight: 3e5 pulls as hard as L2-SP 0.1 on average
    "full+ewc": ["method=full", "anchor.method=ewc", "anchor.strength=3.0e5"],
    "lora": ["method=lora"],
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names (default: all)")
    p.add_argument("--set", action="append", default=[], help="extra KEY=VALUE overrides for every variant")
    p.add_argument("--steps", type=int, default=0, help="train.max_steps (0: the example config's)")
    p.add_argument("--test", type=int, default=0, help="data.max_test_examples (0: the whole dev set)")
    p.add_argument("--full-lr", type=float, default=5e-5, help="full.lr of the full fine-tuning variants")
    p.add_argument("--runs", default=str(ROOT / "runs" / "bench-forgetting"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--stem", default="forgetting")
    p.add_argument("--report-only", action="store_true",
                   help="only summarize the variants already finished under --runs (an interrupted benchmark)")
    args = p.parse_args(argv)

    from rich.console import Console

    from train_throughput import machine
    from tunesmith import finetune, load_config

    console = Console()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    common = [f"output_dir={args.runs}", "eval.latency_examples=0", f"full.lr={args.full_lr}", *args.set]
    common += [f"train.max_steps={args.steps}"] if args.steps else []
    common += [f"data.max_test_examples={args.test}"] if args.test else []
    info = machine() | {"load_average_at_start": os.getloadavg()[0]}
    results: dict[str, Any] = {}
    finished = [d for d in Path(args.runs).glob("*") if (d / "eval.json").is_file()] if Path(args.runs).is_dir() else []
    base_from = finished[0] if finished else None  # the base is evaluated once; later invocations reuse it
    for name in names:
        overrides = common + VARIANTS[name] + [f"name={name.replace('+', '-')}"]
        cfg = load_config(ROOT / "examples" / "sst2.yaml", overrides)
        if args.report_only:
            if (cfg.run_dir / "eval.json").is_file():
                results[name] = summarize(cfg.run_dir, overrides, None)
            continue
        console.rule(f"{name}: {' '.join(VARIANTS[name])}")
        t0 = time.perf_counter()
        run = finetune(cfg, overwrite=True, console=console, base_from=base_from)
        base_from = base_from or run.dir
        results[name] = summarize(run.dir, overrides, time.perf_counter() - t0)
        doc = {"machine": info, "settings": vars(args), "variants": results, "verdicts": verdicts(results)}
        write(Path(args.out), args.stem, doc)  # after every variant: an interrupted benchmark keeps what it measured
    doc = {"machine": info, "settings": vars(args), "variants": results, "verdicts": verdicts(results)}
    previous = Path(args.out) / f"{args.stem}.json"
    if args.report_only and previous.is_file():  # the machine and settings the runs were measured with
        doc |= {k: json.loads(previous.read_text())[k] for k in ("machine", "settings")}
    write(Path(args.out), args.stem, doc)
    return 0


def summarize(run_dir: Path, overrides: list[str], wall: float | None) -> dict[str, Any]:
    """One variant's row: task accuracy (interval), general perplexity base/tuned, agreement, KL."""
    ev = json.loads((run_dir / "eval.json").read_text())
    tr = json.loads((run_dir / "train_result.json").read_text())
    f = ev.get("forgetting") or {}
    tuned, base = ev["tuned"], ev.get("base") or {}
    return {"overrides": overrides, "accuracy": tuned["accuracy"], "accuracy_ci": tuned["ci"]["accuracy"],
            "base_accuracy": base.get("accuracy"), "general_ppl_base": f.get("base", {}).get("perplexity"),
            "general_ppl_tuned": f.get("tuned", {}).get("perplexity"),
            "general_ppl_change": f.get("change", {}).get("perplexity_relative"),
            "general_ppl_p": f.get("change", {}).get("p_value"),
            "agreement_rougeL": f.get("tuned", {}).get("agreement_rougeL"), "kl": f.get("tuned", {}).get("kl"),
            "forgetting_seconds": f.get("seconds"), "eval_seconds": tuned.get("seconds", 0) + base.get("seconds", 0),
            "train_seconds": tr.get("train_seconds"), "steps": tr.get("steps"), "wall_seconds": wall,
            "mitigations": tr.get("mitigations")}


DAMAGE = {  # how much general ability a variant lost, by each measure (0 = none)
    "perplexity": lambda r: r["general_ppl_change"],  # relative increase of general-text perplexity
    "agreement": lambda r: None if r["agreement_rougeL"] is None else 1 - r["agreement_rougeL"],  # 1 - ROUGE-L vs base
    "kl": lambda r: r["kl"],  # KL(base || tuned), nats per token
}


def verdicts(results: dict[str, Any]) -> dict[str, Any]:
    """For each variant against plain full fine-tuning: the share of each measure's damage it removed
    (1 - its damage / full's; only where full did damage), the accuracy points it cost, and whether the
    target holds: at least half of a measure's damage removed for at most 2 points of accuracy."""
    ref = results.get("full")
    out: dict[str, Any] = {}
    if not ref:
        return out
    for name, r in results.items():
        if name == "full":
            continue
        removed = {}
        for measure, damage in DAMAGE.items():
            d_ref, d = damage(ref), damage(r)
            removed[measure] = 1 - d / d_ref if d_ref is not None and d is not None and d_ref > 0 else None
        cost = 100 * (ref["accuracy"] - r["accuracy"])
        met = [m for m, v in removed.items() if v is not None and v >= 0.5]
        out[name] = {"damage_removed": removed, "accuracy_points_lost": cost, "target_met_on": met if cost <= 2.0 else [],
                     "target_met": bool(met) and cost <= 2.0}
    return out


def write(out: Path, stem: str, doc: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=2))
    m = doc["machine"]
    lines = ["# Forgetting and its mitigations: SST-2 on SmolLM2-135M-Instruct", "",
             f"- Date: {m['date']}; load average at start {m['load_average_at_start']:.2f}",
             f"- Machine: {m['cpu']}, {m['cores']} cores, flags {', '.join(m['flags'])}",
             f"- Versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}",
             "- Task: examples/sst2.yaml (6,710 training reviews after de-duplication, steps as set, SST-2 dev set as test); general: the shipped "
             "held-out Wikipedia articles (perplexity) and 16 everyday instructions (agreement, KL)",
             f"- Settings: {json.dumps({k: v for k, v in doc['settings'].items() if k not in ('out', 'runs')})}", "",
             "| variant | accuracy [95% CI] | general ppl base -> tuned | change (p) | agreement ROUGE-L | KL nats/token "
             "| train s | forgetting check s | settings |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in doc["variants"].items():
        lo, hi = r["accuracy_ci"]
        ppl = ("-" if r["general_ppl_tuned"] is None else
               f"{r['general_ppl_base']:.2f} -> {r['general_ppl_tuned']:.2f}")
        change = "-" if r["general_ppl_change"] is None else f"{r['general_ppl_change']:+.1%} ({r['general_ppl_p']:.3f})"
        lines.append(f"| {name} | {r['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] | {ppl} | {change} | "
                     f"{_f(r['agreement_rougeL'], '.3f')} | {_f(r['kl'], '.4f')} | {_f(r['train_seconds'], '.0f')} | "
                     f"{_f(r['forgetting_seconds'], '.1f')} | {' '.join(o for o in r['overrides'] if not o.startswith(('output_dir', 'name=')))} |")
    if doc["verdicts"]:
        lines += ["", "## Against plain full fine-tuning", "",
                  "Share of full fine-tuning's damage each variant removed, by measure (\"-\" where full fine-tuning did "
                  "no damage by that measure), and the accuracy it cost. Target: at least half of the damage removed "
                  "for at most 2 points of accuracy.", "",
                  "| variant | perplexity increase removed | disagreement removed | KL removed | accuracy points lost | target |",
                  "|---|---|---|---|---|---|"]
        for name, v in doc["verdicts"].items():
            cells = " | ".join("-" if v["damage_removed"][m] is None else f"{v['damage_removed'][m]:.0%}" for m in DAMAGE)
            met = f"met ({', '.join(v['target_met_on'])})" if v["target_met"] else "missed"
            lines.append(f"| {name} | {cells} | {v['accuracy_points_lost']:+.1f} | {met} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


def _f(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


if __name__ == "__main__":
    raise SystemExit(main())
