"""Evaluating a ``task: preference`` run: its held-out pairs scored by the model it started from and by the tuned
model (``evaluation.preference``), their answers' lengths, the forgetting check, then eval.json and the report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

import numpy as np

from tunesmith import methods, runtime
from tunesmith.config import Config
from tunesmith.data import Example
from tunesmith.data.pairs import encode_pairs
from tunesmith.data.preference import load_preference_splits
from tunesmith.evaluation import forgetting
from tunesmith.evaluation import preference as P
from tunesmith.generation.generate import generate_replies
from tunesmith.io import atomic_write_json, atomic_write_jsonl
from tunesmith.models import load_model, ready_tokenizer
from tunesmith.report.html import write_report
from tunesmith.runs import index
from tunesmith.runs.phase import clear_phase, set_phase
from tunesmith.runtime import threads
from tunesmith.runtime.progress import make_progress

METRIC = "pairwise_accuracy"


def evaluate_preference_run(run_dir: Path, cfg: Config, console: Console, overrides: list[str]) -> dict[str, Any]:
    """The ``eval.json`` of a preference run (see ``evaluation.preference`` for what each number is); also writes
    predictions.jsonl (each test pair's log-probs under both models and both models' answers) and report.html."""
    threads.use_threads(cfg.train.num_threads, lambda line: console.print(line, highlight=False))
    set_phase(run_dir, "evaluating", "scoring the held-out pairs")
    try:
        results = _evaluate(run_dir, cfg, console, overrides)
    finally:
        clear_phase(run_dir)
        index.record(run_dir)
    print_preference(results, console)
    return results


def _evaluate(run_dir: Path, cfg: Config, console: Console, overrides: list[str]) -> dict[str, Any]:
    dev = runtime.device()
    bf16 = runtime.INFERENCE_BF16
    base, tokenizer = load_model(cfg.model)
    ready_tokenizer(tokenizer, cfg)
    splits = load_preference_splits(cfg, run_dir / "data")
    paired_rows = [r for r in splits.test if r.paired]
    single_rows = [r for r in splits.test if not r.paired]
    pairs, _ = encode_pairs(tokenizer, paired_rows, cfg.train.max_seq_len, cfg.preference.max_prompt_len)
    singles, _ = encode_pairs(tokenizer, single_rows, cfg.train.max_seq_len, cfg.preference.max_prompt_len)
    e, pad = cfg.eval, tokenizer.pad_token_id
    shown = paired_rows + single_rows
    n_answers = min(len(shown), cfg.preference.length_examples) if e.max_new_tokens else 0
    asked = [Example(r.prompt + [{"role": "assistant", "content": r.chosen or r.rejected or ""}], source=r.source)
             for r in shown[:n_answers]]
    base.to(dev)
    scores: dict[str, dict[str, Any]] = {}
    answers: dict[str, list[str]] = {}
    with make_progress(console) as progress:
        probe = forgetting.Probe(tokenizer, cfg, bf16, e.batch_size)
        for name in ("base", "tuned"):
            if name == "tuned":
                artifact = run_dir / methods.METHODS[cfg.method].ARTIFACT
                model = (methods.lora.load(base, artifact).merge_and_unload() if cfg.method == "lora"
                         else load_model(str(artifact))[0]).to(dev)
            else:
                model = base
            task = progress.add_task(f"scoring the test answers ({name})", total=len(pairs) + len(singles), info="")
            scores[name] = {"pairs": P.pair_logps(model, pairs, pad, e.batch_size, bf16,
                                                  lambda n, t=task: progress.update(t, advance=n)) if pairs else None,
                            "singles": P.single_logps(model, singles, pad, e.batch_size, bf16) if singles else None}
            answers[name] = generate_replies(model, tokenizer, asked, e.max_new_tokens, e.batch_size, bf16, progress)[0]
            if name == "base":
                observed = probe.observe(base, progress)
        forgot = probe.compare(model, observed, progress, e.bootstrap_resamples)
    results: dict[str, Any] = {"task": "preference", "metric": METRIC if pairs else "reward_auc",
                               "test_examples": len(pairs) or len(singles), "objective": cfg.preference.objective,
                               "beta": cfg.preference.beta, "precision": runtime.INFERENCE_PRECISION}
    if pairs:
        results |= P.compare_sides(scores["base"]["pairs"], scores["tuned"]["pairs"], e.bootstrap_resamples,
                                   cfg.train.seed)
    if singles:
        good = np.array([p.desirable for p in singles], dtype=bool)
        block = P.unpaired_block(scores["base"]["singles"], scores["tuned"]["singles"], good, e.bootstrap_resamples,
                                 cfg.train.seed)
        results["unpaired"] = block
        if not pairs:  # the headline: how well tuning's change tells the good answers from the bad
            results["base"] = block["base"] | {"ci": {}}
            results["tuned"] = block["tuned"] | {"reward_auc": block["reward_auc"], "reward_gap": block["reward_gap"],
                                                 "ci": {"reward_auc": block["reward_auc_ci"],
                                                        "reward_gap": block["reward_gap_ci"]}}
    lengths = {k: [len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in v] for k, v in answers.items()}
    results["answer_length"] = P.length_block(lengths["base"], lengths["tuned"], e.bootstrap_resamples, cfg.train.seed)
    results["forgetting"] = forgot
    if overrides:
        results["eval_overrides"] = overrides
    results["warnings"] = _warnings(results)
    atomic_write_json(run_dir / "eval.json", results)
    atomic_write_jsonl(run_dir / "predictions.jsonl", _predictions(paired_rows, single_rows, scores, answers))
    write_report(run_dir)
    return results


def _predictions(paired_rows: list[Any], single_rows: list[Any], scores: dict[str, Any],
                 answers: dict[str, list[str]]) -> list[dict[str, Any]]:
    """predictions.jsonl: each test row's log-probs under both models, and both models' answers where asked."""
    rows = []
    for i, ex in enumerate(paired_rows):
        rows.append({"index": i, "source": ex.source, "prompt": ex.prompt[-1]["content"], "chosen": ex.chosen,
                     "rejected": ex.rejected, **{f"{m}_logp_{side}": float(scores[m]["pairs"][side][i])
                                                 for m in ("base", "tuned") for side in ("chosen", "rejected")}})
    for j, ex in enumerate(single_rows):
        rows.append({"index": len(paired_rows) + j, "source": ex.source, "prompt": ex.prompt[-1]["content"],
                     "completion": ex.chosen or ex.rejected, "label": ex.chosen is not None,
                     **{f"{m}_logp": float(scores[m]["singles"][j]) for m in ("base", "tuned")}})
    for k in range(len(answers["base"])):
        rows[k] |= {"base_answer": answers["base"][k], "tuned_answer": answers["tuned"][k]}
    return rows


def _warnings(results: dict[str, Any]) -> list[str]:
    out = []
    b, t = results["base"], results["tuned"]
    falls = lambda k: k in t and t[k] < b[k] - max(0.5, 0.01 * abs(b[k]))  # noqa: E731 - beyond noise: half a nat, 1%
    if falls("logps_chosen") and falls("logps_rejected"):
        out.append(f"both answers became less likely ({b['logps_chosen']:.1f} -> {t['logps_chosen']:.1f} for chosen): "
                   "the margin grew by pushing the rejected answer down faster; a higher preference.sft_weight or "
                   "beta keeps the chosen answer's likelihood up")
    if results["test_examples"] < 100:
        what = "pairs" if "mcnemar" in results else "answers"
        out.append(f"only {results['test_examples']} test {what}: the intervals are wide; read the change with its "
                   "interval" + (" and p-value" if "mcnemar" in results else ""))
    return out


def print_preference(results: dict[str, Any], console: Console) -> None:
    """The preference table: each measure for base and tuned with intervals."""
    what = "pairs" if "mcnemar" in results else "answers marked good or bad"
    table = Table(title=f"base vs tuned on {results['test_examples']} held-out {what} ({results['objective']}, "
                        f"beta {results['beta']:g})")
    for col in ("measure", "base", "tuned"):
        table.add_column(col, justify="left" if col == "measure" else "right")

    def cell(side: dict[str, Any], key: str) -> str:
        if side.get(key) is None:
            return ""
        if key not in side["ci"]:
            return f"{side[key]:.4f}"
        lo, hi = side["ci"][key]
        return f"{side[key]:.4f} [{lo:.4f}, {hi:.4f}]"

    for key in ("pairwise_accuracy", "pairwise_accuracy_per_token", "logps_chosen", "logps_rejected",
                "reward_accuracy", "margin_gain", "logps_desirable", "logps_undesirable", "reward_auc", "reward_gap"):
        if key in results["base"] or key in results["tuned"]:
            table.add_row(key.replace("_", " "), cell(results["base"], key), cell(results["tuned"], key))
    console.print(table)
    if mc := results.get("mcnemar"):
        console.print(f"pairs the tuned model ranks right and the base did not: {mc['gained']}, the other way: "
                      f"{mc['lost']} (exact McNemar p={mc['p_value']:.3g})", highlight=False)
    L = results["answer_length"]
    if L["prompts"]:
        console.print(f"answer length on {L['prompts']} test prompts: {L['base']:.1f} -> {L['tuned']:.1f} tokens "
                      f"(change [{L['change_ci'][0]:+.1f}, {L['change_ci'][1]:+.1f}])", highlight=False)
    for w in results.get("warnings", []):
        console.print(f"[yellow]warning: {w}[/yellow]", highlight=False)
