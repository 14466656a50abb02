"""The web pages in headless Chromium: two raters rating a study (reloads, a phone-sized screen), and
the dashboard (runs, a run's live curves, compare, a study's results, the chat playground streaming),
which never changes a run folder."""

import fcntl
import json
import os
import time
from pathlib import Path

import pytest
import requests

from tunesmith.studies import create_study, criteria_from, store
from tunesmith.web import create_ui_app

from test_report_browser import IMAGES_JS, browser  # noqa: F401 - the module-scoped Chromium fixture
from test_studies import served

CRITERIA = ["relevance", "quality"]


def wait_for(fn, timeout=60.0, what="condition"):
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            value = fn()
        except (NoSuchElementException, StaleElementReferenceException):  # the page is changing under us
            value = None
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def click_rating(browser, left: int, right: int, pref: str) -> dict:
    """Fill the form as a person would (clicking the labels' radios); what was clicked."""
    from selenium.webdriver.common.by import By

    assignment = browser.find_element(By.NAME, "assignment").get_attribute("value")
    for side, score in (("left", left), ("right", right)):
        for c in CRITERIA:
            browser.find_element(By.CSS_SELECTOR, f"input[name='{side}.{c}'][value='{score}']").click()
    browser.find_element(By.CSS_SELECTOR, f"input[name='preference'][value='{pref}']").click()
    browser.find_element(By.NAME, "comment").send_keys(f"{pref} {left}/{right}")
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    form = browser.find_element(By.TAG_NAME, "form")
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    WebDriverWait(browser, 30).until(EC.staleness_of(form))  # the answer is saved and the next page is here
    return {"assignment": int(assignment), "left": left, "right": right, "pref": pref}


def test_two_raters_rate_a_study_in_chromium(browser, gen_runs, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By

    study = create_study([gen_runs["one"]], tmp_path / "st", base=True, examples=4, criteria=criteria_from(CRITERIA),
                         ratings_per_pair=2, raters=["ann", "bob"])
    with store.connect(study) as con:
        tokens = {r["name"]: r["token"] for r in store.raters(con)}
    from tunesmith.studies.web import create_study_app

    clicks = {"ann": [], "bob": []}
    with served(create_study_app(study)) as url:
        browser.set_window_size(390, 844)  # a phone
        browser.get(f"{url}/r/{tokens['ann']}")
        left = browser.find_element(By.ID, "left").rect
        right = browser.find_element(By.ID, "right").rect
        assert right["y"] >= left["y"] + left["height"] - 1  # stacked, not side by side
        assert browser.execute_script("return document.documentElement.scrollWidth") <= 400  # nothing runs off the side
        browser.set_window_size(1100, 1400)
        turn, scores = 0, [(5, 1, "left"), (2, 4, "right"), (3, 3, "tie")]
        done = set()
        while len(done) < 2:
            for who in ("ann", "bob"):
                if who in done:
                    continue
                browser.get(f"{url}/r/{tokens[who]}")
                if "All done" in browser.find_element(By.TAG_NAME, "h1").text:
                    done.add(who)
                    continue
                if turn == 1:  # a reload mid-study shows the same pair again
                    before = browser.find_element(By.NAME, "assignment").get_attribute("value")
                    browser.refresh()
                    assert browser.find_element(By.NAME, "assignment").get_attribute("value") == before
                progress = browser.find_element(By.CLASS_NAME, "progress").text
                assert f"Rater {who}" in progress and "of 4" in progress
                assert "How to rate" in browser.page_source  # the study's guidance is on every page
                clicks[who].append(click_rating(browser, *scores[turn % 3]))
                turn += 1
    with store.connect(study) as con:
        rows = store.all_ratings(con)
        assignments = {r["id"]: dict(r) for r in con.execute("SELECT * FROM assignments")}
    assert len(rows) == 8 == len(clicks["ann"]) + len(clicks["bob"])  # 4 pairs x 2 ratings, each pair once per rater
    by_key = {(r["rater_name"], r["pair"]): r for r in rows}
    for who, made in clicks.items():
        assert len(made) == 4
        for c in made:
            a = assignments[c["assignment"]]
            r = by_key[(who, a["pair"])]
            assert r["left"] == a["left"]
            assert r["scores"][r["left"]] == {k: c["left"] for k in CRITERIA}
            assert r["scores"][r["right"]] == {k: c["right"] for k in CRITERIA}
            assert r["preference"] == {"left": r["left"], "right": r["right"], "tie": "tie"}[c["pref"]]
            assert r["comment"] == f"{c['pref']} {c['left']}/{c['right']}"


def folder_state(root: Path) -> dict[str, tuple[int, float]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime) for p in root.rglob("*") if p.is_file()}


def test_dashboard_in_chromium(browser, gen_runs, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By

    runs_root = gen_runs["one"].parent
    study = create_study([gen_runs["one"], gen_runs["two"]], tmp_path / "studies" / "greet", base=True, examples=3,
                         criteria=criteria_from(CRITERIA), ratings_per_pair=1, raters=["ann"])
    with store.connect(study) as con:
        ann = store.raters(con)[0]["id"]
        while (a := store.next_assignment(con, ann, 1)) is not None:
            store.save_rating(con, ann, a.id, {"left": {c: 4 for c in CRITERIA}, "right": {c: 2 for c in CRITERIA}},
                              "left", "", CRITERIA)
    before = folder_state(runs_root)
    app = create_ui_app([runs_root], [tmp_path / "studies"], use_index=False)
    with served(app) as url:
        browser.set_window_size(1100, 2000)
        browser.get(url + "/")
        text = browser.find_element(By.TAG_NAME, "body").text
        assert "one" in text and "two" in text and "greet" in text and "evaluated" in text
        assert requests.get(url + "/runs/one").status_code == 200  # a unique name works as well as the id
        assert requests.get(url + "/api/runs/one/metrics?after=-5").json()["rows"][0]["step"] == 1  # no negative paging
        # a run: its curves are drawn from metrics.jsonl
        browser.find_element(By.LINK_TEXT, "one").click()
        wait_for(lambda: int(browser.execute_script("return document.body.dataset.points || '0'")) > 0, what="curves")
        ink = browser.execute_script("""const c = document.getElementById('curves'), d = c.getContext('2d')
            .getImageData(0, 0, c.width, c.height).data; let n = 0;
            for (let i = 0; i < d.length; i += 4) if (d[i] < 235 || d[i + 1] < 235 || d[i + 2] < 235) n++; return n / (d.length / 4);""")
        assert ink > 0.003, f"the loss curves are blank ({ink:.2%})"
        # its report, and a comparison with the other run
        run_url = browser.current_url
        browser.find_element(By.LINK_TEXT, "Full report").click()
        wait_for(lambda: "tunesmith run: one" in browser.find_element(By.TAG_NAME, "h1").text, what="the report")
        images = browser.execute_script(IMAGES_JS)
        assert images and all(complete and ink > 0.01 for _, complete, _, _, ink in images)
        browser.get(run_url)
        browser.find_element(By.CSS_SELECTOR, "form[action='/compare'] button").click()
        wait_for(lambda: "one vs two" in browser.find_element(By.TAG_NAME, "h1").text, what="the comparison page")
        assert "lr" in browser.find_element(By.TAG_NAME, "table").text  # what differs between them
        assert len(browser.find_elements(By.TAG_NAME, "iframe")) == 2
        # the study's results, with a plot
        browser.get(url + "/studies/greet")
        assert "Who won" in browser.page_source
        images = browser.execute_script(IMAGES_JS)
        assert len(images) == 1 and images[0][1] and images[0][4] > 0.01
        # the playground streams the base model's and the run's answers side by side
        browser.get(url + "/playground")
        from selenium.webdriver.support.ui import Select

        Select(browser.find_element(By.ID, "run")).select_by_visible_text("one")
        browser.find_element(By.ID, "msg").send_keys("Greet person 3")
        browser.find_element(By.ID, "max").clear()
        browser.find_element(By.ID, "max").send_keys("6")
        browser.find_element(By.ID, "send").click()
        wait_for(lambda: browser.find_element(By.ID, "state").text in ("done",) or "error" in browser.find_element(By.ID, "state").text,
                 timeout=120, what="the playground's answers")
        assert browser.find_element(By.ID, "state").text == "done"
        assert browser.find_element(By.ID, "tuned-name").text == "one"
        # a tiny random model's answers may be whitespace only: what arrived counts, not what shows
        streamed = browser.execute_script("return ['base-out', 'tuned-out'].map(i => document.getElementById(i).textContent)")
        assert all(len(t) > 0 for t in streamed), streamed
    assert folder_state(runs_root) == before  # read-only toward runs


def test_live_training_curves_update(browser, gen_runs, tmp_path):  # noqa: F811
    """A run that is training (its lock held, metrics.jsonl growing): the page adds the new points."""
    from selenium.webdriver.common.by import By

    run = tmp_path / "runs" / "live"
    run.mkdir(parents=True)
    import yaml

    cfg = yaml.safe_load((gen_runs["one"] / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump(dict(cfg, name="live", output_dir=str(run.parent))))
    (run / "run.json").write_text(json.dumps({"created": "2026-12-01T00:00:00+00:00"}))
    metrics = run / "metrics.jsonl"
    metrics.write_text(json.dumps({"type": "train", "step": 1, "loss": 3.0}) + "\n")
    lock = open(run.parent / ".live.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)  # what a training process holds (runs.folder.run_lock)
    try:
        with served(create_ui_app([tmp_path / "runs"], [], use_index=False)) as url:
            browser.get(url + "/")
            browser.find_element(By.LINK_TEXT, "live").click()
            wait_for(lambda: browser.execute_script("return document.body.dataset.points") == "1", what="first point")
            assert "training" in browser.find_element(By.ID, "progress").text
            with open(metrics, "a") as f:
                f.write(json.dumps({"type": "train", "step": 2, "loss": 2.5}) + "\n")
                f.write(json.dumps({"type": "eval", "step": 2, "val_loss": 2.7}) + "\n")
            wait_for(lambda: browser.execute_script("return document.body.dataset.points") == "3", timeout=20, what="new points")
            assert "validation loss 2.7000" in browser.find_element(By.ID, "progress").text
            # training ended; the final evaluation runs (it can outlast training): the page says so, not "step 2 of 2"
            from tunesmith.runs.phase import set_phase

            set_phase(run, "evaluating", "evaluating tuned", 120, 872, 235)
            wait_for(lambda: "evaluating (evaluating tuned): 120 of 872, about 4 min left; training ended at step 2"
                     in browser.find_element(By.ID, "progress").text, timeout=20, what="the evaluation phase")
            assert requests.get(url + "/api/runs/live/metrics").json()["phase"]["total"] == 872
            (run / "phase.json").write_text(json.dumps({"phase": "evaluating", "pid": 2**22 + 12345}))  # a dead process
            assert requests.get(url + "/api/runs/live/metrics").json()["phase"] is None
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


def test_dashboard_refuses_other_hosts_and_sites_and_survives_a_broken_study(tmp_path):
    from test_studies import fake_study

    good = fake_study(tmp_path / "studies" / "good")
    broken = tmp_path / "studies" / "broken"
    broken.mkdir()
    (broken / "study.json").write_text("{not json")
    half = fake_study(tmp_path / "studies" / "half")
    (half / store.DB).write_bytes(b"this is no sqlite file" * 100)
    before = folder_state(tmp_path / "studies")
    with served(create_ui_app([tmp_path / "runs"], [tmp_path / "studies"], use_index=False)) as url:
        home = requests.get(url + "/")
        assert home.status_code == 200 and "good" in home.text and "broken" in home.text and "half" in home.text
        assert requests.get(url + "/studies/broken").status_code == 422
        assert requests.get(url + "/studies/half").status_code == 422
        assert requests.get(url + "/studies/good").status_code == 200
        assert requests.get(url + "/", headers={"Host": "evil.example"}).status_code == 400  # DNS rebinding
        r = requests.post(url + "/api/playground/x/models", headers={"Origin": "http://evil.example"})
        assert r.status_code == 403
    # read-only toward studies too: the files are unchanged (a WAL reader may add SQLite's empty
    # -wal/-shm coordination files, which hold no data)
    after = {p: v for p, v in folder_state(tmp_path / "studies").items() if not p.endswith(("-wal", "-shm"))}
    assert after == before
    assert good.is_dir()


def test_token_and_bind(tmp_path):
    from tunesmith.deploy.errors import ServeError
    from tunesmith.web import serve_ui

    with served(create_ui_app([tmp_path], [], token="s3cret", use_index=False)) as url:
        assert requests.get(url + "/").status_code == 403
        with requests.Session() as s:
            assert s.get(url + "/?token=s3cret").status_code == 200
            assert s.get(url + "/playground").status_code == 200  # the cookie carries it from now on
        assert requests.get(url + "/?token=wrong").status_code == 403
    with pytest.raises(ServeError, match="token"):
        serve_ui([tmp_path], [], host="0.0.0.0", port=1)
    assert os.environ.get("TUNESMITH_UI_TOKEN") is None
