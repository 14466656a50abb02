"""Build a rating study from finished runs: the test prompts, each system's output, stored once.

A study folder (``studies/<name>/``) holds ``study.json`` (criteria with their anchor wording, the
systems and where their outputs came from, ratings per pair), ``items.jsonl`` (per prompt: the
conversation so far, the reference, every system's output) and ``ratings.sqlite`` (see ``store``).
The outputs are the runs' own greedy test predictions (``predictions.jsonl``, written by the run's
evaluation), so the study shows exactly what the metrics scored; an API model's answers are asked
for once, here.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tunesmith.errors import TunesmithError
from tunesmith.api import ApiModel
from tunesmith.runtime.commands import command
from tunesmith.config import ApiConfig
from tunesmith.data.formats import read_table
from tunesmith.data.layouts import to_example
from tunesmith.data.prepare import REPORT, cap_test
from tunesmith.evaluation.evaluate import reference, references
from tunesmith.io import atomic_write_json, atomic_write_jsonl, read_jsonl
from tunesmith.studies import store

STUDY = "study.json"
ITEMS = "items.jsonl"
DEFAULT_CRITERIA = ("relevance", "engagement", "quality")
DEFAULT_ANCHORS = {1: "very poor", 2: "poor", 3: "acceptable", 4: "good", 5: "excellent"}
QUESTIONS = {"relevance": "Does it answer what was asked, using the input?",
             "engagement": "Would a reader want to read it? Is it interesting, not dull or repetitive?",
             "quality": "Overall, how good is this answer (correct, clear, well written)?",
             "accuracy": "Is everything it says correct and supported by the input?",
             "fluency": "Is it fluent, grammatical language?",
             "helpfulness": "How much does it help the person who asked?"}
DEFAULT_INSTRUCTIONS = (
    "Read the request, then both answers. Score each answer on its own against each criterion, then say which "
    "you prefer overall (tie when neither is better). You do not know which system wrote which answer, and the "
    "sides are shuffled. Answers may stop mid-sentence where the systems hit their length limit: judge what is "
    "there. An answer that repeats or copies the request without doing what was asked should score low. "
    "A wrong fact counts against an answer even when the text reads well. After saving you can still change your "
    "previous answer.")


class StudyError(TunesmithError, ValueError):
    """A study cannot be made or read: the message names the run, file or option at fault."""


@dataclass
class Criterion:
    """One thing raters score from 1 to 5; ``anchors`` word some (or all) of the five points."""

    name: str
    question: str = ""
    anchors: dict[int, str] = field(default_factory=lambda: dict(DEFAULT_ANCHORS))


NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


def criteria_from(names: str | list[str] | None, rubric: str | Path | None = None) -> list[Criterion]:
    """Criteria from a comma-separated list of names and/or a rubric YAML file
    ``{criteria: {name: {question: str, anchors: {1: str, ..., 5: str}}}}`` (the rubric's wording
    wins for a name given both ways). Raises StudyError listing every problem, naming the file and
    key: a name that is not a plain name, a name given twice (in any letter case), a criterion that
    is not a mapping, unknown keys, anchors that are not a mapping of points 1-5 to words."""
    out: dict[str, Criterion] = {}
    problems: list[str] = []

    def add(name: str, criterion: Criterion, where: str) -> None:
        if not NAME.fullmatch(name):
            problems.append(f"{where}{name!r} is not a name (a letter, then letters, digits, - and _)")
        elif name.lower() in {n.lower() for n in out}:
            problems.append(f"{where}{name!r} is given twice")
        else:
            out[name] = criterion

    for n in (names.split(",") if isinstance(names, str) else names or []):
        if n.strip():
            add(n.strip(), Criterion(n.strip(), QUESTIONS.get(n.strip(), "")), "--criteria: ")
    if rubric:
        try:
            doc = yaml.safe_load(Path(rubric).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise StudyError(f"{rubric}: {e}") from None
        block = doc.get("criteria") if isinstance(doc, dict) else None
        if not isinstance(block, dict) or not block:
            raise StudyError(f"{rubric}: expected `criteria:` mapping each name to {{question, anchors}}")
        for n, spec in block.items():
            n, spec = str(n), {} if spec is None else spec
            if not isinstance(spec, dict):
                problems.append(f"criteria.{n}: expected a mapping with `question` and/or `anchors`, got {spec!r}")
                continue
            if set(spec) - {"question", "anchors"}:
                problems.append(f"criteria.{n}: unknown key(s) {', '.join(sorted(map(str, set(spec) - {'question', 'anchors'})))}; "
                                "only `question` and `anchors` are allowed")
                continue
            anchors = dict(DEFAULT_ANCHORS)
            given = spec.get("anchors") or {}
            if not isinstance(given, dict):
                problems.append(f"criteria.{n}.anchors: expected a mapping of points to words, e.g. {{1: poor, 5: great}}")
                continue
            for point, words in given.items():
                if str(point) not in {"1", "2", "3", "4", "5"}:
                    problems.append(f"criteria.{n}.anchors.{point}: anchors are for the points 1 to 5")
                elif not isinstance(words, (str, int, float)) or isinstance(words, bool) or not str(words).strip():
                    problems.append(f"criteria.{n}.anchors.{point}: expected a few words, got {words!r}")
                else:
                    anchors[int(point)] = str(words).strip()
            question = spec.get("question")
            if question is not None and not isinstance(question, str):
                problems.append(f"criteria.{n}.question: expected text, got {question!r}")
                continue
            out.pop(n, None)
            add(n, Criterion(n, str(question or QUESTIONS.get(n, "")), anchors), f"{rubric}: criteria.")
    if problems:
        raise StudyError((f"{rubric}: " if rubric else "") + "; ".join(problems))
    if not out:
        raise StudyError("a study needs at least one criterion (--criteria relevance,quality)")
    return list(out.values())


def create_study(runs: list[str | Path], out: str | Path, *, base: bool = False, api: ApiConfig | None = None,
                 examples: int = 30, criteria: list[Criterion] | None = None, ratings_per_pair: int = 3,
                 raters: list[str] | None = None, seed: int = 0, overwrite: bool = False,
                 instructions: str | None = None, exclude: list[str | Path] | None = None) -> Path:
    """Make the study folder ``out`` comparing the tuned outputs of ``runs`` (and the base model's
    when ``base``, and the answers of the API model ``api``) on ``examples`` test prompts drawn at
    random (``seed``) from the runs' shared test split. ``raters`` get invite tokens now (more can
    be added later with ``invite``). ``instructions``: shown to raters above every pair (default:
    ``DEFAULT_INSTRUCTIONS``). A preference run (``task: preference``, trained from one of the other runs) answers the
    drawn prompts now, greedily, as the other runs did in their evaluation. ``exclude``: earlier studies whose prompts
    are not drawn again (a study of a preference run trained on an earlier study's ratings is rated on new prompts).
    Returns the folder.

    Raises StudyError: fewer than two systems, a run that is not a finished generation run, runs
    evaluated on different test prompts, an existing folder without ``overwrite``.
    """
    out = Path(out)
    if (out / STUDY).exists() and not overwrite:
        raise StudyError(f"{out} already holds a study (use --overwrite to replace it, or another --name)")
    if ratings_per_pair < 1:
        raise StudyError("--ratings-per-pair must be at least 1")
    criteria = criteria or [Criterion(n, QUESTIONS[n]) for n in DEFAULT_CRITERIA]
    answering = [Path(r) for r in runs if _is_preference_run(Path(r))]
    loaded = [_run_outputs(Path(r)) for r in runs if Path(r) not in answering]
    if answering and not loaded:
        raise StudyError(f"{answering[0]}: a preference run answers the test prompts of a generation run: name the "
                         "run it started from (or another run on the same data) too")
    if not loaded and not api:
        raise StudyError("name at least one run (the base model's outputs come from a run's evaluation)")
    first = loaded[0] if loaded else None
    for other in loaded[1:]:
        if other["prompts"] != first["prompts"]:  # type: ignore[index]
            raise StudyError(f"{other['dir']} was evaluated on other test prompts than {first['dir']}: "  # type: ignore[index]
                             "a study compares outputs on the same prompts")
    systems: dict[str, dict[str, Any]] = {}
    if base:
        if first is None:
            raise StudyError("--base needs a run: the base model's outputs come from the run's evaluation")
        models = {r["model"] for r in loaded}
        if len(models) > 1:
            raise StudyError(f"--base: the runs start from different models ({', '.join(sorted(models))}); "
                             "compare runs of one base model, or leave out --base")
        systems["base"] = {"kind": "base", "model": first["model"], "run": str(first["dir"]), "outputs": first["base"]}
    for r in loaded:
        name = r["dir"].name
        if name in systems:
            raise StudyError(f"two systems are called {name!r}: give the runs different folder names")
        systems[name] = {"kind": "tuned", "method": r["method"], "run": str(r["dir"]), "outputs": r["tuned"]}
    if first is None:
        raise StudyError("an API model alone has nothing to be compared with: name a run too")
    n_all = len(first["prompts"])
    rng = random.Random(seed)
    taken = {it.get("test_index") for e in exclude or [] for it in load_study(e)[1]}
    left = [i for i in range(n_all) if i not in taken]
    if not left:
        raise StudyError(f"every one of the {n_all} test prompts is in the excluded studies: none is left to rate")
    chosen = sorted(rng.sample(left, min(examples, len(left))))
    for run in answering:
        if run.name in systems:
            raise StudyError(f"two systems are called {run.name!r}: give the runs different folder names")
        systems[run.name] = _answers_now(run, first, chosen)
    if api is not None and api.base_url:
        name = f"api:{api.model}"
        conversations = [first["prompts"][i] for i in chosen]
        answers = ApiModel(api).chat_many(conversations, max_tokens=first["max_new_tokens"])
        full = [""] * n_all
        for i, a in zip(chosen, answers):
            full[i] = a
        systems[name] = {"kind": "api", "model": api.model, "base_url": api.base_url, "outputs": full}
    if len(systems) < 2:
        raise StudyError("a study compares at least two systems: add --base, another run, or --api")
    _write(out, first, systems, chosen, criteria, ratings_per_pair, raters, instructions, seed)
    return out


def _write(out: Path, first: dict[str, Any], systems: dict[str, dict[str, Any]], chosen: list[int],
           criteria: list[Criterion], ratings_per_pair: int, raters: list[str] | None, instructions: str | None,
           seed: int) -> None:
    """The study folder: items.jsonl (the drawn prompts and every system's answer), study.json, the pairs' database."""
    n_all = len(first["prompts"])
    items = [{"id": j, "source": first["sources"][i], "test_index": i, "messages": first["prompts"][i],
              "reference": first["references"][i][0], "references": first["references"][i],
              "outputs": {s: v["outputs"][i] for s, v in systems.items()}} for j, i in enumerate(chosen)]
    out.mkdir(parents=True, exist_ok=True)
    (out / store.DB).unlink(missing_ok=True)
    for suffix in ("-wal", "-shm"):
        (out / (store.DB + suffix)).unlink(missing_ok=True)
    atomic_write_jsonl(out / ITEMS, items)
    atomic_write_json(out / STUDY, {
        "name": out.name, "created": store.now(), "task": first["task"], "ratings_per_pair": ratings_per_pair,
        "instructions": DEFAULT_INSTRUCTIONS if instructions is None else instructions,
        "criteria": [{"name": c.name, "question": c.question, "anchors": {str(k): v for k, v in sorted(c.anchors.items())}}
                     for c in criteria],
        "systems": {s: {k: v for k, v in d.items() if k != "outputs"} for s, d in systems.items()},
        "examples": len(items), "test_examples": n_all, "seed": seed})
    with store.connect(out) as con:
        store.add_pairs(con, [it["id"] for it in items], list(systems))
        for r in raters or []:
            store.add_rater(con, r)


def _is_preference_run(run_dir: Path) -> bool:
    from tunesmith.deploy.loading import run_config

    try:
        return run_config(run_dir).task == "preference"
    except Exception:  # noqa: BLE001 - not a run: _run_outputs says why
        return False


def _answers_now(run_dir: Path, first: dict[str, Any], chosen: list[int]) -> dict[str, Any]:
    """A preference run's system: its greedy answers to the drawn prompts of ``first``, made now, as long as
    ``first``'s own answers may be (its eval.max_new_tokens)."""
    from tunesmith import runtime
    from tunesmith.data.formats import Example
    from tunesmith.deploy.loading import load_run
    from tunesmith.generation.generate import generate

    loaded = load_run(run_dir, merge=True)
    asked = [Example(first["prompts"][i] + [{"role": "assistant", "content": ""}]) for i in chosen]
    answers, _ = generate(loaded.model, loaded.tokenizer, asked, first["max_new_tokens"], 8, runtime.INFERENCE_BF16)
    full = [""] * len(first["prompts"])
    for i, a in zip(chosen, answers):
        full[i] = a
    return {"kind": "tuned", "method": loaded.config.method, "run": str(run_dir), "outputs": full,
            "answered": "greedy, when the study was made"}


def _run_outputs(run_dir: Path) -> dict[str, Any]:
    """A finished single-task generation run's test prompts, references and base/tuned outputs."""
    from tunesmith.deploy.loading import run_config
    from tunesmith.runs import RunError

    try:
        cfg = run_config(run_dir)
    except RunError as e:
        raise StudyError(str(e)) from None
    if cfg.tasks:
        raise StudyError(f"{run_dir}: a multi-task run; make the study from single-task runs")
    if cfg.task not in ("instruction", "chat"):
        raise StudyError(f"{run_dir}: task {cfg.task!r}; rating studies compare generated answers "
                         "(task instruction or chat); a classifier's labels are scored by `tunesmith eval`")
    preds = run_dir / "predictions.jsonl"
    test = run_dir / "data" / "test.jsonl"
    if not preds.is_file():
        raise StudyError(f"{run_dir}: no predictions.jsonl; evaluate the run first ({command('eval', run_dir)})")
    if not test.is_file():
        test = run_dir / "data" / "validation.jsonl"  # a run without a test split is tested on validation
    report = json.loads((run_dir / "data" / REPORT).read_text(encoding="utf-8"))
    d = cfg.data
    examples = [to_example(r.values, report["layout"], None, d.system_prompt, r.values.get("_source") or f"{test}:{r.line}")
                for r in read_table(test, "jsonl").rows]
    rows = read_jsonl(preds)
    examples = cap_test(examples, len(rows) if d.max_test_examples else None, d.prepare.split == "ordered")
    if len(rows) != len(examples) or any(row["reference"] != reference(ex) for row, ex in zip(rows, examples)):
        raise StudyError(f"{preds} does not match {test}: the data changed after the evaluation; "
                         f"evaluate again ({command('eval', run_dir)})")
    return {"dir": run_dir, "model": cfg.model, "method": cfg.method, "task": cfg.task,
            "max_new_tokens": cfg.eval.max_new_tokens,
            "prompts": [_prompt(ex.messages) for ex in examples], "references": [references(ex) for ex in examples],
            "sources": [ex.source for ex in examples],
            "base": [str(r.get("base", "")) for r in rows], "tuned": [str(r.get("tuned", "")) for r in rows]}


def _prompt(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The conversation up to (not including) the last assistant turn: what the systems answered."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return [dict(m) for m in messages[:last]]


def load_study(study_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(study.json, items)`` of a study folder. Raises StudyError when it is not one."""
    study_dir = Path(study_dir)
    if not (study_dir / STUDY).is_file():
        raise StudyError(f"{study_dir}: not a study folder (no {STUDY}); make one with `{command('study', 'create')}`")
    return json.loads((study_dir / STUDY).read_text(encoding="utf-8")), read_jsonl(study_dir / ITEMS)


def invite(study_dir: str | Path, names: list[str], kind: str = "human") -> dict[str, str]:
    """Add raters (or return the existing ones' tokens): {name: token}."""
    load_study(study_dir)
    with store.connect(Path(study_dir)) as con:
        return {n.strip(): store.add_rater(con, n, kind) for n in names if n.strip()}
