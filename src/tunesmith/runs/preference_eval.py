"""Evaluating a ``task: preference`` run: its held-out pairs scored by the model it started from and by the tuned
model (``evaluation.preference``), their answers' lengths, the forgetting check, then eval.json and the report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

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
    pairs, _ = encode_pairs(tokenizer, [r for r in splits.test if r.paired], cfg.train.max_seq_len,
                            cfg.preference.max_prompt_len)
    if not pairs:
        raise ValueError(f"{run_dir}: the test split holds no pairs (only unpaired rows): nothing to rank")
    e = cfg.eval
    n_answers = min(len(pairs), cfg.preference.length_examples) if e.max_new_tokens else 0
    asked = [Example(r.prompt + [{"role": "assistant", "content": r.chosen}], source=r.source)
             for r in splits.test if r.paired][:n_answers]
    base.to(dev)
    with make_progress(console) as progress:
        task = progress.add_task("scoring pairs (base)", total=len(pairs), info="")
        scores = {"base": P.pair_logps(base, pairs, tokenizer.pad_token_id, e.batch_size, bf16,
                                       lambda n: progress.update(task, advance=n))}
        answers = {"base": generate_replies(base, tokenizer, asked, e.max_new_tokens, e.batch_size, bf16, progress)[0]}
        probe = forgetting.Probe(tokenizer, cfg, bf16, e.batch_size)
        observed = probe.observe(base, progress)
        artifact = run_dir / methods.METHODS[cfg.method].ARTIFACT
        tuned = (methods.lora.load(base, artifact).merge_and_unload() if cfg.method == "lora"
                 else load_model(str(artifact))[0]).to(dev)
        task = progress.add_task("scoring pairs (tuned)", total=len(pairs), info="")
        scores["tuned"] = P.pair_logps(tuned, pairs, tokenizer.pad_token_id, e.batch_size, bf16,
                                       lambda n: progress.update(task, advance=n))
        answers["tuned"] = generate_replies(tuned, tokenizer, asked, e.max_new_tokens, e.batch_size, bf16, progress)[0]
        forgot = probe.compare(tuned, observed, progress, e.bootstrap_resamples)
    results: dict[str, Any] = {"task": "preference", "metric": METRIC, "test_examples": len(pairs),
                               "objective": cfg.preference.objective, "beta": cfg.preference.beta,
                               "precision": runtime.INFERENCE_PRECISION}
    results |= P.compare_sides(scores["base"], scores["tuned"], cfg.preference.beta, e.bootstrap_resamples, cfg.train.seed)
    lengths = {k: [len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in v] for k, v in answers.items()}
    results["answer_length"] = P.length_block(lengths["base"], lengths["tuned"], e.bootstrap_resamples, cfg.train.seed)
    results["forgetting"] = forgot
    if overrides:
        results["eval_overrides"] = overrides
    results["warnings"] = _warnings(results)
    atomic_write_json(run_dir / "eval.json", results)
    rows = []
    for i, (ex, p) in enumerate(zip([r for r in splits.test if r.paired], pairs)):
        row = {"index": i, "source": ex.source, "prompt": ex.prompt[-1]["content"], "chosen": ex.chosen,
               "rejected": ex.rejected, **{f"{m}_logp_{side}": float(scores[m][side][i])
                                           for m in ("base", "tuned") for side in ("chosen", "rejected")}}
        if i < n_answers:
            row |= {"base_answer": answers["base"][i], "tuned_answer": answers["tuned"][i]}
        rows.append(row)
    atomic_write_jsonl(run_dir / "predictions.jsonl", rows)
    write_report(run_dir)
    return results


def _warnings(results: dict[str, Any]) -> list[str]:
    out = []
    b, t = results["base"], results["tuned"]
    if t["logps_chosen"] < b["logps_chosen"] and t["logps_rejected"] < b["logps_rejected"]:
        out.append(f"both answers became less likely ({b['logps_chosen']:.1f} -> {t['logps_chosen']:.1f} for chosen): "
                   "the margin grew by pushing the rejected answer down faster; a higher preference.sft_weight or "
                   "beta keeps the chosen answer's likelihood up")
    if results["test_examples"] < 100:
        out.append(f"only {results['test_examples']} test pairs: the intervals are wide; read the change with its p-value")
    return out


def print_preference(results: dict[str, Any], console: Console) -> None:
    """The preference table: each measure for base and tuned with intervals."""
    table = Table(title=f"base vs tuned on {results['test_examples']} held-out pairs ({results['objective']}, "
                        f"beta {results['beta']:g})")
    for col in ("measure", "base", "tuned"):
        table.add_column(col, justify="left" if col == "measure" else "right")

    def cell(side: dict[str, Any], key: str) -> str:
        if key not in side:
            return ""
        lo, hi = side["ci"][key]
        return f"{side[key]:.4f} [{lo:.4f}, {hi:.4f}]"

    for key in ("pairwise_accuracy", "pairwise_accuracy_per_token", "logps_chosen", "logps_rejected",
                "reward_accuracy", "reward_margin"):
        table.add_row(key.replace("_", " "), cell(results["base"], key), cell(results["tuned"], key))
    console.print(table)
    mc = results["mcnemar"]
    console.print(f"pairs the tuned model ranks right and the base did not: {mc['gained']}, the other way: {mc['lost']} "
                  f"(exact McNemar p={mc['p_value']:.3g})", highlight=False)
    L = results["answer_length"]
    if L["prompts"]:
        console.print(f"answer length on {L['prompts']} test prompts: {L['base']:.1f} -> {L['tuned']:.1f} tokens "
                      f"(change [{L['change_ci'][0]:+.1f}, {L['change_ci'][1]:+.1f}])", highlight=False)
    for w in results.get("warnings", []):
        console.print(f"[yellow]warning: {w}[/yellow]", highlight=False)
