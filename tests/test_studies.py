"""Rating studies: creation from real runs, assignment and storage, the raters' web app, the LLM judge
against a local fake endpoint, the statistics against references, the report and the preference export."""

import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from fastapi import FastAPI, Request

from tunesmith.cli import main
from tunesmith.config import ApiConfig
from tunesmith.io import atomic_write_json, atomic_write_jsonl, read_jsonl
from tunesmith.studies import StudyError, create_study, criteria_from, invite, store
from tunesmith.studies import stats as S
from tunesmith.studies.analysis import analyze
from tunesmith.studies.export import preference_rows
from tunesmith.studies.judge import judge_study, parse
from tunesmith.studies.report import write_study_report
from tunesmith.studies.web import create_study_app

from test_serve import running

CRITERIA = ["relevance", "quality"]


def fake_study(root: Path, systems=("base", "tuned"), n=6, k=2, outputs=None) -> Path:
    """A study folder written directly (no runs): item i's output of system s is ``f"{s} answer {i}"``."""
    root.mkdir(parents=True, exist_ok=True)
    items = [{"id": i, "messages": [{"role": "user", "content": f"question {i}"}], "reference": f"tuned answer {i}",
              "references": [f"tuned answer {i}"],
              "outputs": {s: (outputs or {}).get((i, s), f"{s} answer {i}") for s in systems}} for i in range(n)]
    atomic_write_jsonl(root / "items.jsonl", items)
    atomic_write_json(root / "study.json", {"name": root.name, "ratings_per_pair": k, "systems": {s: {} for s in systems},
                                            "criteria": [{"name": c, "question": "", "anchors": {"1": "bad", "5": "great"}}
                                                         for c in CRITERIA]})
    with store.connect(root) as con:
        store.add_pairs(con, list(range(n)), list(systems))
    return root


def rate_all(study: Path, raters: list[str], choose) -> list[tuple]:
    """Every rater rates until nothing is left; ``choose(rater, item, left, right)`` gives
    (left scores, right scores, preference). Returns what was submitted."""
    made = []
    k = json.loads((study / "study.json").read_text())["ratings_per_pair"]
    with store.connect(study) as con:
        ids = {n: con.execute("SELECT id FROM raters WHERE name = ?", (n,)).fetchone()[0] for n in raters}
        active = list(raters)
        while active:
            for n in list(active):
                a = store.next_assignment(con, ids[n], k)
                if a is None:
                    active.remove(n)
                    continue
                left, right, pref = choose(n, a.item, a.left, a.right)
                store.save_rating(con, ids[n], a.id, {"left": left, "right": right}, pref, "", CRITERIA)
                made.append((n, a.item, a.left, a.right, pref))
    return made


# ---------------------------------------------------------------- statistics against references

def test_krippendorff_alpha_matches_the_published_example():
    # Krippendorff (2011), "Computing Krippendorff's alpha-reliability": 3 coders, 15 units, gaps
    text = ("*    *    *    *    *    3    4    1    2    1    1    3    3    *    3",
            "1    *    2    1    3    3    4    3    *    *    *    *    *    *    *",
            "*    *    2    1    3    4    4    *    2    1    1    3    3    *    4")
    table = [[np.nan if v == "*" else float(v) for v in row.split()] for row in text]
    assert S.krippendorff_alpha(table, "nominal") == pytest.approx(0.691, abs=5e-4)
    assert S.krippendorff_alpha(table, "interval") == pytest.approx(0.811, abs=5e-4)
    assert S.krippendorff_alpha([[1, 2, 3]], "ordinal") is None  # one rater: undefined
    assert S.krippendorff_alpha([[3, 3], [3, 3]], "ordinal") is None  # no variation: undefined


def test_bradley_terry_recovers_strengths_from_exact_counts():
    # strengths 1, 2, 4 and 30 games per pair: the expected wins 30 p_i / (p_i + p_j) are integers
    p = {"x": 1.0, "y": 2.0, "z": 4.0}
    wins = {(i, j): 30 * p[i] / (p[i] + p[j]) for i in p for j in p if i != j}
    fit = S.bradley_terry(wins)
    geo = 2.0  # (1 * 2 * 4) ** (1/3)
    for s in p:
        assert fit[s] == pytest.approx(p[s] / geo, rel=1e-6)
    # two systems: the ratio of strengths is the ratio of wins; ties count half to each side
    two = S.bradley_terry({("a", "b"): 6 + 1, ("b", "a"): 2 + 1})
    assert two["a"] / two["b"] == pytest.approx(7 / 3)


def test_win_rate_sign_test_and_interval():
    outcomes = [1.0] * 8 + [0.0] * 2 + [0.5] * 2  # 8 wins, 2 losses, 2 ties
    w = S.win_rate(outcomes, list(range(12)), resamples=2000)
    assert (w["wins"], w["losses"], w["ties"], w["n"]) == (8, 2, 2, 12)
    assert w["rate"] == pytest.approx(9 / 12)
    assert w["p_sign"] == pytest.approx(2 * (1 + 10 + 45) / 1024)  # exact two-sided binomial, ties dropped
    assert w["low"] < w["rate"] < w["high"] and 0 <= w["low"] and w["high"] <= 1
    # three raters per prompt: the sign test counts prompts (their majority), not ratings
    clustered = S.win_rate([1.0, 1.0, 0.0] * 4 + [0.0, 0.0, 1.0], [i // 3 for i in range(15)], resamples=200)
    assert (clustered["wins"], clustered["losses"]) == (9, 6)
    assert (clustered["prompts_won"], clustered["prompts_lost"]) == (4, 1)
    assert clustered["p_sign"] == pytest.approx(2 * (1 + 5) / 32)
    # all ratings of one item move together: one item -> no spread at all
    same = S.win_rate([1.0, 0.0], [7, 7], resamples=200)
    assert same["low"] == same["high"] == 0.5


def test_cohen_kappa_by_hand_and_majority():
    # agreement 3/4; chance = 0.5*0.25 + 0.5*0.75 = 0.5 -> kappa 0.5
    k = S.cohen_kappa(["x", "x", "y", "y"], ["x", "y", "y", "y"], resamples=200)
    assert k["kappa"] == pytest.approx(0.5) and k["agreement"] == 0.75 and k["n"] == 4
    assert S.majority(["a", "a", "b"]) == "a"
    assert S.majority(["a", "b"]) is None and S.majority([]) is None  # a split vote is no majority
    assert S.majority(["tie", "tie", "a"]) == "tie"  # the raters said: equal
    pb = S.position_bias([True] * 9 + [False])
    assert pb["rate"] == 0.9 and pb["p"] == pytest.approx(2 * 11 / 1024)


# ---------------------------------------------------------------- assignment and storage

def test_every_pair_gets_k_ratings_balanced_over_positions(tmp_path):
    study = fake_study(tmp_path / "s", systems=("base", "run-a", "run-b"), n=8, k=2)
    invite(study, ["ann", "bob", "cy"])
    made = rate_all(study, ["ann", "bob", "cy"], lambda n, item, l, r: ({c: 4 for c in CRITERIA}, {c: 2 for c in CRITERIA}, "left"))
    with store.connect(study) as con:
        rows = store.all_ratings(con)
        n_pairs = len(store.pairs(con))
    assert n_pairs == 8 * 3
    per_pair = Counter(r["pair"] for r in rows)
    assert set(per_pair.values()) == {2} and len(per_pair) == n_pairs  # exactly K each
    assert len({(r["rater"], r["pair"]) for r in rows}) == len(rows)  # nobody rates a pair twice
    for pid in per_pair:  # K = 2: each system of a pair was on the left once
        assert sorted(r["left"] for r in rows if r["pair"] == pid) == sorted({r["a"] for r in rows if r["pair"] == pid} | {r["b"] for r in rows if r["pair"] == pid})
    shown_left = Counter(r["left"] for r in rows)
    assert max(shown_left.values()) - min(shown_left.values()) <= 1
    load = Counter(n for n, *_ in made)
    assert min(load.values()) >= 0.8 * len(rows) / 3  # the work is shared (near the end a rater may have seen every open pair)
    # what was stored is what was submitted, mapped to systems
    for r in rows:
        assert r["preference"] == r["left"] and r["scores"][r["left"]] == {c: 4 for c in CRITERIA}


def test_refusals_and_a_reload_gets_the_same_pair(tmp_path):
    study = fake_study(tmp_path / "s", n=3, k=1)
    invite(study, ["ann", "bob"])
    good = {c: 3 for c in CRITERIA}
    with store.connect(study) as con:
        ann, bob = (r["id"] for r in store.raters(con))
        a = store.next_assignment(con, ann, 1)
        assert store.next_assignment(con, ann, 1) == a  # a reload shows the same pair
        b = store.next_assignment(con, bob, 1)
        assert b.pair != a.pair  # the pair ann holds is not handed out again while K = 1
        with pytest.raises(store.RatingRefused) as e:
            store.save_rating(con, bob, a.id, {"left": good, "right": good}, "tie", "", CRITERIA)
        assert e.value.status == 403
        with pytest.raises(store.RatingRefused) as e:
            store.save_rating(con, ann, a.id, {"left": good, "right": {"relevance": 6}}, "maybe", "", CRITERIA)
        assert e.value.status == 400 and "Answer B, relevance" in str(e.value) and "Answer B, quality" in str(e.value) \
            and "prefer" in str(e.value)
        store.save_rating(con, ann, a.id, {"left": good, "right": good}, "right", " fine ", CRITERIA)
        with pytest.raises(store.RatingRefused) as e:
            store.save_rating(con, ann, a.id, {"left": good, "right": good}, "left", "", CRITERIA)
        assert e.value.status == 409
        [row] = store.all_ratings(con)
        assert row["preference"] == a.right and row["comment"] == "fine"


def test_two_raters_at_once_never_lose_or_duplicate(tmp_path):
    study = fake_study(tmp_path / "s", systems=("a", "b", "c"), n=10, k=2)
    names = [f"r{i}" for i in range(4)]
    invite(study, names)
    errors = []

    def work(name):
        try:
            rate_all(study, [name], lambda *_: ({c: 5 for c in CRITERIA}, {c: 1 for c in CRITERIA}, "tie"))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with store.connect(study) as con:
        rows = store.all_ratings(con)
    assert Counter(Counter(r["pair"] for r in rows).values()) == {2: 30}


# ---------------------------------------------------------------- analysis, report, export

def scripted(study: Path, tuned_wins: float = 1.0):
    """ann and bob prefer ``tuned`` on most items (ties on item 0), cy prefers the left answer."""
    def choose(n, item, left, right):
        hi, lo = {c: 5 for c in CRITERIA}, {c: 2 for c in CRITERIA}
        if n == "cy":
            return hi, lo, "left"
        if item == 0:
            return hi, hi, "tie"
        tuned_left = left == "tuned"
        return (hi, lo, "left") if tuned_left else (lo, hi, "right")
    return rate_all(study, ["ann", "bob", "cy"], choose)


def test_analysis_report_and_export(tmp_path):
    study = fake_study(tmp_path / "s", n=8, k=3)
    invite(study, ["ann", "bob", "cy"])
    scripted(study)
    with store.connect(study) as con:
        rows = store.all_ratings(con)
    doc = analyze(study, resamples=200)
    [w] = doc["pairwise"]
    assert (w["a"], w["b"]) == ("base", "tuned")
    expected = Counter()
    for r in rows:
        expected["wins" if r["preference"] == "base" else "losses" if r["preference"] == "tuned" else "ties"] += 1
    assert (w["wins"], w["losses"], w["ties"]) == (expected["wins"], expected["losses"], expected["ties"])
    assert doc["scores"]["tuned"]["quality"]["mean"] > doc["scores"]["base"]["quality"]["mean"]
    assert doc["pairs_complete"] == 8 and doc["human_ratings"] == 24
    # cy always picks the left answer: the left wins more than half of the decisive preferences
    decisive = [r for r in rows if r["preference"] != "tie"]
    assert doc["position_bias"]["left_wins"] == sum(r["preference"] == r["left"] for r in decisive)
    # the reference is the tuned output: every metric picks tuned, as the majority does on items 1..7
    assert doc["metrics"]["rougeL"]["vs_majority"]["agreement"] == pytest.approx(7 / 8)
    assert doc["agreement"]["preference"] is not None
    path, _ = write_study_report(study)
    page = path.read_text()
    for heading in ("Who won", "Mean scores", "Did the raters agree?", "Position bias", "automatic metrics"):
        assert heading in page
    assert "data:image/png;base64," in page and json.loads((study / "report.json").read_text())["items"] == 8
    prefs = preference_rows(study)
    assert len(prefs) == 7  # item 0 is a tie by majority
    assert all(p["chosen_system"] == "tuned" and p["chosen"][0]["content"].startswith("tuned answer") for p in prefs)
    assert prefs[0]["prompt"] == [{"role": "user", "content": f"question {prefs[0]['item']}"}]
    assert prefs[0]["votes"] == {"chosen": 2, "rejected": 1, "tie": 0} or prefs[0]["votes"]["chosen"] >= 2


def test_unrated_pairs_and_split_votes_are_not_a_majority(tmp_path):
    study = fake_study(tmp_path / "s", n=6, k=2)
    invite(study, ["ann", "bob"])
    with store.connect(study) as con:
        ann, bob = (r["id"] for r in store.raters(con))
        for i in range(3):  # ann rates 3 pairs, bob 2 of the same: one agreeing, one split
            a = store.next_assignment(con, ann, 2)
            store.save_rating(con, ann, a.id, {"left": {c: 4 for c in CRITERIA}, "right": {c: 2 for c in CRITERIA}},
                              "left" if a.left == "tuned" else "right", "", CRITERIA)
        rated = [r["pair"] for r in store.all_ratings(con)]
        for pid, agree in zip(rated[:2], (True, False)):
            s_id = con.execute("INSERT INTO assignments (rater, pair, left, created) VALUES (?, ?, 'base', ?)",
                               (bob, pid, store.now())).lastrowid
            store.save_rating(con, bob, s_id, {"left": {c: 2 for c in CRITERIA}, "right": {c: 4 for c in CRITERIA}},
                              "right" if agree else "left", "", CRITERIA)
    doc = analyze(study, resamples=100)
    assert doc["pairs_with_majority"] == 2  # 3 rated pairs, one of them split 1-1; 3 pairs unrated
    assert all(m["vs_majority"]["n"] == 2 for m in doc["metrics"].values())
    path, _ = write_study_report(study)
    json.loads((study / "report.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in report.json"))
    with pytest.raises(StudyError, match="no judge verdicts"):
        preference_rows(study, source="judge")
    from tunesmith.studies.export import default_path

    assert default_path(study, "judge") != default_path(study, "human")


def test_criteria_and_rubric_errors(tmp_path):
    assert [c.name for c in criteria_from("relevance, quality")] == ["relevance", "quality"]
    rubric = tmp_path / "rubric.yaml"
    rubric.write_text(yaml.safe_dump({"criteria": {"tone": {"question": "Polite?", "anchors": {1: "rude", 5: "warm"}},
                                                   "facts": {"anchors": {7: "x"}, "extra": 1}}}))
    with pytest.raises(StudyError) as e:
        criteria_from(None, rubric)
    assert "facts" in str(e.value) and str(rubric) in str(e.value)
    rubric.write_text(yaml.safe_dump({"criteria": {"tone": {"question": "Polite?", "anchors": {1: "rude", 5: "warm"}}}}))
    [tone] = criteria_from(None, rubric)
    assert tone.anchors[1] == "rude" and tone.anchors[3] == "acceptable"
    with pytest.raises(StudyError):
        criteria_from("bad name!")
    with pytest.raises(StudyError, match="given twice"):
        criteria_from("tone,Tone")
    for bad, why in [({"t": {"anchors": ["rude", "ok"]}}, "mapping of points"), ({"t": "polite please"}, "expected a mapping"),
                     ({"t": {"anchors": {5: None}}}, "a few words"), ({"my tone!": {}}, "not a name")]:
        rubric.write_text(yaml.safe_dump({"criteria": bad}))
        with pytest.raises(StudyError, match=why):
            criteria_from(None, rubric)


# ---------------------------------------------------------------- from real runs

def test_create_from_runs_uses_their_predictions(gen_runs, tmp_path, capsys):
    out = tmp_path / "st"
    assert main(["study", "create", str(gen_runs["one"]), str(gen_runs["two"]), "--base", "--examples", "5",
                 "--criteria", "relevance,quality", "--raters", "ann,bob", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ann: http://127.0.0.1:8080/r/" in printed
    study = json.loads((out / "study.json").read_text())
    assert list(study["systems"]) == ["base", "one", "two"] and study["examples"] == 5
    items = read_jsonl(out / "items.jsonl")
    preds = {n: read_jsonl(d / "predictions.jsonl") for n, d in gen_runs.items()}
    for it in items:
        i = it["test_index"]
        assert it["outputs"]["one"] == preds["one"][i]["tuned"] and it["outputs"]["two"] == preds["two"][i]["tuned"]
        assert it["outputs"]["base"] == preds["one"][i]["base"]
        assert it["reference"] == preds["one"][i]["reference"] and it["messages"][-1]["role"] == "user"
    with store.connect(out) as con:
        assert len(store.pairs(con)) == 5 * 3
    # again without --overwrite: refused, nothing lost
    assert main(["study", "create", str(gen_runs["one"]), "--base", "--out", str(out)]) == 2
    assert "already holds a study" in capsys.readouterr().err
    with pytest.raises(StudyError, match="at least two systems"):
        create_study([gen_runs["one"]], tmp_path / "solo")
    with pytest.raises(StudyError, match="not a run folder"):
        create_study([tmp_path], tmp_path / "x", base=True)
    other = tmp_path / "other-run"
    import shutil

    shutil.copytree(gen_runs["two"], other)
    rows = read_jsonl(other / "predictions.jsonl")
    atomic_write_jsonl(other / "predictions.jsonl", rows[:-1])
    with pytest.raises(StudyError, match="does not match"):
        create_study([other], tmp_path / "y", base=True)


# ---------------------------------------------------------------- the web app

@contextlib.contextmanager
def served(app):
    """``app`` on 127.0.0.1 (a free port) in a background thread: its base URL."""
    with running(app) as server:
        yield server.url


def form_for(page: str, left: int, right: int, pref: str) -> dict[str, str]:
    import re

    assignment = re.search(r"name='assignment' value='(\d+)'", page).group(1)
    return {"assignment": assignment, "preference": pref, "comment": "",
            **{f"left.{c}": str(left) for c in CRITERIA}, **{f"right.{c}": str(right) for c in CRITERIA}}


def test_web_app_tokens_refusals_and_saving(tmp_path):
    study = fake_study(tmp_path / "s", n=2, k=1)
    tokens = invite(study, ["ann", "bob"])
    with served(create_study_app(study)) as url:
        assert requests.get(url + "/r/not-a-token").status_code == 403
        assert requests.get(url + "/").status_code == 403
        assert requests.post(url + "/r/wrong", data={"assignment": "1"}).status_code == 403
        page = requests.get(url + f"/r/{tokens['ann']}").text
        shown = page.replace("base answer", "").replace("tuned answer", "")  # the outputs themselves
        assert "Answer A" in page and "Answer B" in page and "base" not in shown and "tuned" not in shown  # blind
        form = form_for(page, 4, 2, "left")
        # bob tries ann's pair: refused, and nothing is saved
        r = requests.post(url + f"/r/{tokens['bob']}", data=form)
        assert r.status_code == 403 and "not assigned to you" in r.text
        bad = dict(form, **{"left.quality": "9"})
        assert requests.post(url + f"/r/{tokens['ann']}", data=bad).status_code == 400
        r = requests.post(url + f"/r/{tokens['ann']}", data=form, allow_redirects=False)
        assert r.status_code == 303
        assert requests.post(url + f"/r/{tokens['ann']}", data=form).status_code == 200  # a resend: saved once
        with store.connect(study) as con:
            [row] = store.all_ratings(con)
        assert row["rater_name"] == "ann" and row["preference"] == row["left"]
        assert row["scores"][row["left"]] == {c: 4 for c in CRITERIA} and row["scores"][row["right"]] == {c: 2 for c in CRITERIA}
        # the rater changes that answer: the form comes back filled in, the change replaces the rating
        page = requests.get(url + f"/r/{tokens['ann']}").text
        assert "Change your previous answer" in page and "How to rate" not in page  # fake_study has no instructions
        again = requests.get(url + f"/r/{tokens['ann']}?revise={form['assignment']}").text
        assert "changing your answer 1 of 1" in again and again.count(" checked") == 2 * len(CRITERIA) + 1
        assert requests.get(url + f"/r/{tokens['bob']}?revise={form['assignment']}").status_code == 403
        changed = dict(form_for(again, 1, 5, "right"), revise="1", comment="on second thought")
        assert requests.post(url + f"/r/{tokens['ann']}", data=changed).status_code == 200
        with store.connect(study) as con:
            [row] = store.all_ratings(con)
        assert row["preference"] == row["right"] and row["scores"][row["right"]] == {c: 5 for c in CRITERIA}
        assert row["comment"] == "on second thought"


def test_killed_server_loses_no_submitted_rating(tmp_path):
    study = fake_study(tmp_path / "s", n=3, k=1)
    tokens = invite(study, ["ann"])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith", "study", "serve", str(study), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/r/{tokens['ann']}"
        deadline = time.time() + 60
        while True:
            try:
                page = requests.get(url, timeout=2).text
                break
            except requests.ConnectionError:
                assert time.time() < deadline and proc.poll() is None, proc.stdout.read().decode() if proc.poll() is not None else "no start"
                time.sleep(0.2)
        for _ in range(2):
            form = form_for(page, 3, 5, "right")
            page = requests.post(url, data=form).text
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    with store.connect(study) as con:
        rows = store.all_ratings(con)
    assert len(rows) == 2 and all(r["preference"] == r["right"] for r in rows)


# ---------------------------------------------------------------- the LLM judge

@contextlib.contextmanager
def fake_judge(reply_for):
    """An OpenAI-compatible chat endpoint whose reply is ``reply_for(user_text)``; counts requests."""
    app = FastAPI()
    seen = []

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        text = body["messages"][-1]["content"]
        seen.append(text)
        return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": reply_for(text)}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    with served(app) as url:
        yield url + "/v1", seen


def answers(text: str) -> tuple[str, str]:
    a = text.split("=== Answer A ===\n")[1].split("\n\n=== Answer B ===")[0]
    b = text.split("=== Answer B ===\n")[1].split("\n\nReply with JSON")[0]
    return a, b


def test_judge_both_orders_cache_and_unreadable_answers(tmp_path):
    study = fake_study(tmp_path / "s", n=6, k=1)

    def reply(text):
        a, b = answers(text)
        if a == "base answer 5":  # item 5: unreadable in one order
            return "I think A is better."
        if "answer 4" in a:  # item 4: always picks the first answer (position-inconsistent)
            return '```json\n{"A": {"relevance": 4, "quality": 4}, "B": {"relevance": 2, "quality": 2}, "preference": "A"}\n```'
        pick = "A" if a.startswith("tuned") else "B"
        hi, lo = {c: 5 for c in CRITERIA}, {c: 1 for c in CRITERIA}
        return json.dumps({"A": hi if pick == "A" else lo, "B": lo if pick == "A" else hi, "preference": pick})

    with fake_judge(reply) as (url, seen):
        cfg = ApiConfig(base_url=url, model="fake-judge", max_concurrency=2)
        counts = judge_study(study, cfg)
        assert len(seen) == 12  # 6 pairs, both orders
        firsts = Counter(answers(t)[0].split()[0] for t in seen)
        assert firsts == {"base": 6, "tuned": 6}
        assert counts == {"asked": 12, "cached": 0, "judged": 11, "unreadable": 1, "failed": 0}
        again = judge_study(study, cfg)
        assert len(seen) == 12 and again["cached"] == 12 and again["asked"] == 0  # never paid twice
    invite(study, ["ann"])
    rate_all(study, ["ann"], lambda n, item, l, r: ({c: 5 for c in CRITERIA}, {c: 1 for c in CRITERIA},
                                                       "left" if l == "tuned" else "right"))
    doc = analyze(study, resamples=200)
    d = doc["judges_detail"]["judge:fake-judge"]
    assert d["unreadable"] == 1 and d["inconsistent_orders"] == 1 and d["pairs"] == 6
    # the judge matches ann on items 0-3 and 5 (one readable order), not on item 4 (a tie)
    assert d["vs_majority"]["agreement"] == pytest.approx(5 / 6)
    assert doc["human_ratings"] == 6 and doc["judges"] == ["judge:fake-judge"]  # the judge is not a human rater
    assert doc["pairwise"][0]["losses"] == 6  # people's results never include the judge


def test_judge_reply_parsing():
    ok = parse('Sure: {"A": {"q": "4"}, "B": {"q": 2.0}, "preference": "b"} done', ["q"])
    assert ok == ({"A": {"q": 4}, "B": {"q": 2}}, "B")
    for bad, why in [("no json", "no JSON"), ('{"A": {"q": 4}}', "answer B"), ('{"A": {"q": 9}, "B": {"q": 1}, "preference": "A"}', "1 to 5"),
                     ('{"A": {"q": 3}, "B": {"q": 1}, "preference": "C"}', "preference"), ("{broken", "not valid JSON")]:
        with pytest.raises(ValueError, match=why):
            parse(bad, ["q"])


def test_a_later_unreadable_judge_answer_replaces_its_verdict(tmp_path):
    study = fake_study(tmp_path / "s", n=1, k=1)
    with store.connect(study) as con:
        store.add_rater(con, "judge:m", kind="judge")
        judge = store.raters(con, "judge")[0]["id"]
        store.save_judgement(con, judge, 1, "base", "tuned", {"base": {"q": 4}, "tuned": {"q": 2}}, "base")
        assert len(store.all_ratings(con)) == 1
        store.save_judge_failure(con, judge, 1, "base", "not json", "no JSON object in the reply")
        assert store.all_ratings(con) == []  # the latest answer counts
        store.save_judgement(con, judge, 1, "base", "tuned", {"base": {"q": 4}, "tuned": {"q": 2}}, "base")
        assert con.execute("SELECT COUNT(*) FROM judge_failures").fetchone()[0] == 0


def test_create_with_an_api_model_asks_it_once(gen_runs, tmp_path):
    with fake_judge(lambda text: f"api answer to: {text[:20]}") as (url, seen):
        study = create_study([gen_runs["one"]], tmp_path / "st", api=ApiConfig(base_url=url, model="remote-x"),
                             examples=3, criteria=criteria_from("quality"))
        assert len(seen) == 3  # one request per chosen prompt, not per test example
    items = read_jsonl(study / "items.jsonl")
    assert json.loads((study / "study.json").read_text())["systems"]["api:remote-x"]["kind"] == "api"
    for it in items:
        assert it["outputs"]["api:remote-x"] == f"api answer to: {it['messages'][-1]['content'][:20]}"
    with store.connect(study) as con:
        assert {(p["a"], p["b"]) for p in store.pairs(con)} == {("api:remote-x", "one")}


def test_three_systems_get_bradley_terry_strengths_in_the_raters_order(tmp_path):
    study = fake_study(tmp_path / "s", systems=("a", "b", "c"), n=6, k=2)
    invite(study, ["ann", "bob"])
    rank = {"a": 0, "b": 1, "c": 2}

    def choose(n, item, left, right):  # c over b over a, except bob prefers a over b on item 0
        better_left = rank[left] > rank[right]
        if n == "bob" and item == 0 and {left, right} == {"a", "b"}:
            better_left = not better_left
        return {c: 3 for c in CRITERIA}, {c: 3 for c in CRITERIA}, "left" if better_left else "right"

    rate_all(study, ["ann", "bob"], choose)
    doc = analyze(study, resamples=100)
    assert [(w["a"], w["b"]) for w in doc["pairwise"]] == [("a", "b"), ("a", "c"), ("b", "c")]
    ab = doc["pairwise"][0]
    assert (ab["wins"], ab["losses"]) == (1, 11)
    bt = doc["bradley_terry"]
    assert list(bt) == ["c", "b", "a"]  # strongest first
    assert bt["c"]["unbeaten"] and not bt["b"]["unbeaten"]
    assert 1e3 > bt["c"]["strength"] > bt["b"]["strength"] > bt["a"]["strength"] > 0  # finite: the weak prior
    # the prior is the fit of the counts plus half a win each way
    from tunesmith.studies.analysis import PRIOR_WINS

    counts = {("c", "a"): 12, ("c", "b"): 12, ("b", "a"): 11, ("a", "b"): 1}
    expected = S.bradley_terry({(i, j): counts.get((i, j), 0) + PRIOR_WINS for i in "abc" for j in "abc" if i != j})
    assert all(bt[x]["strength"] == pytest.approx(expected[x], rel=1e-6) for x in "abc")
    assert "never lost" in write_study_report(study)[0].read_text()


def test_a_judge_refused_at_once_stops_and_leaves_no_judge_behind(tmp_path):
    study = fake_study(tmp_path / "s", n=4, k=1)
    app = FastAPI()
    calls = []

    @app.post("/v1/chat/completions")
    async def refuse(request: Request):
        from fastapi.responses import JSONResponse

        calls.append(1)
        return JSONResponse({"error": {"message": "The model 'typo' does not exist"}}, status_code=404)

    from tunesmith.api import ApiError

    with served(app) as url:
        with pytest.raises(ApiError, match="404"):
            judge_study(study, ApiConfig(base_url=url + "/v1", model="typo", max_concurrency=1, max_retries=0))
    assert len(calls) == 1  # the other 7 requests were not sent
    with store.connect(study) as con:
        assert store.raters(con, "judge") == []


def test_a_stale_assignment_never_makes_a_pair_exceed_k(tmp_path):
    study = fake_study(tmp_path / "s", n=2, k=1)
    invite(study, ["ann", "bob"])
    good = {c: 3 for c in CRITERIA}
    with store.connect(study) as con:
        ann, bob = (r["id"] for r in store.raters(con))
        a = store.next_assignment(con, ann, 1)
        con.execute("UPDATE assignments SET created = '2000-01-01T00:00:00+00:00' WHERE id = ?", (a.id,))  # ann went away
        b = store.next_assignment(con, bob, 1)
        assert b.pair == a.pair  # ann's hold expired: bob may take the pair
        store.save_rating(con, bob, b.id, {"left": good, "right": good}, "tie", "", CRITERIA, k=1)
        with pytest.raises(store.RatingRefused) as e:  # ann comes back and sends her old form
            store.save_rating(con, ann, a.id, {"left": good, "right": good}, "left", "", CRITERIA, revise=True, k=1)
        assert e.value.status == 409
        again = store.next_assignment(con, ann, 1)
        assert again is not None and again.pair != a.pair  # she gets the other pair, not the completed one
        assert Counter(r["pair"] for r in store.all_ratings(con)) == {a.pair: 1}


def test_odd_requests_get_pages_not_tracebacks(tmp_path):
    study = fake_study(tmp_path / "s", n=2, k=1)
    tokens = invite(study, ["ann"])
    with served(create_study_app(study)) as url:
        assert requests.get(url + "/r/%C3%A9").status_code == 403  # a non-ASCII token
        assert requests.get(url + f"/r/{tokens['ann']}?revise=99999999999999999999").status_code == 403
        assert requests.post(url + f"/r/{tokens['ann']}", data={"assignment": "99999999999999999999"}).status_code == 400
        big = {"assignment": "1", "comment": "x" * 100_000}
        assert requests.post(url + f"/r/{tokens['ann']}", data=big).status_code == 413
        assert requests.post(url + "/r/wrong", data=big).status_code == 403  # the token is checked first


def test_invite_refuses_a_folder_that_is_no_study(tmp_path, capsys):
    assert main(["study", "invite", str(tmp_path), "ann"]) == 2
    assert "not a study folder" in capsys.readouterr().err
    assert not (tmp_path / store.DB).exists()


def test_judge_export_picks_one_judge(tmp_path):
    study = fake_study(tmp_path / "s", n=1, k=1)
    with store.connect(study) as con:
        for name, pref in (("judge:x", "base"), ("judge:y", "tuned")):
            store.add_rater(con, name, kind="judge")
            rid = next(r["id"] for r in store.raters(con, "judge") if r["name"] == name)
            for left, right in (("base", "tuned"), ("tuned", "base")):
                store.save_judgement(con, rid, 1, left, right, {"base": {"q": 3}, "tuned": {"q": 3}}, pref)
    with pytest.raises(StudyError, match="several judges"):
        preference_rows(study, source="judge")
    [row] = preference_rows(study, source="judge", judge="judge:y")
    assert row["chosen_system"] == "tuned" and row["votes"]["chosen"] == 2
    with pytest.raises(StudyError, match="no such judge"):
        preference_rows(study, source="judge", judge="judge:z")
