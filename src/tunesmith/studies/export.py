"""Preference data out of a study: the pairs the people (or the judge) decided, as chosen/rejected.

The layout is the conversational preference format of TRL's ``DPOTrainer`` (``prompt``: the messages
before the answer; ``chosen`` and ``rejected``: one assistant message each), one JSON object per line,
with the systems and the vote counts kept alongside for filtering. Ties and split votes are left out.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from tunesmith.io import atomic_write_jsonl
from tunesmith.studies import store
from tunesmith.studies.create import StudyError, load_study
from tunesmith.studies.stats import majority

SOURCES = ("human", "judge")


def _ratings(study_dir: Path, source: str, judge: str | None) -> list[dict[str, Any]]:
    """The study's ratings from ``source`` (one judge's, named when there are several). Raises StudyError."""
    if source not in SOURCES:
        raise StudyError(f"--source: expected one of {', '.join(SOURCES)}, got {source!r}")
    with store.connect(study_dir) as con:
        ratings = [r for r in store.all_ratings(con) if r["kind"] == source]
    if source == "judge":
        names = sorted({r["rater_name"] for r in ratings})
        if judge is not None:
            if judge not in names:
                raise StudyError(f"--judge {judge!r}: no such judge in this study (judges: {', '.join(names) or 'none'})")
            ratings = [r for r in ratings if r["rater_name"] == judge]
        elif len(names) > 1:
            raise StudyError(f"this study has several judges ({', '.join(names)}): choose one with --judge")
    if not ratings:
        raise StudyError(f"{study_dir}: no {'human ratings' if source == 'human' else 'judge verdicts'} yet: "
                         "nothing to export")
    return ratings


def unpaired_rows(study_dir: str | Path, source: str = "human", good: float = 4.0, bad: float = 2.0,
                  judge: str | None = None) -> list[dict[str, Any]]:
    """One row per (prompt, system) answer the ``source`` raters scored, in KTO's unpaired layout: ``label`` true when
    the mean of its 1-5 scores (over raters and criteria) is at least ``good``, false when at most ``bad``; answers in
    between, and empty answers, are left out. Raises StudyError as ``preference_rows``."""
    study_dir = Path(study_dir)
    _, items = load_study(study_dir)
    by_id = {it["id"]: it for it in items}
    scores: dict[tuple[int, str], list[float]] = defaultdict(list)
    for r in _ratings(study_dir, source, judge):
        for system, by_criterion in r["scores"].items():  # stored by system: {system: {criterion: 1-5}}
            values = list(by_criterion.values())
            if values:
                scores[(r["item"], system)].append(sum(values) / len(values))
    rows = []
    for (item_id, system), values in sorted(scores.items()):
        mean, answer = sum(values) / len(values), by_id[item_id]["outputs"][system]
        if answer.strip() and (mean >= good or mean <= bad):
            rows.append({"prompt": by_id[item_id]["messages"], "completion": [{"role": "assistant", "content": answer}],
                         "label": mean >= good, "system": system, "item": item_id, "score": mean, "ratings": len(values)})
    return rows


def preference_rows(study_dir: str | Path, source: str = "human", min_votes: int = 1,
                    judge: str | None = None, keep_empty: bool = False) -> list[dict[str, Any]]:
    """One row per pair whose ``source`` raters (human: the majority of the people's preferences;
    judge: the verdicts of one judge, both orders: ``judge`` names it when there are several) prefer
    one answer, with at least ``min_votes`` votes; pairs where a system said nothing are left out (an empty answer
    is no text to learn from) unless ``keep_empty``. Raises StudyError for an unknown source, no
    ratings from it, or several judges and none named."""
    study_dir = Path(study_dir)
    _, items = load_study(study_dir)
    by_id = {it["id"]: it for it in items}
    ratings = _ratings(study_dir, source, judge)
    votes: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in ratings:
        votes[r["pair"]].append(r)
    rows = []
    for pid, rs in sorted(votes.items()):
        winner = majority([r["preference"] for r in rs])
        if winner is None or winner == "tie" or len(rs) < min_votes:
            continue
        r0 = rs[0]
        loser = r0["b"] if winner == r0["a"] else r0["a"]
        item = by_id[r0["item"]]
        if not keep_empty and not (item["outputs"][winner].strip() and item["outputs"][loser].strip()):
            continue  # a system that said nothing: no answer text to learn from (counted by ``empty_answers``)
        rows.append({"prompt": item["messages"],
                     "chosen": [{"role": "assistant", "content": item["outputs"][winner]}],
                     "rejected": [{"role": "assistant", "content": item["outputs"][loser]}],
                     "chosen_system": winner, "rejected_system": loser, "item": item["id"],
                     "votes": {"chosen": sum(r["preference"] == winner for r in rs),
                               "rejected": sum(r["preference"] == loser for r in rs),
                               "tie": sum(r["preference"] == "tie" for r in rs)}})
    return rows


def empty_answers(study_dir: str | Path, source: str = "human", min_votes: int = 1, judge: str | None = None) -> int:
    """Decided pairs ``preference_rows`` leaves out because one of the two answers is empty."""
    decided = preference_rows(study_dir, source, min_votes, judge, keep_empty=True)
    return len(decided) - len(preference_rows(study_dir, source, min_votes, judge))


def default_path(study_dir: str | Path, source: str = "human", fmt: str = "preference") -> Path:
    """``STUDY/preferences.jsonl`` for the people's preferences, ``STUDY/preferences-judge.jsonl``
    for the judge's (one never overwrites the other); ``fmt`` unpaired: ``STUDY/unpaired.jsonl`` (``-judge``)."""
    stem = "preferences" if fmt == "preference" else "unpaired"
    return Path(study_dir) / (f"{stem}.jsonl" if source == "human" else f"{stem}-{source}.jsonl")


def export_preferences(study_dir: str | Path, out: str | Path, source: str = "human", min_votes: int = 1,
                       judge: str | None = None) -> int:
    """Write ``preference_rows`` to the JSONL file ``out`` (atomically); returns the number of rows.
    Raises StudyError when the study has no ratings from ``source`` (nothing is written then)."""
    rows = preference_rows(study_dir, source, min_votes, judge)
    atomic_write_jsonl(Path(out), rows)
    return len(rows)


def export_unpaired(study_dir: str | Path, out: str | Path, source: str = "human", good: float = 4.0, bad: float = 2.0,
                    judge: str | None = None) -> int:
    """Write ``unpaired_rows`` to the JSONL file ``out`` (atomically); returns the number of rows."""
    rows = unpaired_rows(study_dir, source, good, bad, judge)
    atomic_write_jsonl(Path(out), rows)
    return len(rows)
