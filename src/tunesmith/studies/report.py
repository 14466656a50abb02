"""A study's HTML report (``report.html``) and its numbers (``report.json``), from ``analysis.analyze``."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

from tunesmith.io import atomic_write_json, atomic_write_text
from tunesmith.report.html import PAGE, html_table, png
from tunesmith.report.tables import p_text
from tunesmith.studies.analysis import analyze


def write_study_report(study_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """Analyse the study and write ``report.json`` and ``report.html`` into its folder."""
    study_dir = Path(study_dir)
    doc = analyze(study_dir)
    atomic_write_json(study_dir / "report.json", _no_nan(doc))
    atomic_write_text(study_dir / "report.html", PAGE.format(title=html.escape(doc["study"]), body=body(doc)))
    return study_dir / "report.html", doc


def _no_nan(value: Any) -> Any:
    """``value`` with every NaN as None: JSON has no NaN (Python writes it, other readers refuse it)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_no_nan(v) for v in value]
    return value


def _f(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _ci(d: dict[str, Any], key: str, spec: str = ".2f") -> str:
    return f"{_f(d[key], spec)} [{_f(d['low'], spec)}, {_f(d['high'], spec)}]"


def _p_is(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def verdicts(doc: dict[str, Any]) -> list[str]:
    """One sentence per compared pair of systems: who won, by how much, how sure."""
    out = []
    for w in doc["pairwise"]:
        if not w["n"]:
            continue
        lead, other, rate = (w["a"], w["b"], w["rate"]) if w["rate"] >= 0.5 else (w["b"], w["a"], 1 - w["rate"])
        sure = f"a clear difference (sign test {_p_is(w['p_sign'])})" if w["p_sign"] < 0.05 else \
            f"not a clear difference (sign test {_p_is(w['p_sign'])}; more ratings would tell)"
        prompts = f"; by prompt {max(w['prompts_won'], w['prompts_lost'])} to {min(w['prompts_won'], w['prompts_lost'])}"
        out.append(f"{lead} was preferred over {other} in {rate:.0%} of {w['n']} rating{'' if w['n'] == 1 else 's'} "
                   f"(ties count half{prompts}): {sure}.")
    return out


def body(doc: dict[str, Any]) -> str:
    parts = [f"<h1>Rating study: {html.escape(doc['study'])}</h1>",
             f"<p>{doc['items']} prompts, systems: {', '.join(html.escape(s) for s in doc['systems'])}; "
             f"{doc['human_ratings']} ratings by {len(doc['human_raters'])} human rater(s) "
             f"({html.escape(', '.join(doc['human_raters']) or 'none yet')}); {doc['pairs_complete']} of {doc['pairs']} "
             f"pairs have the {doc['ratings_per_pair']} ratings asked for."
             + (f" LLM judge(s): {html.escape(', '.join(doc['judges']))} (reported apart from the people)." if doc["judges"] else "")
             + "</p>"]
    parts.append("<h2>Who won</h2>" + "".join(f"<p>{html.escape(v)}</p>" for v in verdicts(doc)))
    parts.append("<p>Win rate: the first system's share of the ratings, ties counting half, with a 95% interval that "
                 "resamples prompts. Sign test over prompts (a prompt is won when most of its ratings favour one "
                 "system); with few prompts, read the interval rather than the point.</p>")
    parts.append(_win_table(doc["pairwise"]))
    if doc.get("bradley_terry"):
        parts.append("<h2>Bradley-Terry strengths</h2><p>P(i beats j) = s_i / (s_i + s_j); "
                     "'beats average' is the chance of beating a system of strength 1. Fitted with half a virtual "
                     "win each way between every two systems compared, so that a system that never lost still "
                     "gets a finite strength.</p>")
        parts.append(html_table(["system", "strength", "beats average"],
                                [[s, _f(v["strength"]) + (" (never lost)" if v["unbeaten"] else ""),
                                  _f(v["beats_average"], ".0%")] for s, v in doc["bradley_terry"].items()]))
    crit = [*doc["criteria"], "overall"]
    parts.append("<h2>Mean scores (1-5)</h2>")
    parts.append(html_table(["system", *crit], [[s, *(_ci(doc["scores"][s][c], "mean") for c in crit)] for s in doc["systems"]]))
    if doc["human_ratings"]:
        img = base64.b64encode(_scores_png(doc)).decode()
        parts.append(f"<img alt='Mean scores per criterion' src='data:image/png;base64,{img}'>")
    a = doc["agreement"]
    parts.append("<h2>Did the raters agree?</h2><p>Krippendorff's alpha (1 = perfect agreement, 0 = chance; "
                 "ordinal on the scores, nominal on the preference). Below 0.667 is usually read as unreliable.</p>")
    parts.append(html_table(["measure", "alpha", "units rated by 2+ raters"],
                            [[c, _f(a.get(c)) if a.get(c) is not None else "- (undefined: too few shared units or no variation)",
                              str(a.get(f"{c}_units", 0))] for c in [*doc["criteria"], "preference"]]))
    pb = doc["position_bias"]
    parts.append("<h2>Position bias</h2>" + (
        f"<p>The left answer won {pb['left_wins']} of {pb['decisive']} decisive preferences "
        f"({_f(pb['rate'], '.0%')}; binomial test of 50%: p = {p_text(pb['p'])}). Positions were balanced "
        "by assignment, so a bias here does not favour any system.</p>" if pb["decisive"] else
        "<p>No decisive human preference yet.</p>"))
    parts.append("<h2>Would the automatic metrics and the judge have told us the same?</h2>"
                 f"<p>For each of the {doc.get('pairs_with_majority', 0)} pairs with a human majority (unrated pairs and "
                 "split votes left out): does the metric's (or judge's) pick match it? "
                 "Cohen's kappa corrects the agreement for chance; Spearman's rho relates each output's metric "
                 "to its mean human score.</p>")
    rows = []
    for m, r in doc["metrics"].items():
        v = r["vs_majority"]
        rows.append([m, _f(v["agreement"], ".0%"), _ci(v, "kappa"), str(v["n"]), _f(r["spearman"]["rho"]), _f(r["spearman"]["p"], ".3f")])
    for j, d in doc["judges_detail"].items():
        v = d["vs_majority"]
        rows.append([j + " (LLM judge)", _f(v["agreement"], ".0%"), _ci(v, "kappa"), str(v["n"]), "-", "-"])
    parts.append(html_table(["measure", "agrees with people", "Cohen's kappa [95% CI]", "pairs", "Spearman rho", "p"], rows))
    for j, d in doc["judges_detail"].items():
        parts.append(f"<h2>LLM judge {html.escape(j)}</h2><p>{d['judgements']} verdicts on {d['pairs']} pairs, each asked "
                     f"in both orders; {d['inconsistent_orders']} pairs changed verdict when the order was swapped "
                     f"(counted as ties); {d['unreadable']} answers could not be read (not counted)."
                     + (f" The first answer won {_f(d['position_bias']['rate'], '.0%')} of its decisive verdicts."
                        if d["position_bias"]["decisive"] else "") + "</p>")
        if d["pairwise"]:
            parts.append(_win_table(d["pairwise"]))
        if not d["pairs"]:
            parts.append("<p class='warning'>No readable verdict: this judge cannot be compared with the people. "
                         "A small model rarely answers in the JSON asked for; use a stronger judge.</p>")
        if d["unreadable_examples"]:
            parts.append(html_table(["unreadable answer", "why"], [[u["reply"], u["problem"]] for u in d["unreadable_examples"]]))
    if doc["comments"]:
        parts.append("<h2>Comments</h2>")
        parts.append(html_table(["rater", "prompt", "answer A was", "answer B was", "comment"],
                                [[c["rater"], str(c["item"]), c.get("answer_a", "?"), c.get("answer_b", "?"), c["comment"]]
                                 for c in doc["comments"]]))
    return "\n".join(parts)


def _win_table(rows: list[dict[str, Any]]) -> str:
    return html_table(["system", "vs", "wins", "ties", "losses", "win rate [95% CI]", "prompts won-lost", "sign test p"],
                      [[w["a"], w["b"], str(w["wins"]), str(w["ties"]), str(w["losses"]), _ci(w, "rate"),
                        f"{w['prompts_won']}-{w['prompts_lost']}", p_text(w["p_sign"])] for w in rows])


def _scores_png(doc: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    crit = [*doc["criteria"], "overall"]
    systems = doc["systems"]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / len(systems)
    for k, s in enumerate(systems):
        d = [doc["scores"][s][c] for c in crit]
        means = np.array([x["mean"] for x in d], dtype=float)
        err = np.array([[x["mean"] - x["low"] for x in d], [x["high"] - x["mean"] for x in d]], dtype=float)
        ax.bar(np.arange(len(crit)) + k * width, np.nan_to_num(means), width, yerr=np.nan_to_num(err), capsize=3, label=s)
    ax.set_xticks(np.arange(len(crit)) + width * (len(systems) - 1) / 2, crit)
    ax.set_ylim(0, 5.4)
    ax.set_ylabel("mean score (95% CI)")
    ax.legend(fontsize=8, loc="upper right")
    return png(fig)
