"""The run report: one self-contained HTML file (plots inlined as PNG, no network)."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

from tunesmith.io import atomic_write_text, read_jsonl  # noqa: E402
from tunesmith.evaluation.metrics import metric_label  # noqa: E402
from tunesmith.report.tables import learning_table, or_dash, p_is, table

HEADLINE = ("accuracy", "f1", "precision", "recall", "invalid_rate", "rouge1", "rouge2", "rougeL", "bleu", "chrf",
            "exact_match", "loss", "perplexity",
            # task: preference (evaluation/preference.py): held-out pairs ranked by base and tuned
            "pairwise_accuracy", "pairwise_accuracy_per_token", "logps_chosen", "logps_rejected", "reward_accuracy",
            "margin_gain", "reward_auc", "reward_gap")
LOWER_IS_BETTER = {"loss", "perplexity"}


def loss_curve_png(history: list[dict[str, Any]]) -> bytes:
    """Training loss per step and validation loss at each evaluation, as a PNG."""
    train = [(r["step"], r["loss"]) for r in history if r.get("type") == "train"]
    val = [(r["step"], r["val_loss"]) for r in history if r.get("type") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", color="#4c72b0", linewidth=1.2, alpha=0.8)
    if val:
        ax.plot(*zip(*val), label="validation loss", color="#dd8452", marker="o", linewidth=2)
    ax.set_title("Loss curves")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per target token")
    ax.grid(alpha=0.3)
    ax.legend()
    return png(fig)


def preference_curve_png(history: list[dict[str, Any]]) -> bytes | None:
    """A preference run's validations: the chosen and rejected answers' mean log-probs (left; both falling is DPO's
    known failure) and the reward accuracy (right), as a PNG; None without them."""
    evals = [r for r in history if r.get("type") == "eval" and "val_logps_chosen" in r]
    if not evals:
        return None
    steps = [r["step"] for r in evals]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=110)
    left.plot(steps, [r["val_logps_chosen"] for r in evals], label="chosen", color="#55a868", marker="o")
    left.plot(steps, [r["val_logps_rejected"] for r in evals], label="rejected", color="#c44e52", marker="o")
    left.set_title("Validation answers' log-probability")
    left.set_xlabel("optimizer step")
    left.set_ylabel("mean summed log-prob")
    left.grid(alpha=0.3)
    left.legend()
    right.plot(steps, [r.get("val_reward_accuracy") for r in evals], color="#4c72b0", marker="o")
    right.set_ylim(-0.02, 1.02)
    right.set_title("Validation reward accuracy")
    right.set_xlabel("optimizer step")
    right.set_ylabel("share of pairs chosen > rejected")
    right.grid(alpha=0.3)
    return png(fig)


def preference_section(evaluation: dict[str, Any]) -> str:
    """A preference run's McNemar count and answer lengths (the table above has the rest)."""
    mc, length = evaluation.get("mcnemar"), evaluation.get("answer_length")
    if not mc:
        return ""
    out = [f"<p>Pairs the tuned model ranks right and the base did not: {mc['gained']}; the other way: {mc['lost']} "
           f"(exact McNemar p={mc['p_value']:.3g}). Pairwise accuracy: the share of pairs whose chosen answer the model finds likelier "
           "than the rejected one (per token: by mean log-prob, so length does not decide). Reward accuracy: the share "
           "of pairs where tuning raised the chosen answer's log-prob more than the rejected one's; margin gain: by how "
           "much on average (nats; DPO's implicit reward margin without its beta, so objectives compare). "
           f"Objective {html.escape(str(evaluation.get('objective')))}, beta {evaluation.get('beta')}.</p>"]
    if length and length.get("prompts"):
        lo, hi = length["change_ci"]
        out.append(f"<p>Answer length on {length['prompts']} test prompts (greedy): {length['base']:.1f} &rarr; "
                   f"{length['tuned']:.1f} tokens (change 95% interval [{lo:+.1f}, {hi:+.1f}]).</p>")
    return "".join(out)


def token_histogram_png(splits: dict[str, Any]) -> bytes | None:
    """Token-length histogram of each split (lengths in tokens of the chosen model), as a PNG."""
    lengths = {name: st["token_lengths"] for name, st in splits.items() if st.get("token_lengths")}
    if not lengths:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=110)
    top = max(max(v) for v in lengths.values())
    bins = list(range(0, top + max(1, top // 40), max(1, top // 40)))
    for name, values in lengths.items():
        ax.hist(values, bins=bins, alpha=0.55, label=f"{name} ({len(values)})")
    ax.set_title("Token lengths per split")
    ax.set_xlabel("tokens per example (text fields)")
    ax.set_ylabel("examples")
    ax.legend()
    return png(fig)


def png(fig: Any) -> bytes:
    """Render a matplotlib figure to PNG bytes and free it."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def data_section(data: dict[str, Any]) -> str:
    """What happened to the data: steps with rows in/out, labels per split, lengths, details."""
    parts = ["<h2>Data</h2>"]
    parts += [f"<p class='warning'>warning: {html.escape(w)}</p>" for w in data.get("warnings") or []]
    parts += [f"<p>{html.escape(n)}</p>" for n in data.get("notes", [])]
    steps = data.get("steps", [])
    if steps:
        rows = "".join(
            f"<tr><td>{html.escape(st['step'])}</td><td>{st['rows_in']}</td><td>{st['rows_out']}</td>"
            f"<td>{st['removed']}</td><td>{html.escape(_details(st))}</td></tr>" for st in steps)
        parts.append("<h3>Preparation steps</h3><table><tr><th>step</th><th>rows in</th><th>rows out</th>"
                     f"<th>removed</th><th>details</th></tr>{rows}</table>")
    splits = data.get("splits", {})
    labels = sorted({lab for st in splits.values() for lab in st.get("labels", {})})
    if labels:
        words = data.get("label_words") or {}
        head = "".join(f"<th>{html.escape(words.get(lab, lab))}" + (f" ({html.escape(lab)})" if lab in words else "")
                       + "</th>" for lab in labels)
        rows = "".join(f"<tr><td>{html.escape(name)}</td><td>{st['rows']}</td>"
                       + "".join(f"<td>{st['labels'].get(lab, 0)} ({100 * st['labels'].get(lab, 0) / max(st['rows'], 1):.1f}%)</td>" for lab in labels)
                       + "</tr>" for name, st in splits.items())
        parts.append(f"<h3>Labels per split</h3><table><tr><th>split</th><th>rows</th>{head}</tr>{rows}</table>")
    image = token_histogram_png(splits)
    if image:
        parts.append(f"<img alt='Token lengths per split' src='data:image/png;base64,{base64.b64encode(image).decode()}'>")
    for st in steps:
        for kind, pairs in (st.get("examples") or {}).items() if isinstance(st.get("examples"), dict) else []:
            items = "".join(f"<li><s>{html.escape(str(a)[:160])}</s> &rarr; {html.escape(str(b)[:160])}</li>" for a, b in pairs[:3])
            parts.append(f"<details><summary>{html.escape(st['step'])}: {html.escape(kind)}</summary><ul>{items}</ul></details>")
        if st.get("functions"):
            cols = [k for k in st["functions"][0] if k != "name"]
            head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
            rows = "".join("<tr><td>" + html.escape(fn["name"]) + "</td>" + "".join(f"<td>{html.escape(_fmt(fn.get(c)))}</td>" for c in cols) + "</tr>"
                           for fn in st["functions"])
            parts.append(f"<h3>Labeling functions ({html.escape(st['step'])})</h3><table><tr><th>function</th>{head}</tr>{rows}</table>")
    if "encoded" in data:
        parts.append("<h3>After rendering with the chat template</h3>" + "".join(
            f"<h4>{html.escape(k)}</h4>" + _kv_table(v) for k, v in data["encoded"].items()))
    return "\n".join(parts)


def _details(step: dict[str, Any]) -> str:
    """The step's scalar and count details in one line (examples and tables are shown apart)."""
    skip = {"step", "rows_in", "rows_out", "removed", "examples", "functions"}
    out = []
    for k, v in step.items():
        if k in skip or v in (None, [], {}):
            continue
        out.append(f"{k}: {_fmt(v) if not isinstance(v, list) else '; '.join(map(str, v[:3]))}")
    return ", ".join(out)


def metrics_table(evaluation: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Rows (metric, base, tuned, change) for the metrics the tuned model has: values with their
    95% bootstrap interval, the change with its paired bootstrap p-value."""
    base, tuned = evaluation.get("base") or {}, evaluation.get("tuned") or {}
    paired = evaluation.get("tuned_vs_base") or {}
    rows = []
    for k in HEADLINE:
        if k not in tuned:
            continue
        b = base.get(k)
        delta = "" if b is None else _num(tuned[k] - b, "+")
        if k in paired:
            delta += f" ({p_is(paired[k]['p_value'], paired[k].get('p_floor'))})"
        rows.append((metric_label(k), "" if b is None else _with_ci(b, base, k), _with_ci(tuned[k], tuned, k), delta))
    return rows


def _with_ci(value: float, side: dict[str, Any], key: str) -> str:
    ci = (side.get("ci") or {}).get(key)
    return _num(value) + (f" [{_num(ci[0])}, {_num(ci[1])}]" if ci else "")


def _num(value: float, sign: str = "") -> str:
    """Four decimals, or three significant digits in e-notation from 100,000 on (a base model's
    perplexity of 457576677.8258 on labels it never saw is read as 4.58e+08)."""
    return format(value, f"{sign}.3e" if abs(value) >= 1e5 else f"{sign}.4f")


def write_report(run_dir: Path) -> Path:
    """Write ``report.html`` for a run folder from its config, metrics, data report and eval."""
    run_dir = Path(run_dir)
    history = read_jsonl(run_dir / "metrics.jsonl")
    evaluation = load_json(run_dir / "eval.json")
    data = load_json(run_dir / "data_report.json")
    training = load_json(run_dir / "train_result.json")
    config = (run_dir / "config.yaml").read_text(encoding="utf-8") if (run_dir / "config.yaml").exists() else ""
    parts = [f"<h1>tunesmith run: {html.escape(run_dir.name)}</h1>"]
    if evaluation:
        parts.append(f"<h2>Base vs tuned on the test split ({evaluation.get('test_examples')} examples)</h2>")
        parts += [f"<p class='warning'>warning: {html.escape(w)}</p>" for w in evaluation.get("warnings") or []]
        rows = "".join(
            f"<tr><td>{m}</td><td>{b}</td><td>{t}</td><td class='{_direction(m, d)}'>{d}</td></tr>"
            for m, b, t, d in metrics_table(evaluation)
        )
        parts.append(f"<table><tr><th>metric</th><th>base</th><th>tuned</th><th>change</th></tr>{rows}</table>")
        parts.append(preference_section(evaluation))
        parts.append(forgetting_section(evaluation.get("forgetting")))
        parts.append(speed_section(evaluation))
        parts.append(per_class_section(evaluation))
        parts.append(tasks_section(evaluation))
    if history:
        img = base64.b64encode(loss_curve_png(history)).decode()
        parts.append(f"<h2>Training</h2><img alt='Loss curves' src='data:image/png;base64,{img}'>")
        if (curve := preference_curve_png(history)) is not None:
            parts.append("<img alt='Chosen and rejected log-probabilities and reward accuracy on the validation pairs' "
                         f"src='data:image/png;base64,{base64.b64encode(curve).decode()}'>")
    if training:
        parts.append(_kv_table(training))
    if data:
        parts.append(data_section(data) if "tasks" not in data else mixing_section(data))
    if evaluation and evaluation.get("disagreements"):
        parts.append("<h2>Examples where base and tuned disagree</h2><table><tr><th>input</th><th>reference</th><th>base</th><th>tuned</th></tr>")
        for d in evaluation["disagreements"]:
            parts.append("<tr>" + "".join(f"<td>{html.escape(str(d[k]))}</td>" for k in ("input", "reference", "base", "tuned")) + "</tr>")
        parts.append("</table>")
    parts.append(f"<h2>Resolved config</h2><pre>{html.escape(config)}</pre>")
    out = run_dir / "report.html"
    atomic_write_text(out, PAGE.format(title=html.escape(run_dir.name), body="\n".join(parts)))
    return out


def forgetting_section(block: dict[str, Any] | None) -> str:
    """General ability, base vs tuned (eval.json's ``forgetting``): general-text perplexity, agreement
    with the base model's replies and KL(base || tuned), with intervals, and a few replies side by side."""
    if not block:
        return ""
    b, t, c = block["base"], block["tuned"], block["change"]
    rows = [("general-text perplexity (lower is better)", _with_ci(b["perplexity"], b, "perplexity"),
             _with_ci(t["perplexity"], t, "perplexity"),
             f"{c['perplexity_relative']:+.1%} ({p_is(c['p_value'], c.get('p_floor'))})", "bad" if c["perplexity"] > 0 else "good")]
    if "agreement_rougeL" in t:
        rows += [("agreement with the base's replies, ROUGE-L (1 = unchanged)", "1", _with_ci(t["agreement_rougeL"], t, "agreement_rougeL"),
                  f"{t['agreement_rougeL'] - 1:+.4f}", "bad" if t["agreement_rougeL"] < 1 else ""),
                 ("KL(base || tuned), nats per token (0 = unchanged)", "0", _with_ci(t["kl"], t, "kl"), f"{t['kl']:+.4f}",
                  "bad" if t["kl"] > 0 else "")]
    table = "".join(f"<tr><td>{html.escape(m)}</td><td>{bv}</td><td>{tv}</td><td class='{cls}'>{d}</td></tr>"
                    for m, bv, tv, d, cls in rows)
    out = (f"<h2>Forgetting: general ability, base vs tuned</h2><p>{html.escape(str(block['source']))}: "
           f"{block['general_texts']} texts ({block['general_tokens']:,} tokens) and {block['instructions']} instructions; "
           f"{block['seconds']:.1f} s. Set eval.general to your own general text, or none to skip.</p>"
           f"<table><tr><th>measure</th><th>base</th><th>tuned</th><th>change</th></tr>{table}</table>")
    if block.get("examples"):
        out += "<table><tr><th>instruction</th><th>base reply</th><th>tuned reply</th></tr>" + "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(e[k]))}</td>" for k in ("instruction", "base", "tuned")) + "</tr>"
            for e in block["examples"]) + "</table>"
    return out


def _task_table(results: dict[str, Any]) -> str:
    rows = "".join(f"<tr><td>{m}</td><td>{b}</td><td>{t}</td><td class='{_direction(m, d)}'>{d}</td></tr>"
                   for m, b, t, d in metrics_table(results))
    return f"<table><tr><th>metric</th><th>base</th><th>tuned</th><th>change</th></tr>{rows}</table>"


def tasks_section(evaluation: dict[str, Any]) -> str:
    """A multi-task run: one base-vs-tuned table per task and the macro average of their headline
    metrics; a run started from another run: that run's tasks, its own score next to this run's."""
    parts = []
    macro = evaluation.get("macro") or {}
    if evaluation.get("tasks"):
        cells = "".join(f"<tr><td>{html.escape(n)}</td><td>{html.escape(m)}</td><td>{or_dash((r.get('base') or {}).get(m), '.4f')}"
                        f"</td><td>{r['tuned'][m]:.4f}</td></tr>"
                        for n, r in evaluation["tasks"].items() for m in [r["metric"]])
        parts.append("<h2>Tasks</h2><table><tr><th>task</th><th>headline metric</th><th>base</th><th>tuned</th></tr>"
                     f"{cells}<tr><td><b>macro average</b></td><td></td><td>{or_dash(macro.get('base'), '.4f')}</td>"
                     f"<td><b>{or_dash(macro.get('tuned'), '.4f')}</b></td></tr></table>")
        for name, r in evaluation["tasks"].items():
            parts.append(f"<h3>{html.escape(name)} ({html.escape(r['task'])}, {r['test_examples']} test examples)</h3>")
            parts += [f"<p class='warning'>warning: {html.escape(w)}</p>" for w in r.get("warnings") or []]
            parts.append(_task_table(r) + per_class_section(r))
    earlier = evaluation.get("previous_tasks") or {}
    if earlier:
        cells = "".join(
            f"<tr><td>{html.escape(n)}</td><td>{html.escape(r['metric'])}</td><td>{or_dash(r['earlier']['tuned'], '.4f')}</td>"
            f"<td>{or_dash((r.get('base') or {}).get(r['metric']), '.4f')}</td><td>{r['tuned'][r['metric']]:.4f}</td>"
            f"<td class='{'bad' if (r.get('drop') or 0) > 0 else 'good'}'>{or_dash(r.get('drop'), '+.4f')}</td></tr>"
            for n, r in earlier.items())
        run = html.escape(str(next(iter(earlier.values()))["earlier"]["run"]))
        parts.append(f"<h2>Earlier tasks (forgetting of the run this one started from)</h2><p>This run started from "
                     f"{run}; its tasks, tested again. Drop &gt; 0: the task got worse (forgotten).</p>"
                     "<table><tr><th>task</th><th>metric</th><th>that run's score</th><th>start model here</th>"
                     f"<th>after this run</th><th>drop</th></tr>{cells}</table>")
    return "\n".join(parts)


def mixing_section(data: dict[str, Any]) -> str:
    """A multi-task run's data: how the tasks were mixed (target and achieved shares), then each task's data."""
    mixing = data.get("mixing") or {}
    rows = "".join(f"<tr><td>{html.escape(n)}</td><td>{m['rows']}</td><td>{m['target_share']:.1%}</td>"
                   f"<td>{m['drawn']}</td><td>{m['share']:.1%}</td><td>x{m['repeats']:.2f}</td></tr>"
                   for n, m in (mixing.get("tasks") or {}).items())
    out = [f"<h2>Task mixing ({html.escape(str(mixing.get('by')))})</h2><table><tr><th>task</th><th>train rows</th>"
           f"<th>target share</th><th>rows drawn</th><th>share</th><th>repeats</th></tr>{rows}</table>"]
    for name, report in data["tasks"].items():
        out.append(data_section(report).replace("<h2>Data</h2>", f"<h2>Data: {html.escape(name)}</h2>", 1))
    return "\n".join(out)


def speed_section(evaluation: dict[str, Any]) -> str:
    """Inference cost of each model: the batched evaluation's throughput and the tuned model's latency."""
    rows = []
    for side in ("base", "tuned"):
        e = evaluation.get(side) or {}
        if "seconds" not in e:
            continue
        lat = e.get("latency") or {}
        rows.append(f"<tr><td>{side}</td><td>{e['seconds']:.1f} s</td><td>{or_dash(e.get('examples_per_s'), '.2f')}</td>"
                    f"<td>{or_dash(e.get('tokens_per_s'), '.0f')}</td>"
                    f"<td>{or_dash(lat.get('median_ms'), '.0f')}</td><td>{or_dash(lat.get('p95_ms'), '.0f')}</td></tr>")
    if not rows:
        return ""
    return ("<h2>Inference speed</h2><table><tr><th>model</th><th>batched evaluation</th><th>examples/s</th>"
            "<th>tokens/s</th><th>latency ms, median (one at a time)</th><th>latency ms, p95</th></tr>"
            + "".join(rows) + "</table>")


def per_class_section(evaluation: dict[str, Any]) -> str:
    """Per-class precision/recall/F1 of base and tuned, and both confusion matrices as a plot."""
    tuned, base = evaluation.get("tuned") or {}, evaluation.get("base") or {}
    if "per_class" not in tuned:
        return ""
    words = evaluation.get("label_words") or {}
    cells = "".join(f"<th>{side} {k}</th>" for side in ("base", "tuned") if side == "tuned" or "per_class" in base
                    for k in ("precision", "recall", "F1"))
    rows = []
    for label, t in tuned["per_class"].items():
        sides = ([base["per_class"].get(label, {})] if "per_class" in base else []) + [t]
        vals = "".join(f"<td>{or_dash(side.get(k), '.3f')}</td>" for side in sides for k in ("precision", "recall", "f1"))
        rows.append(f"<tr><td>{html.escape(words.get(label, label))}</td><td>{t['support']}</td>{vals}</tr>")
    out = (f"<h2>Per class</h2><table><tr><th>class</th><th>test examples</th>{cells}</tr>{''.join(rows)}</table>")
    image = confusion_png({side: e["confusion"] for side, e in (("base", base), ("tuned", tuned)) if "confusion" in e}, words)
    return out + f"<img alt='Confusion matrices' src='data:image/png;base64,{base64.b64encode(image).decode()}'>"


def confusion_png(matrices: dict[str, dict[str, Any]], words: dict[str, str]) -> bytes:
    """Confusion matrices side by side (rows: true class, columns: predicted; counts in the cells)."""
    fig, axes = plt.subplots(1, len(matrices), figsize=(3.6 * len(matrices) + 0.6, 3.4), dpi=110, squeeze=False)
    for ax, (side, cm) in zip(axes[0], matrices.items()):
        m = cm["matrix"]
        names = [words.get(k, k) for k in cm["labels"]]
        ax.imshow(m, cmap="Blues", vmin=0)
        top = max((v for row in m for v in row), default=0)
        for i, row in enumerate(m):
            for j, v in enumerate(row):
                ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "#222")
        ax.set_xticks(range(len(names)), names, rotation=30 if len(names) > 3 else 0)
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"Confusion matrix: {side}")
    return png(fig)


def write_compare_report(out_dir: Path, doc: dict[str, Any]) -> Path:
    """Write ``compare.html``: the measured table, overlaid loss curves, the metric with error
    bars, and cost against quality, then the verdict."""

    metric, rows = doc["metric"], doc["methods"]
    parts = [f"<h1>tunesmith: methods compared on {doc['test_examples']} test examples</h1>",
             f"<p class='verdict'>{html.escape(doc['verdict'])}</p>", html_table(*table(doc))]
    curves = doc.get("learning_curve") or {}
    base = next((r["base_value"] for r in rows if r["base_value"] is not None), None)
    for title, png in (("Loss curves", compare_curves_png(rows)), (f"Test {metric}", metric_bars_png(rows, metric)),
                       ("Cost and quality", cost_quality_png(rows, metric)),
                       ("Data needs", learning_curve_png(curves, metric, base, doc.get("learning_fit"))
                        if curves else None)):
        if png is not None:
            parts.append(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' "
                         f"src='data:image/png;base64,{base64.b64encode(png).decode()}'>")
    learning = learning_table(doc)
    if learning:
        parts.append(f"<p>Test {html.escape(metric)} by training-set size, with the paired bootstrap p-value against "
                     "the same method trained on all the data (same recipe and steps).</p>" + html_table(*learning))
        parts += [f"<p>{html.escape(words)}</p>" for words in doc.get("learning_fit_words", [])]
    out = Path(out_dir) / "compare.html"
    atomic_write_text(out, PAGE.format(title="method comparison", body="\n".join(parts)))
    return out


def html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<div class='wide'><table><tr>{head}</tr>{body}</table></div>"


def learning_curve_png(curves: dict[str, list[dict[str, Any]]], metric: str, base: float | None,
                       fits: dict[str, Any] | None = None) -> bytes:
    """Test metric against training examples (log scale) per method, with 95% intervals; where a
    saturating curve was fitted (``learning_curve.fit``), it is drawn dashed out to twice the data."""
    import numpy as np

    from tunesmith.evaluation import learning_curve

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    for method, points in curves.items():
        xs, ys = [p["train_examples"] for p in points], [p["value"] for p in points]
        err = [[p["value"] - p["low"] for p in points], [p["high"] - p["value"] for p in points]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=4, linewidth=1.6, label=method, color=COLORS.get(method))
        fitted = (fits or {}).get(method)
        if fitted:
            grid = np.geomspace(min(xs), 2 * fitted["n"], 60)
            ax.plot(grid, learning_curve.curve(fitted, grid), linestyle=":", linewidth=1.4, color=COLORS.get(method),
                    label=f"{method} fit (x2 data: {fitted['gain']:+.3f})")
    if base is not None:
        ax.axhline(base, color="#444", linestyle="--", linewidth=1, label=f"base model {base:.3f}")
    ax.set_xscale("log")
    ax.set_title(f"Data needs: test {metric} by training-set size")
    ax.set_xlabel("training examples (log scale)")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png(fig)


COLORS = {"prompt": "#8172b3", "lora": "#4c72b0", "full": "#dd8452"}


def compare_curves_png(rows: list[dict[str, Any]]) -> bytes | None:
    """Training (thin) and validation (dots) loss of every method that trained, on one plot."""
    trained = [r for r in rows if r["curves"].get("train")]
    if not trained:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    for r in trained:
        color = COLORS.get(r["method"])
        ax.plot(*zip(*r["curves"]["train"]), color=color, linewidth=1, alpha=0.6, label=f"{r['method']} train")
        if r["curves"].get("val"):
            ax.plot(*zip(*r["curves"]["val"]), color=color, marker="o", linewidth=2, label=f"{r['method']} validation")
    ax.set_title("Loss curves by method")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per target token")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png(fig)


def metric_bars_png(rows: list[dict[str, Any]], metric: str) -> bytes:
    """The test metric of each method with its 95% bootstrap interval; the base model dashed."""
    fig, ax = plt.subplots(figsize=(7, 3.4), dpi=110)
    names = [r["method"] for r in rows]
    values = [r["value"] for r in rows]
    errors = [[r["value"] - r["low"] for r in rows], [r["high"] - r["value"] for r in rows]]
    ax.bar(names, values, yerr=errors, capsize=6, color=[COLORS.get(n, "#55a868") for n in names])
    base = next((r["base_value"] for r in rows if r["base_value"] is not None), None)
    if base is not None:
        ax.axhline(base, color="#444", linestyle="--", linewidth=1, label=f"base model {base:.3f}")
        ax.legend()
    ax.set_title(f"Test {metric} by method (95% bootstrap interval)")
    ax.set_ylabel(metric)
    ax.grid(axis="y", alpha=0.3)
    return png(fig)


def cost_quality_png(rows: list[dict[str, Any]], metric: str) -> bytes:
    """Training seconds against the test metric: up and to the left is better."""
    fig, ax = plt.subplots(figsize=(7, 3.4), dpi=110)
    for r in rows:
        ax.errorbar(r["train_seconds"], r["value"], yerr=[[r["value"] - r["low"]], [r["high"] - r["value"]]],
                    fmt="o", markersize=9, capsize=5, color=COLORS.get(r["method"], "#55a868"))
        ax.annotate(f" {r['method']}", (r["train_seconds"], r["value"]))
    ax.set_title(f"Cost vs quality: training time against test {metric}")
    ax.set_xlabel("training time (s)")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    return png(fig)


def _direction(metric: str, delta: str) -> str:
    if not delta:
        return ""
    better = (float(delta.split()[0]) < 0) == (metric in LOWER_IS_BETTER)
    return "good" if better else "bad"


def _kv_table(d: dict[str, Any]) -> str:
    """A two-column table; nested mappings (e.g. ``mitigations``) become one row per leaf, with
    dotted keys (``mitigations.replay.rows``), instead of raw JSON."""
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(_fmt(v))}</td></tr>" for k, v in _flat(d))
    return f"<table>{rows}</table>"


def _flat(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        out += _flat(v, key + ".") if isinstance(v, dict) and v else [(key, v)]
    return out


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else json.dumps(v) if isinstance(v, (dict, list)) else str(v)


def load_json(path: Path) -> dict[str, Any]:
    """A JSON file's content, or {} when it does not exist (yet)."""
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tunesmith: {title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 960px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1em; }}
td, th {{ border: 1px solid #ccc; padding: 4px 10px; text-align: left; vertical-align: top; }}
th {{ background: #f3f3f3; }}
td.good {{ color: #1a7f37; font-weight: bold; }} td.bad {{ color: #cf222e; font-weight: bold; }}
p.warning {{ color: #9a6700; background: #fff8c5; padding: 4px 8px; }}
pre {{ background: #f6f8fa; padding: 1em; overflow-x: auto; }}
img {{ max-width: 100%; }}
div.wide {{ overflow-x: auto; }} div.wide table {{ font-size: 0.9em; }}
</style></head><body>
{body}
</body></html>
"""
