"""The raters' web app: ``/r/<token>`` shows the rater's next pair, blind (answers A and B, no system
names, left/right as assigned), and takes their scores, preference and comment.

Plain server-rendered HTML forms: no JavaScript needed, no network resource (no CDN, no fonts), one
column on a phone-sized screen. Every answer is committed to ``ratings.sqlite`` before the page
answers, so a reload, a closed tab or a killed server loses nothing that was acknowledged. A wrong
or missing token gets a 403 page; a rating for a pair the rater was not given is refused (403).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from tunesmith.studies import store
from tunesmith.studies.create import load_study

MAX_FORM_BYTES = 64 * 1024  # a comment is text; anything larger is refused before parsing


def add_study_routes(app: FastAPI, study_dir: Path, prefix: str = "") -> None:
    """Mount the rating pages of the study in ``study_dir`` on ``app`` under ``prefix``."""
    study_dir = Path(study_dir)
    study, items = load_study(study_dir)
    by_id = {it["id"]: it for it in items}
    criteria = [c["name"] for c in study["criteria"]]
    k = int(study["ratings_per_pair"])

    @app.get(prefix + "/", response_class=HTMLResponse)
    def welcome() -> HTMLResponse:
        return _page("Rating study", "<h1>Rating study</h1><p>Open the personal link you were sent "
                     "(it ends in /r/ and a code).</p>", 403)

    @app.get(prefix + "/r/{token}", response_class=HTMLResponse)
    def rate(token: str, revise: str | None = None) -> HTMLResponse:
        with store.connect(study_dir) as con:
            rater = store.rater_by_token(con, token)
            if rater is None:
                return _forbidden()
            history = store.answered(con, rater["id"])
            if revise is not None:  # the rater goes back to one of their answers
                earlier = dict(history)
                number = _int(revise)
                a = store.assignment_of(con, rater["id"], number) if number is not None else None
                if a is None or number not in earlier:
                    return _page("Refused", "<h1>Not one of your answers</h1>"
                                 f"<p><a href='{prefix}/r/{html.escape(token)}'>Back to your ratings</a></p>", 403)
                ids = [i for i, _ in history]
                at = ids.index(a.id)
                return _page("Change", _form(study, by_id[a.item], a, at, len(history), rater["name"], prefix, token,
                                             earlier[a.id], ids[at - 1] if at > 0 else None))
            a = store.next_assignment(con, rater["id"], k)
            done, total = store.progress(con, rater["id"], k)
        last = history[-1][0] if history else None
        back = (f"<p><a href='{prefix}/r/{html.escape(token)}?revise={last}'>Change your previous answer</a></p>"
                if last is not None else "")
        if a is None and total > done:
            return _page("Please wait", f"<h1>Nothing to rate right now, {html.escape(rater['name'])}</h1>"
                         f"<p>You rated {done}. The pairs still open are being rated by others at this moment; "
                         "reload this page in a few minutes.</p>" + back)
        if a is None:
            return _page("Thank you", f"<h1>All done, {html.escape(rater['name'])}: thank you!</h1>"
                         f"<p>You rated {done} pair{'' if done == 1 else 's'}. Nothing is left for you in this study; "
                         "you can close this page.</p>" + back)
        return _page("Rate", _form(study, by_id[a.item], a, done, total, rater["name"], prefix, token, None, last))

    @app.post(prefix + "/r/{token}", response_class=HTMLResponse)
    async def submit(token: str, request: Request) -> Any:
        with store.connect(study_dir) as con:  # who is asking, before reading what they send
            if store.rater_by_token(con, token) is None:
                return _forbidden()
        form = await _read_form(request)
        if form is None:
            return _page("Too large", "<h1>That answer is too large</h1><p>Shorten the comment and send it again.</p>", 413)
        with store.connect(study_dir) as con:
            rater = store.rater_by_token(con, token)
            if rater is None:
                return _forbidden()
            assignment = _int(form.get("assignment"))
            if assignment is None:
                return _page("Refused", "<h1>Refused</h1><p>The form did not say which pair it rates.</p>", 400)
            scores = {side: {c: _int(form.get(f"{side}.{c}")) for c in criteria} for side in ("left", "right")}
            try:
                # a rater's form for a pair they already answered (back button, double click, the change
                # link) replaces that answer: the latest one they sent is what they mean
                store.save_rating(con, rater["id"], assignment, scores, form.get("preference", ""),  # type: ignore[arg-type]
                                  form.get("comment", ""), criteria, revise=True, k=k)
            except store.RatingRefused as e:
                if e.status == 409:  # the pair was completed by others meanwhile: on to the next one
                    return _page("Already complete", f"<h1>That pair is complete</h1><p>{html.escape(str(e))}.</p>"
                                 f"<p><a href='{prefix}/r/{html.escape(token)}'>Next pair</a></p>", 409)
                return _page("Refused", f"<h1>Not saved</h1><p>{html.escape(str(e))}</p>"
                             f"<p><a href='{prefix}/r/{html.escape(token)}'>Back to your ratings</a></p>", e.status)
        return RedirectResponse(f"{prefix}/r/{token}", status_code=303)


async def _read_form(request: Request) -> dict[str, str] | None:
    """The posted form (the last value of each field), or None when it is larger than
    ``MAX_FORM_BYTES`` (the body is read capped, whatever its Content-Length header says)."""
    declared = request.headers.get("content-length")
    if declared and (_int(declared) is None or _int(declared) > MAX_FORM_BYTES):
        return None
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return None
    return {key: values[-1] for key, values in parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items()}


def create_study_app(study_dir: str | Path) -> FastAPI:
    """The rating web app of one study (``tunesmith study serve``)."""
    app = FastAPI(title="tunesmith study", docs_url=None, redoc_url=None, openapi_url=None)
    add_study_routes(app, Path(study_dir))
    return app


def _int(value: str | None) -> int | None:
    """A whole number from a form or query value; None for anything else (or one SQLite cannot hold)."""
    try:
        number = int(value) if value is not None else None
    except ValueError:
        return None
    return number if number is None or abs(number) < 2**62 else None


def _forbidden() -> HTMLResponse:
    return _page("Not allowed", "<h1>This link is not valid</h1><p>Use the personal link you were sent; "
                 "ask the person running the study for a new one.</p>", 403)


def _turns(messages: list[dict[str, str]]) -> str:
    """The conversation the systems answered; the system prompt (what the systems were told to be)
    is shown first, folded, since it matters for judging tone and helpfulness."""
    system = "".join(f"<details class='system'><summary>What the systems were told (system prompt)</summary>"
                     f"<div class='text'>{html.escape(m['content'])}</div></details>" for m in messages if m["role"] == "system")
    return system + _shown(messages)


def _shown(messages: list[dict[str, str]]) -> str:
    shown = [m for m in messages if m["role"] != "system"]
    if len(shown) == 1:
        return f"<div class='text'>{html.escape(shown[0]['content'])}</div>"
    return "".join(f"<div class='turn'><b>{html.escape(m['role'])}</b><div class='text'>{html.escape(m['content'])}</div></div>"
                   for m in shown)


def _scale(side: str, criterion: dict[str, Any], chosen: int | None) -> str:
    name = criterion["name"]
    anchors = criterion.get("anchors") or {}
    options = "".join(
        f"<label class='point'><input type='radio' name='{side}.{name}' value='{p}' required{' checked' if p == chosen else ''}>"
        f"<span>{p}</span><small>{html.escape(anchors.get(str(p), ''))}</small></label>" for p in range(1, 6))
    question = f"<small class='q'>{html.escape(criterion.get('question') or '')}</small>" if criterion.get("question") else ""
    return f"<fieldset><legend>{html.escape(name)}</legend>{question}<div class='scale'>{options}</div></fieldset>"


def _form(study: dict[str, Any], item: dict[str, Any], a: store.Assignment, done: int, total: int, rater: str,
          prefix: str, token: str, earlier: dict[str, Any] | None, before: int | None) -> str:
    """The rating form for assignment ``a``; ``earlier``: the rater's answer to it (revising), whose
    values are filled in; ``before``: the assignment answered just before (for the back link)."""
    scores = (earlier or {}).get("scores") or {}
    answers = []
    for side, letter in (("left", "A"), ("right", "B")):
        system = a.left if side == "left" else a.right
        output = item["outputs"][system]
        scales = "".join(_scale(side, c, scores.get(system, {}).get(c["name"])) for c in study["criteria"])
        answers.append(f"<section class='answer' id='{side}'><h2>Answer {letter}</h2>"
                       f"<div class='text output'>{html.escape(output) or '<i>(empty answer)</i>'}</div>{scales}</section>")
    pref = {a.left: "left", a.right: "right", "tie": "tie"}.get((earlier or {}).get("preference", ""), "")
    choice = "".join(f"<label class='point'><input type='radio' name='preference' value='{v}'"
                     f"{' required' if v == 'left' else ''}{' checked' if v == pref else ''}><span>{t}</span></label>"
                     for v, t in (("left", "A"), ("tie", "tie"), ("right", "B")))
    link = f"{prefix}/r/{html.escape(token)}"
    head = (f"<p class='progress'>Rater {html.escape(rater)} · changing your answer {done + 1} of {total} · "
            f"<a href='{link}'>back to new pairs</a></p>" if earlier is not None
            else f"<p class='progress'>Rater {html.escape(rater)} · pair {done + 1} of {total}</p>")
    back = f"<a href='{link}?revise={before}'>Change your previous answer</a>" if before is not None else ""
    guide = f"<details open class='guide'><summary>How to rate</summary><div class='text'>{html.escape(study.get('instructions') or '')}</div></details>" \
        if study.get("instructions") else ""
    return (f"{head}{guide}"
            f"<h1>Which answer is better?</h1><section class='prompt'><h2>The request</h2>{_turns(item['messages'])}</section>"
            f"<form method='post' action='{link}'><input type='hidden' name='assignment' value='{a.id}'>"
            + ("<input type='hidden' name='revise' value='1'>" if earlier is not None else "")
            + f"<div class='pair'>{''.join(answers)}</div>"
            f"<fieldset class='pref'><legend>Overall, which do you prefer?</legend><div class='scale'>{choice}</div></fieldset>"
            "<label class='comment'>Comment (optional)<textarea name='comment' rows='2' maxlength='4000'>"
            f"{html.escape((earlier or {}).get('comment') or '')}</textarea></label>"
            f"<button type='submit'>{'Save the change' if earlier is not None else 'Save and next'}</button> {back}</form>")


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(PAGE.format(title=html.escape(title), body=body), status_code=status)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title><style>
body {{ font-family: system-ui, sans-serif; margin: 0 auto; max-width: 1100px; padding: 0.8em; color: #222; }}
h1 {{ font-size: 1.3em; }} h2 {{ font-size: 1.05em; margin: 0.2em 0 0.5em; }}
.text {{ white-space: pre-wrap; overflow-wrap: anywhere; }}
.prompt {{ background: #f6f8fa; padding: 0.6em 0.8em; border-radius: 6px; }}
.turn {{ margin: 0.3em 0; }}
.pair {{ display: grid; grid-template-columns: 1fr 1fr; gap: 1em; margin: 1em 0; }}
@media (max-width: 700px) {{ .pair {{ grid-template-columns: 1fr; }} }}
.answer {{ border: 1px solid #ccc; border-radius: 6px; padding: 0.6em 0.8em; }}
.output {{ background: #fffdf5; padding: 0.5em; min-height: 3em; }}
fieldset {{ border: 0; padding: 0; margin: 0.7em 0; }} legend {{ font-weight: bold; }}
small.q {{ display: block; color: #555; }}
.scale {{ display: flex; gap: 0.3em; flex-wrap: wrap; }}
.point {{ display: flex; flex-direction: column; align-items: center; min-width: 3.4em; padding: 0.3em;
          border: 1px solid #ddd; border-radius: 5px; cursor: pointer; }}
.point small {{ color: #666; font-size: 0.72em; text-align: center; }}
.point input {{ margin: 0.2em; width: 1.2em; height: 1.2em; }}
.comment textarea {{ width: 100%; box-sizing: border-box; }}
button {{ font-size: 1.1em; padding: 0.5em 1.4em; margin: 0.8em 0; }}
.progress {{ color: #555; }} .guide {{ background: #f3f7ff; padding: 0.4em 0.8em; border-radius: 6px; margin: 0.5em 0; }}
</style></head><body>
{body}
</body></html>
"""
