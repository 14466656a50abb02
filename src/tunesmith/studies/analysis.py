"""A study's results from its ratings: who won and how sure that is, whether the raters agreed, whether
position mattered, and whether the automatic metrics and the LLM judge would have said the same.

``analyze(study_dir)`` returns one plain dict (written as ``report.json``; ``studies.report`` turns it
into HTML). Human ratings and judge verdicts are kept apart: the human results never include the
judge; the judge is compared with the human majority of each pair.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from tunesmith.evaluation import metrics as M
from tunesmith.studies import stats as S
from tunesmith.studies import store
from tunesmith.studies.create import load_study

AUTOMATIC = ("rougeL", "bleu", "chrf")
PRIOR_WINS = 0.5  # Bradley-Terry: virtual wins each way between two compared systems


def analyze(study_dir: str | Path, resamples: int = S.RESAMPLES, readonly: bool = False) -> dict[str, Any]:
    """Every statistic of the study in ``study_dir`` (see the module docstring). Raises StudyError
    when the folder is not a study. ``readonly``: the ratings file is only read (the dashboard)."""
    study_dir = Path(study_dir)
    study, items = load_study(study_dir)
    criteria = [c["name"] for c in study["criteria"]]
    systems = list(study["systems"])
    with store.connect(study_dir, readonly=readonly) as con:
        ratings = store.all_ratings(con)
        pairs = store.pairs(con)
        people = store.raters(con)
        failures = [dict(r) for r in con.execute("SELECT f.*, x.name AS rater_name FROM judge_failures f "
                                                 "JOIN raters x ON x.id = f.rater")]
    human = [r for r in ratings if r["kind"] == "human"]
    k = int(study["ratings_per_pair"])
    per_pair = defaultdict(list)
    for r in human:
        per_pair[r["pair"]].append(r)
    doc: dict[str, Any] = {
        "study": study["name"], "systems": systems, "criteria": criteria, "items": len(items),
        "pairs": len(pairs), "ratings_per_pair": k,
        "pairs_complete": sum(1 for p in pairs if len(per_pair.get(p["id"], [])) >= k),
        "human_raters": sorted({r["rater_name"] for r in human}),
        "invited_raters": [p["name"] for p in people if p["kind"] == "human"],
        "human_ratings": len(human),
        "judges": sorted({p["name"] for p in people if p["kind"] == "judge"}),
    }
    doc["scores"] = _scores(human, systems, criteria, resamples)
    doc["pairwise"] = _pairwise(human, resamples)
    doc["bradley_terry"] = _bt(human) if len(systems) > 2 else None
    doc["agreement"] = _agreement(human, criteria, systems)
    doc["position_bias"] = S.position_bias([r["preference"] == r["left"] for r in human if r["preference"] != "tie"])
    # pairs with a human majority only: unrated pairs and split votes tell nothing to compare with
    majority = {pid: v for pid, rs in per_pair.items() if rs and (v := S.majority([r["preference"] for r in rs])) is not None}
    doc["pairs_with_majority"] = len(majority)
    pair_by_id = {p["id"]: p for p in pairs}
    doc["metrics"] = _metrics(items, pair_by_id, majority, human, systems, criteria, resamples)
    doc["judges_detail"] = {j: _judge(j, ratings, failures, majority, pair_by_id, resamples) for j in doc["judges"]}
    doc["comments"] = [{"rater": r["rater_name"], "item": r["item"], "comment": r["comment"], "answer_a": r["left"],
                        "answer_b": r["right"]} for r in human if r["comment"]]
    return doc


def _scores(human: list[dict[str, Any]], systems: list[str], criteria: list[str], resamples: int) -> dict[str, Any]:
    """Per system and criterion (and ``overall``: the mean of the criteria): mean score [interval], n."""
    out: dict[str, Any] = {}
    for s in systems:
        rows = [(r["item"], r["scores"][s]) for r in human if s in r["scores"]]
        out[s] = {}
        for c in [*criteria, "overall"]:
            values = [float(np.mean([sc[x] for x in criteria])) if c == "overall" else float(sc[c]) for _, sc in rows]
            mean, low, high = S.mean_interval(values, [i for i, _ in rows], resamples)
            out[s][c] = {"mean": mean, "low": low, "high": high, "n": len(values)}
    return out


def _outcomes(rows: list[dict[str, Any]], x: str) -> list[float]:
    return [1.0 if r["preference"] == x else 0.5 if r["preference"] == "tie" else 0.0 for r in rows]


def _pairwise(rows: list[dict[str, Any]], resamples: int) -> list[dict[str, Any]]:
    """For every two systems rated against each other: the first's win rate over the second."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["a"], r["b"])].append(r)
    return [{"a": a, "b": b, **S.win_rate(_outcomes(rs, a), [r["item"] for r in rs], resamples)}
            for (a, b), rs in sorted(groups.items())]


def _bt(rows: list[dict[str, Any]]) -> dict[str, Any]:
    wins: dict[tuple[str, str], float] = defaultdict(float)
    for r in rows:
        o = _outcomes([r], r["a"])[0]
        wins[(r["a"], r["b"])] += o
        wins[(r["b"], r["a"])] += 1 - o
    lost = defaultdict(float)
    for (_, j), w in wins.items():
        lost[j] += w
    # a system that never lost (or a group that never lost to the rest) has no finite maximum-likelihood
    # strength, and the others' strengths then depend on when the fit stops; half a virtual win each way
    # between every two systems compared (a weak prior; Bradley-Terry with pseudo-counts) keeps every
    # strength finite and leaves well-supported ones nearly unchanged
    prior = dict(wins)
    for i, j in list(wins):
        prior[(i, j)] = prior.get((i, j), 0.0) + PRIOR_WINS
    strengths = S.bradley_terry(prior)
    return {s: {"strength": v, "beats_average": v / (v + 1), "unbeaten": lost[s] == 0}
            for s, v in sorted(strengths.items(), key=lambda kv: -kv[1])}


def _agreement(human: list[dict[str, Any]], criteria: list[str], systems: list[str]) -> dict[str, Any]:
    """Krippendorff's alpha: ordinal on each criterion's scores (unit: one system's output for one
    prompt; a rater who saw it twice counts with their mean), nominal on the preferences (unit: a pair)."""
    raters = sorted({r["rater_name"] for r in human})
    out: dict[str, Any] = {"raters": len(raters)}
    for c in criteria:
        cells: dict[tuple[str, Any], list[float]] = defaultdict(list)
        for r in human:
            for s, sc in r["scores"].items():
                cells[(r["rater_name"], (r["item"], s))].append(float(sc[c]))
        units = sorted({u for _, u in cells})
        table = [[float(np.mean(cells[(who, u)])) if (who, u) in cells else np.nan for u in units] for who in raters]
        out[c] = S.krippendorff_alpha(table, "ordinal")
        out[f"{c}_units"] = S.shared_units(table)
    codes = {name: i for i, name in enumerate(["tie", *systems])}
    pair_ids = sorted({r["pair"] for r in human})
    prefs = {(r["rater_name"], r["pair"]): codes[r["preference"]] for r in human}
    table = [[prefs.get((who, p), np.nan) for p in pair_ids] for who in raters]
    out["preference"] = S.krippendorff_alpha(table, "nominal")
    out["preference_units"] = S.shared_units(table)
    return out


def _sentence_metrics(items: list[dict[str, Any]], systems: list[str]) -> dict[tuple[int, str], dict[str, float]]:
    """ROUGE-L F, sentence BLEU and chrF (sacrebleu) of every output against its references."""
    from sacrebleu.metrics import BLEU, CHRF

    bleu, chrf = BLEU(effective_order=True), CHRF()
    keys = [(it["id"], s) for it in items for s in systems]
    refs = [it.get("references") or [it["reference"]] for it in items for _ in systems]
    outs = [it["outputs"][s] for it in items for s in systems]
    rouge_l = M.rouge(refs, outs)["rougeL"]
    return {key: {"rougeL": rouge_l[i], "bleu": float(bleu.sentence_score(outs[i], refs[i]).score),
                  "chrf": float(chrf.sentence_score(outs[i], refs[i]).score)} for i, key in enumerate(keys)}


def _metrics(items: list[dict[str, Any]], pairs: dict[int, dict[str, Any]], majority: dict[int, str],
             human: list[dict[str, Any]], systems: list[str], criteria: list[str], resamples: int) -> dict[str, Any]:
    """Would ROUGE-L, BLEU and chrF have told us the same? Per metric: on each rated pair the output
    with the higher sentence score is its pick (equal: tie), compared with the human majority
    (agreement, Cohen's kappa); and Spearman's rho between the metric and the mean human score of each
    rated output."""
    if not items:
        return {}
    per_output = _sentence_metrics(items, systems)
    human_mean: dict[tuple[int, str], list[float]] = defaultdict(list)
    for r in human:
        for s, sc in r["scores"].items():
            human_mean[(r["item"], s)].append(float(np.mean([sc[c] for c in criteria])))
    rated = sorted(human_mean)
    out: dict[str, Any] = {}
    for m in AUTOMATIC:
        picks, people = [], []
        for pid, verdict in sorted(majority.items()):
            p = pairs[pid]
            va, vb = per_output[(p["item"], p["a"])][m], per_output[(p["item"], p["b"])][m]
            picks.append(p["a"] if va > vb else p["b"] if vb > va else "tie")
            people.append(verdict)
        out[m] = {"vs_majority": S.cohen_kappa(picks, people, resamples),
                  "spearman": S.spearman([per_output[u][m] for u in rated], [float(np.mean(human_mean[u])) for u in rated]),
                  "mean": {s: float(np.mean([per_output[(it["id"], s)][m] for it in items])) for s in systems}}
    return out


def _judge(name: str, ratings: list[dict[str, Any]], failures: list[dict[str, Any]], majority: dict[int, str],
           pairs: dict[int, dict[str, Any]], resamples: int) -> dict[str, Any]:
    """One judge: its verdict per pair (both orders agree: that; they disagree: tie, counted as
    inconsistent; one order unreadable: the other), its win rates, its agreement with the human
    majority, how often it favoured the first answer, and how many answers could not be read."""
    mine = [r for r in ratings if r["rater_name"] == name]
    by_pair: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in mine:
        by_pair[r["pair"]].append(r)
    verdicts, inconsistent = {}, 0
    for pid, rs in by_pair.items():
        prefs = {r["preference"] for r in rs}
        if len(rs) >= 2 and len(prefs) > 1:
            inconsistent += 1
            verdicts[pid] = "tie"
        else:
            verdicts[pid] = rs[0]["preference"]
    rows = [{"a": pairs[pid]["a"], "b": pairs[pid]["b"], "item": pairs[pid]["item"], "preference": v}
            for pid, v in sorted(verdicts.items())]
    both = [pid for pid in majority if pid in verdicts]
    mine_failures = [f for f in failures if f["rater_name"] == name]
    return {"judgements": len(mine), "pairs": len(verdicts), "inconsistent_orders": inconsistent,
            "unreadable": len(mine_failures),
            "unreadable_examples": [{"reply": f["reply"][:300], "problem": f["problem"]} for f in mine_failures[:5]],
            "pairwise": _pairwise(rows, resamples),
            "vs_majority": S.cohen_kappa([verdicts[p] for p in both], [majority[p] for p in both], resamples),
            "position_bias": S.position_bias([r["preference"] == r["left"] for r in mine if r["preference"] != "tie"])}
