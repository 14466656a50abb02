"""``tunesmith ui``: the local dashboard. Runs (from the run folders and the run index), each run's
report, two reports compared, a training run's curves updating while it trains, a chat playground
(base vs a run, streamed by the serving code) and the rating studies' results.

Read-only toward runs: no route writes, moves or deletes anything in a run folder (the study pages
compute their report in memory). Bound to 127.0.0.1 unless a token is set; with a token every page
needs it once (``?token=...``, then a cookie).
"""

from __future__ import annotations

import asyncio
import hashlib
import html
import ipaddress
import json
import secrets
import sqlite3
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import ValidationError

from tunesmith.runtime.commands import command
from tunesmith.deploy import protocol as P
from tunesmith.deploy.server import APIError, check_port, error_body, install_error_handlers
from tunesmith.io import read_jsonl
from tunesmith.runs import index
from tunesmith.runs.phase import current_phase
from tunesmith.studies import store
from tunesmith.studies.create import StudyError, load_study
from tunesmith.web import pages
from tunesmith.web.playground import Playground

COOKIE = "tunesmith_ui"


def run_id(path: str | Path) -> str:
    """A run's id in the dashboard's addresses: a short hash of its absolute path."""
    return hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:12]


class Sources:
    """Where the dashboard finds runs (folders under ``run_roots``, plus the run index when it
    exists) and studies (folders under ``study_roots`` holding a study.json)."""

    def __init__(self, run_roots: list[Path], study_roots: list[Path], use_index: bool = True) -> None:
        self.run_roots, self.study_roots, self.use_index = run_roots, study_roots, use_index

    def runs(self) -> list[dict[str, Any]]:
        rows: dict[str, dict[str, Any]] = {}
        if self.use_index and index.index_path().is_file():
            for r in index.list_runs():
                rows[str(Path(r["path"]).resolve())] = r
        for d in index.find_run_folders([r for r in self.run_roots if r.is_dir()]):
            row = index.row_from_folder(d)
            if row:
                rows[str(Path(row["path"]).resolve())] = row
        out = [dict(r, id=run_id(p), exists=Path(p).is_dir()) for p, r in rows.items()]
        return sorted(out, key=lambda r: str(r.get("created") or ""), reverse=True)

    def run(self, rid: str) -> dict[str, Any] | None:
        """The run whose id is ``rid``, or whose name is (when only one run has that name)."""
        runs = [r for r in self.runs() if r["exists"]]
        by_id = next((r for r in runs if r["id"] == rid), None)
        named = [r for r in runs if r.get("name") == rid]
        return by_id or (named[0] if len(named) == 1 else None)

    def studies(self) -> list[Path]:
        found = []
        for root in self.study_roots:
            if (root / "study.json").is_file():
                found.append(root)
            elif root.is_dir():
                found += sorted(p.parent for p in root.glob("*/study.json"))
        return found

    def study(self, name: str) -> Path | None:
        return next((s for s in self.studies() if s.name == name), None)


def create_ui_app(run_roots: list[str | Path], study_roots: list[str | Path] | None = None, token: str | None = None,
                  use_index: bool = True) -> FastAPI:
    """The dashboard app over the run folders under ``run_roots`` (and the run index) and the
    studies under ``study_roots``. ``token``: required once per browser when set."""
    src = Sources([Path(r) for r in run_roots], [Path(s) for s in (study_roots or [])], use_index)
    playground = Playground()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(playground.close)

    app = FastAPI(title="tunesmith ui", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    app.state.playground = playground

    _guard(app, token)
    _run_routes(app, src)
    _playground_routes(app, src, playground)
    _study_routes(app, src)
    return app


def _guard(app: FastAPI, token: str | None) -> None:
    """Who may use the dashboard: with a token, whoever has it (once per browser: a cookie);
    without, this machine's own pages only (host names and same-origin POSTs)."""
    if not token:
        # only this machine's names: a web page elsewhere cannot rebind its own domain to 127.0.0.1
        # and read the dashboard (DNS rebinding); with a token the token protects it
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware, allowed_hosts=["127.0.0.1", "localhost", "[::1]", "::1"])

        @app.middleware("http")
        async def same_origin(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
            """A POST from another site's page (it carries that site's Origin) is refused."""
            origin = request.headers.get("origin")
            if request.method == "POST" and origin and origin.split("://", 1)[-1] != request.headers.get("host", ""):
                return JSONResponse(error_body(403, "cross-site request refused"), status_code=403)
            return await call_next(request)
    if token:
        @app.middleware("http")
        async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
            given = request.query_params.get("token") or request.cookies.get(COOKIE) or ""
            if not secrets.compare_digest(given.encode(), token.encode()):
                return HTMLResponse(pages.page("Not allowed", "<h1>A token is needed</h1><p>Open the address "
                                               "`tunesmith ui` printed (it ends in ?token=...).</p>"), status_code=403)
            response = await call_next(request)
            if request.query_params.get("token"):
                response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
            return response


def _run_routes(app: FastAPI, src: Sources) -> None:
    """The run list, each run's page, report, live metrics, and two runs compared."""
    @app.get("/favicon.ico")
    def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/", response_class=HTMLResponse)
    def home() -> HTMLResponse:
        return HTMLResponse(pages.runs_page(src.runs(), [(s.name, _study_summary(s)) for s in src.studies()]))

    @app.exception_handler(StudyError)
    async def study_error(request: Request, e: StudyError) -> HTMLResponse:
        return HTMLResponse(pages.page("Study", pages.nav() + f"<h1>This study cannot be read</h1><p>{html.escape(str(e))}</p>"),
                            status_code=422)

    @app.get("/runs/{rid}", response_class=HTMLResponse)
    def run_page(rid: str) -> HTMLResponse:
        row = src.run(rid)
        if row is None:
            return _missing("run", rid)
        return HTMLResponse(pages.run_page(row, [r for r in src.runs() if r["exists"] and r["id"] != row["id"]]))

    @app.get("/runs/{rid}/report", response_model=None)
    def run_report(rid: str) -> Response:
        row = src.run(rid)
        if row is None or not (Path(row["path"]) / "report.html").is_file():
            return _missing("report of run", rid)
        return FileResponse(Path(row["path"]) / "report.html", media_type="text/html")

    @app.get("/api/runs/{rid}/metrics")
    def run_metrics(rid: str, after: int = 0) -> JSONResponse:
        """The run's metrics.jsonl rows from line ``after`` on, its status, planned steps and current
        phase (runs/phase.py: preparing, evaluating with its progress; None when idle)."""
        row = src.run(rid)
        if row is None:
            return JSONResponse({"error": f"no run {rid}"}, status_code=404)
        d = Path(row["path"])
        rows = read_jsonl(d / "metrics.jsonl") if (d / "metrics.jsonl").is_file() else []
        fresh = index.row_from_folder(d) or row
        return JSONResponse({"rows": rows[max(0, after):], "next": len(rows), "status": fresh["status"],
                             "max_steps": _planned_steps(d), "phase": current_phase(d)})

    @app.get("/compare", response_class=HTMLResponse)
    def compare(a: str, b: str) -> HTMLResponse:
        ra, rb = src.run(a), src.run(b)
        if ra is None or rb is None:
            return _missing("run", a if ra is None else b)
        return HTMLResponse(pages.compare_page(ra, rb, index.diff_runs(ra, rb)))


def _playground_routes(app: FastAPI, src: Sources, playground: Playground) -> None:
    """The chat playground: base and tuned model of a run side by side (OpenAI chat protocol)."""
    @app.get("/playground", response_class=HTMLResponse)
    def playground_page(run: str | None = None) -> HTMLResponse:
        chat_runs = [r for r in src.runs() if r["exists"] and _can_chat(r)]
        return HTMLResponse(pages.playground_page(chat_runs, run))

    @app.post("/api/playground/{rid}/models")
    async def playground_models(rid: str) -> JSONResponse:
        row = src.run(rid)
        if row is None:
            raise APIError(404, f"no run {rid}", "run")
        try:
            _, base, tuned = await asyncio.to_thread(playground.load, Path(row["path"]))
        except Exception as e:  # noqa: BLE001 - any loading failure is the user's to read
            raise APIError(400, f"cannot chat with {row['name']}: {e}", "run") from None
        from tunesmith.deploy.loading import run_config

        system = run_config(Path(row["path"])).data.system_prompt
        return JSONResponse({"base": base, "tuned": tuned, "system_prompt": system or "",
                             "max_tokens": playground.settings.max_tokens})

    @app.post("/api/playground/{rid}/chat/completions", response_model=None)
    async def playground_chat(rid: str, request: Request) -> Response:
        row = src.run(rid)
        if row is None:
            raise APIError(404, f"no run {rid}", "run")
        try:
            req = P.ChatCompletionRequest.model_validate(await request.json())
        except (ValidationError, ValueError) as e:
            return JSONResponse(error_body(400, f"invalid request: {e}"), status_code=400)
        serving, _, _ = await asyncio.to_thread(playground.load, Path(row["path"]))
        return await serving.chat(req, request)


def _study_routes(app: FastAPI, src: Sources) -> None:
    """Each rating study's results page (read only)."""
    @app.get("/studies/{name}", response_class=HTMLResponse)
    def study_page(name: str) -> HTMLResponse:
        folder = src.study(name)
        if folder is None:
            return _missing("study", name)
        from tunesmith.studies.analysis import analyze
        from tunesmith.studies.report import body

        if not (folder / store.DB).is_file():  # never create one: the dashboard only reads
            raise StudyError(f"{folder}: no {store.DB}; not a complete study (make one with {command('study', 'create')})")
        try:
            doc = analyze(folder, readonly=True)
        except (sqlite3.Error, KeyError, TypeError, ValueError) as e:
            raise StudyError(f"{folder}: cannot be read ({type(e).__name__}: {e})") from None
        return HTMLResponse(pages.page(f"study {name}", pages.nav() + body(doc)))


def _study_summary(folder: Path) -> dict[str, Any]:
    """What the list of studies shows; a study that cannot be read is listed with the reason."""
    try:
        study, items = load_study(folder)
    except (StudyError, ValueError, OSError, KeyError) as e:
        return {"systems": [], "items": 0, "wanted": 0, "ratings": 0, "problem": str(e)[:200]}
    if not (folder / store.DB).is_file():
        return {"systems": list(study.get("systems", [])), "items": len(items), "wanted": 0, "ratings": 0,
                "problem": f"no {store.DB}"}
    try:
        return _counts(folder, study, items)
    except (sqlite3.Error, KeyError, TypeError, ValueError) as e:
        return {"systems": [], "items": 0, "wanted": 0, "ratings": 0, "problem": f"{type(e).__name__}: {e}"[:200]}


def _counts(folder: Path, study: dict[str, Any], items: list[dict[str, Any]]) -> dict[str, Any]:
    with store.connect(folder, readonly=True) as con:
        n_pairs = con.execute("SELECT COUNT(*) FROM pairs").fetchone()[0]
        human = con.execute("SELECT COUNT(*) FROM ratings r JOIN raters x ON x.id = r.rater WHERE x.kind = 'human'").fetchone()[0]
    return {"systems": list(study["systems"]), "items": len(items), "wanted": n_pairs * study["ratings_per_pair"],
            "ratings": human}


def _can_chat(row: dict[str, Any]) -> bool:
    return row.get("method") in ("lora", "full") and row.get("task") in ("instruction", "chat", "text") \
        and row.get("status") in ("trained", "evaluated", "stopped")


def _planned_steps(run_dir: Path) -> int | None:
    est = run_dir / "estimate.json"
    if est.is_file():
        try:
            doc = json.loads(est.read_text(encoding="utf-8"))
            steps = doc.get("steps") or (doc.get("plan") or {}).get("steps")
            if isinstance(steps, int):
                return steps
        except ValueError:
            pass
    import yaml

    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return None
    steps = (cfg.get("train") or {}).get("max_steps")
    return steps if isinstance(steps, int) and steps > 0 else None


def _missing(what: str, name: str) -> HTMLResponse:
    return HTMLResponse(pages.page("Not found", pages.nav() + f"<h1>No {html.escape(what)} {html.escape(name)}</h1>"
                                   "<p><a href='/'>All runs</a></p>"), status_code=404)


def serve_ui(run_roots: list[str | Path], study_roots: list[str | Path], host: str = "127.0.0.1", port: int = 8765,
             token: str | None = None) -> None:
    """Serve the dashboard until Ctrl-C. Raises ServeError when ``host`` is not this machine and no
    token is set."""
    import uvicorn

    from tunesmith.deploy.errors import ServeError

    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and not token:
        raise ServeError(f"refusing to show the dashboard on {host} without a token: anyone who can reach it could "
                         "read your runs and use the playground. Pass --token (or stay on 127.0.0.1)")
    check_port(host, port)
    app = create_ui_app(run_roots, study_roots, token)
    print(f"tunesmith ui: http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/"
          + (f"?token={token}" if token else ""), flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
