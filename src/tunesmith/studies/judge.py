"""An LLM judge: the study's pairwise protocol sent to any OpenAI-compatible chat endpoint.

Each pair is judged twice, once in each order, so a judge's preference for the first answer cancels
out (Zheng et al. 2023, "Judging LLM-as-a-Judge with MT-Bench and Chatbot Arena", section 3.4: swap
positions and count inconsistent verdicts as ties). The rubric is the study's own criteria and
anchors. The judge must answer one JSON object; an answer that is not one is recorded as unreadable
(with its text) and never crashes the run or becomes a rating. Replies are cached in the study's
SQLite file under a hash of the endpoint, model and messages: a rerun never pays for a call twice.
Verdicts are stored as ratings of a rater ``judge:<model>`` of kind ``judge``.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from rich.console import Console

from tunesmith.api import ApiError, ApiModel
from tunesmith.config import ApiConfig
from tunesmith.runtime.progress import make_progress
from tunesmith.studies import store
from tunesmith.studies.create import load_study

SYSTEM = ("You are a careful, impartial judge of answers written by AI assistants. You compare two answers "
          "to the same request. Judge only the quality of the answers; ignore their order and their length "
          "unless length matters to the request. Reply with one JSON object and nothing else.")


def rubric(study: dict[str, Any]) -> str:
    """The criteria, their questions and anchors, as the judge reads them."""
    lines = []
    for c in study["criteria"]:
        anchors = ", ".join(f"{p} = {w}" for p, w in sorted(c.get("anchors", {}).items()))
        lines.append(f"- {c['name']}: {c.get('question') or ''} (1-5: {anchors})")
    return "\n".join(lines)


def messages(study: dict[str, Any], item: dict[str, Any], first: str, second: str) -> list[dict[str, str]]:
    """The chat messages asking the judge about ``item`` with answer A = ``first`` (a system's output
    text) and answer B = ``second``."""
    request = "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in item["messages"])
    names = [c["name"] for c in study["criteria"]]
    # placeholders, not a valid example: a model that only copies the shape gives an unreadable
    # answer instead of a verdict that looks real
    scores = ", ".join(f'"{n}": <1-5>' for n in names)
    shape = f'{{"A": {{{scores}}}, "B": {{{scores}}}, "preference": "<A, B or tie>"}}'
    user = (f"Score each answer from 1 to 5 on these criteria:\n{rubric(study)}\n\n"
            f"Then say which answer you prefer overall: \"A\", \"B\" or \"tie\".\n\n"
            f"=== Request ===\n{request}\n\n=== Answer A ===\n{first}\n\n=== Answer B ===\n{second}\n\n"
            f"Reply with JSON only, shaped like {shape}")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def parse(reply: str, criteria: list[str]) -> tuple[dict[str, dict[str, int]], str]:
    """``({"A": {criterion: score}, "B": {...}}, "A"|"B"|"tie")`` from a judge's reply. The first
    JSON object in the text counts (code fences and words around it are allowed). Raises ValueError
    saying what is wrong: no JSON object, a missing or out-of-range score, no valid preference."""
    start = reply.find("{")
    if start < 0:
        raise ValueError("no JSON object in the reply")
    try:
        obj, _ = json.JSONDecoder().raw_decode(reply[start:])
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON: {e.msg}") from None
    if not isinstance(obj, dict):
        raise ValueError("the JSON is not an object")
    scores: dict[str, dict[str, int]] = {}
    for side in ("A", "B"):
        block = obj.get(side) or obj.get(side.lower()) or (obj.get("scores") or {}).get(side)
        if not isinstance(block, dict):
            raise ValueError(f"no scores for answer {side}")
        scores[side] = {}
        for c in criteria:
            v = block.get(c)
            if isinstance(v, str) and re.fullmatch(r"\s*[1-5]\s*", v):
                v = int(v)
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 5:
                raise ValueError(f"{side}.{c}: expected a score from 1 to 5, got {v!r}")
            scores[side][c] = v
    pref = str(obj.get("preference", "")).strip().strip('"').lower()
    if pref not in ("a", "b", "tie"):
        raise ValueError(f"preference: expected A, B or tie, got {obj.get('preference')!r}")
    return scores, {"a": "A", "b": "B", "tie": "tie"}[pref]


def cache_key(cfg: ApiConfig, msgs: list[dict[str, str]], max_tokens: int) -> str:
    """What decides a reply: the endpoint, the model, the messages and the length allowed."""
    return hashlib.sha256(json.dumps([cfg.base_url, cfg.model, msgs, max_tokens], sort_keys=True).encode()).hexdigest()


def judge_study(study_dir: str | Path, cfg: ApiConfig, console: Console | None = None,
                max_tokens: int = 400) -> dict[str, int]:
    """Judge every pair of the study in both orders with the model ``cfg`` names; returns counts:
    ``asked`` (new answers received), ``cached`` (answers reused), ``judged`` (readable verdicts),
    ``unreadable``, ``failed`` (requests that got no answer: not cached, a rerun asks again).

    A refusal that asking again cannot fix (HTTP 4xx other than 429: a wrong model name, a bad key)
    stops the run at once. Raises ApiError when the endpoint answered nothing at all (the message
    has the first error), StudyError when the folder is not a study. The judge becomes a rater of
    the study only once it has answered.
    """
    study_dir = Path(study_dir)
    study, items = load_study(study_dir)
    by_id = {it["id"]: it for it in items}
    criteria = [c["name"] for c in study["criteria"]]
    model = ApiModel(cfg)
    name = f"judge:{cfg.model or 'model'}"
    counts = {"asked": 0, "cached": 0, "judged": 0, "unreadable": 0, "failed": 0}
    jobs, replies, todo = _jobs(study_dir, study, by_id, cfg, max_tokens)
    counts["cached"] = len(replies)
    errors: list[str] = []
    stop = threading.Event()

    def ask(job: tuple[Any, ...]) -> None:
        if stop.is_set():
            errors.append("not asked (stopped after an earlier refusal)")
            return
        try:
            reply = model.chat(job[3], max_tokens)
        except ApiError as e:
            errors.append(str(e))
            status = re.search(r"HTTP (\d{3})", str(e))
            if status and status.group(1).startswith("4") and status.group(1) != "429":
                stop.set()  # asking the other pairs would get the same refusal
            return
        replies[job[4]] = reply
        if reply.strip():  # an empty reply (e.g. the length ran out while the model was thinking) is asked again
            with store.connect(study_dir) as c:
                store.cache_reply(c, job[4], reply)
        progress.advance(task)

    console = console or Console()
    with make_progress(console, extra=None) as progress:
        task = progress.add_task("judging", total=len(todo))
        with ThreadPoolExecutor(max_workers=max(1, cfg.max_concurrency)) as pool:
            list(pool.map(ask, todo))
    counts["asked"] = len(todo) - len(errors)
    counts["failed"] = len(errors)
    if not replies:
        raise ApiError(f"the judge answered none of {len(jobs)} requests: {errors[0] if errors else 'nothing to judge'}")
    with store.connect(study_dir) as con:
        store.add_rater(con, name, kind="judge")
        rater = next(r["id"] for r in store.raters(con) if r["name"] == name)
        for p, left, right, _msgs, key in jobs:
            reply = replies.get(key)
            if reply is None:
                continue
            try:
                scores, pref = parse(reply, criteria)
            except ValueError as e:
                store.save_judge_failure(con, rater, p["id"], left, reply, str(e))
                counts["unreadable"] += 1
                continue
            winner = {"A": left, "B": right, "tie": "tie"}[pref]
            store.save_judgement(con, rater, p["id"], left, right, {left: scores["A"], right: scores["B"]}, winner)
            counts["judged"] += 1
    if errors:
        console.print(f"[yellow]{len(errors)} judge request(s) got no answer (not cached; run again to retry): {errors[0]}[/yellow]",
                      highlight=False)
    return counts


def _jobs(study_dir: Path, study: dict[str, Any], by_id: dict[Any, dict[str, Any]], cfg: ApiConfig,
          max_tokens: int) -> tuple[list[tuple[Any, ...]], dict[str, str], list[tuple[Any, ...]]]:
    """Every (pair, left, right, messages, cache key) in both orders, the replies already cached
    (key -> reply), and the jobs still to ask."""
    jobs: list[tuple[Any, ...]] = []
    replies: dict[str, str] = {}
    todo: list[tuple[Any, ...]] = []
    with store.connect(study_dir) as con:
        for p in store.pairs(con):
            item = by_id[p["item"]]
            for left, right in ((p["a"], p["b"]), (p["b"], p["a"])):
                msgs = messages(study, item, item["outputs"][left], item["outputs"][right])
                jobs.append((p, left, right, msgs, cache_key(cfg, msgs, max_tokens)))
        for job in jobs:
            hit = store.cached_reply(con, job[4])
            if hit is None:
                todo.append(job)
            else:
                replies[job[4]] = hit
    return jobs, replies, todo
