"""``tunesmith serve``: an OpenAI-compatible HTTP server for a base model and its LoRA adapters.

Modelled on vLLM's OpenAI server: the request and response types live in ``protocol``; each route
is thin and hands the validated request to one ``OpenAIServing`` object, which owns one ``Engine``
per group of shared weights (``deploy.loading.ServedGroup``) and maps each served model name to
(engine, adapter). Every failure leaves as the OpenAI error JSON with its HTTP status. Auth (a
Bearer key) and the request-body limit are one ASGI middleware (``_Guard``); request metrics are
another (``_Observe``), outermost, so refused requests are counted too.

Prompts: chat messages go through ``data.render.encode_prompt``, exactly as in training and
evaluation, after the run's system prompt when the request brings no system message (a request's
own system message replaces it; the base model gets none); ``/v1/completions`` tokenizes the prompt text as training read raw text (``data.render.encode_document``:
no chat template, the model's BOS token first where its tokenizer adds one, special-token strings as text). Both stop
at the chat template's end-of-turn and end-of-sequence tokens (``chat_format(...).stop_ids``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import math
import os
import socket
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tunesmith.deploy.errors import ServeError
from tunesmith.data.formats import DataError
from tunesmith.data.render import chat_format, encode_document, encode_prompt
from tunesmith.runs.folder import run_config
from tunesmith.deploy import protocol as P
from tunesmith.generation.engine import (Delta, Engine, EngineClosed, EngineError, GenerationRequest, QueueFull,
                                     RequestHandle, SamplingParams)
from tunesmith.deploy.loading import ServedGroup, load_for_serving
from tunesmith.deploy.safety import OutputFilter, StreamFilter

log = logging.getLogger(__name__)
SHUTDOWN_MESSAGE = "the server is shutting down: the answer was cut short; send the request again"
API_KEY_ENV = "TUNESMITH_API_KEY"
OPEN_PATHS = frozenset({"/health"})  # answered without a key (load balancers probe it)
ENDPOINTS = frozenset({"/v1/models", "/v1/chat/completions", "/v1/completions", "/health", "/metrics"})


@dataclass
class ServeSettings:
    """Limits and options of one server. ``api_key``: required Bearer key (None: no auth, loopback
    only). ``max_body_bytes``: request body (413 above). ``max_prompt_tokens``: prompt tokens per
    request (400 above; None: the model's context less one). ``max_tokens``: tokens one answer may
    ask for, and the default when a request does not say (capped by what the context leaves).
    ``max_n``: choices per request. ``max_batch_size``: rows decoded together per engine.
    ``max_waiting``: requests queued per engine (429 above). ``shutdown_timeout``: seconds a
    SIGTERM (or Ctrl-C) lets requests in flight finish; then each open stream ends (a finish
    chunk, an error event, ``[DONE]``) and each other request is answered 503 (``GracefulServer``).
    ``output_filter``: PII/blocked-content filter or None."""

    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None
    max_tokens: int = 2048
    max_n: int = 8
    max_batch_size: int = 32
    max_waiting: int = 256
    shutdown_timeout: float = 30.0
    output_filter: OutputFilter | None = None
    bf16: bool = False

    def check(self) -> None:
        """ServeError listing every limit that is not a positive number."""
        positive = ("max_body_bytes", "max_tokens", "max_n", "max_batch_size", "max_waiting")
        bad = [name for name in positive if getattr(self, name) <= 0]
        if self.shutdown_timeout < 0:
            bad.append("shutdown_timeout (0 or more seconds)")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens <= 0:
            bad.append("max_prompt_tokens")
        if self.max_n > self.max_batch_size:
            bad.append(f"max_n ({self.max_n}) above max_batch_size ({self.max_batch_size})")
        if bad:
            raise ServeError(f"invalid serve limits: {', '.join(bad)} (each must be a positive number)")


# ---------------------------------------------------------------- errors


class APIError(Exception):
    """An error the client gets as OpenAI's ``{"error": {...}}`` with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error", 503: "server_error"}
_CODES = {401: "invalid_api_key", 404: "not_found", 413: "request_too_large", 429: "rate_limit_exceeded",
          503: "service_unavailable", 500: "internal_error"}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object for ``status``."""
    info = P.ErrorInfo(message=message, type=_TYPES.get(status, "server_error"), param=param,
                       code=code or _CODES.get(status))
    return P.ErrorResponse(error=info).model_dump()


def _error_response(request: Request, status: int, message: str, param: str | None = None,
                    code: str | None = None) -> JSONResponse:
    body = error_body(status, message, param, code)
    metrics: Metrics | None = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.errors.labels(str(status), body["error"]["code"] or "").inc()
    return JSONResponse(body, status_code=status)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(request: Request, e: APIError) -> JSONResponse:
        return _error_response(request, e.status, e.message, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        message, param = P.explain_invalid(e.errors())
        return _error_response(request, 400, message, param, "invalid_value")

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException) -> JSONResponse:
        message = str(e.detail)
        if e.status_code == 404 and message == "Not Found":  # Starlette's words for a path no route takes
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif e.status_code == 405 and message == "Method Not Allowed":
            message = f"{request.method} is not allowed on {request.url.path}"
        return _error_response(request, e.status_code, message)

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error_response(request, 500, f"internal error: {type(e).__name__}")


# ---------------------------------------------------------------- middleware


class _Guard:
    """Bearer-key auth (constant-time compare) on every path but /health, and the body limit:
    413 from Content-Length, or as soon as a chunked body grows past it."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int, metrics: Metrics) -> None:
        self.app, self.key, self.limit, self.metrics = app, api_key, max_body_bytes, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.key and scope["path"] not in OPEN_PATHS:
            auth = headers.get("authorization", "")
            token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), self.key.encode()):
                msg = "Incorrect API key provided" if token else "Missing API key: send 'Authorization: Bearer <key>'"
                return await self._refuse(scope, receive, send, 401, msg)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.limit:
            return await self._refuse(scope, receive, send, 413, self._too_large())
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, self._too_large())  # the app's handler answers in OpenAI's shape
            return message

        await self.app(scope, counted, send)

    def _too_large(self) -> str:
        return f"request body larger than {self.limit} bytes"

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, status: int, message: str) -> None:
        body = error_body(status, message)
        self.metrics.errors.labels(str(status), body["error"]["code"] or "").inc()
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        await JSONResponse(body, status_code=status, headers=headers)(scope, receive, send)


class _Observe:
    """Counts every request by model, endpoint and status, and times it (to the end of a stream)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def watched(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
            model = scope.get("state", {}).get("model", "")
            self.metrics.requests.labels(model, endpoint, str(status[0])).inc()
            if endpoint.startswith("/v1/") and endpoint != "/v1/models":
                self.metrics.latency.labels(model, endpoint).observe(time.perf_counter() - start)


# ---------------------------------------------------------------- metrics


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (several apps in one process)."""

    def __init__(self, engines: dict[str, Engine], output_filter: OutputFilter | None) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("tunesmith_requests", "HTTP requests by served model, endpoint and status",
                                ["model", "endpoint", "status"], registry=r)
        self.errors = Counter("tunesmith_errors", "Error responses by HTTP status and error code", ["status", "code"],
                              registry=r)
        self.prompt_tokens = Counter("tunesmith_prompt_tokens", "Prompt tokens read", ["model"], registry=r)
        self.completion_tokens = Counter("tunesmith_completion_tokens", "Tokens generated", ["model"], registry=r)
        self.latency = Histogram("tunesmith_request_latency_seconds", "Request time, to the end of the answer",
                                 ["model", "endpoint"], registry=r,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.ttft = Histogram("tunesmith_time_to_first_token_seconds", "Time to the first generated token",
                              ["model"], registry=r, buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        r.register(_LiveCollector(engines, output_filter))


class _LiveCollector:
    """Values read at scrape time: queue depth, running rows and step counters of each engine
    (labelled by its base model), and the output filter's counts by kind."""

    def __init__(self, engines: dict[str, Engine], output_filter: OutputFilter | None) -> None:
        self.engines, self.filter = engines, output_filter

    def collect(self) -> Any:
        queue = GaugeMetricFamily("tunesmith_queue_depth", "Requests waiting for a batch slot", labels=["engine"])
        running = GaugeMetricFamily("tunesmith_running_batch_size", "Rows decoding now", labels=["engine"])
        largest = GaugeMetricFamily("tunesmith_max_batch_size_seen", "Largest batch decoded so far", labels=["engine"])
        steps = CounterMetricFamily("tunesmith_engine_steps", "Decoding steps", labels=["engine"])
        rows = CounterMetricFamily("tunesmith_engine_rows", "Rows decoded, summed over steps (/steps = mean batch)",
                                   labels=["engine"])
        for name, eng in self.engines.items():
            s = eng.snapshot()
            queue.add_metric([name], s.waiting)
            running.add_metric([name], s.running)
            largest.add_metric([name], s.max_rows)
            steps.add_metric([name], s.steps)
            rows.add_metric([name], s.rows)
        filtered = CounterMetricFamily("tunesmith_output_filtered", "Items hidden or answers refused by the output "
                                       "filter, by kind", labels=["kind"])
        for kind, n in sorted((self.filter.totals() if self.filter else {}).items()):
            filtered.add_metric([kind], n)
        return [queue, running, largest, steps, rows, filtered]


# ---------------------------------------------------------------- serving


@dataclass(frozen=True)
class ServedModel:
    """One served name: the engine holding its weights, its PEFT adapter (None: the base or a full
    fine-tune), its tokenizer's stop ids, and what it came from (for /v1/models)."""

    name: str
    engine: Engine
    adapter: str | None
    tokenizer: Any
    stop_ids: tuple[int, ...]
    chat: bool  # the tokenizer has a chat template
    root: str
    parent: str | None
    system_prompt: str | None = None  # the run's data.system_prompt: sent first when a request brings none


class _ChoiceOutput:
    """One choice's text on its way out: through the output filter (held back until safe), with
    its finish reason (``content_filter`` when a refuse rule matched)."""

    def __init__(self, output_filter: OutputFilter | None) -> None:
        self.filter: StreamFilter | None = output_filter.stream() if output_filter else None
        self.text = ""
        self.finish: str | None = None
        self.error: str | None = None

    def add(self, d: Delta) -> str:
        """The text to send for this event ('' while held back); sets ``finish`` at the end."""
        if self.finish is not None:
            return ""  # already ended (refused); the engine's last events for it are dropped
        out = d.text
        if self.filter is not None:
            f = self.filter.feed(d.text)
            out = f.text
            if f.refused:
                self.finish = "content_filter"
            elif d.finish_reason:
                out += self.filter.close().text
        if d.finish_reason and self.finish is None:
            self.finish, self.error = d.finish_reason, d.error
        self.text += out
        return out


def _system_prompt(run_dir: Path | None) -> str | None:
    """A run's training system prompt (None for a base model or a run trained without one)."""
    if run_dir is None:
        return None
    return run_config(run_dir).data.system_prompt or None


class OpenAIServing:
    """Owns the engines and answers the OpenAI endpoints (the routes only hand it validated requests)."""

    def __init__(self, groups: Sequence[ServedGroup], settings: ServeSettings) -> None:
        settings.check()
        if not groups:
            raise ServeError("nothing to serve: give run folders or a base model")
        self.settings = settings
        self.models: dict[str, ServedModel] = {}
        self.engines: dict[str, Engine] = {}
        for g in groups:
            eng = Engine(g.model, g.tokenizer, max_batch_size=settings.max_batch_size,
                         max_waiting=settings.max_waiting, bf16=settings.bf16)
            base_name = next((n for n, a in g.names.items() if a is None), next(iter(g.names)))
            self.engines[base_name] = eng
            stops, chat = _stop_ids(g.tokenizer)
            for name, adapter in g.names.items():
                self.models[name] = ServedModel(name, eng, adapter, g.tokenizer, stops, chat, g.base,
                                                base_name if adapter else None, _system_prompt(g.runs.get(name)))
        # a base model is also found by its config ``model:`` value (gemma3-270m for "gemma-3-270m (Q4_K_M)")
        self.aliases = {g.base: name for g in groups for name in g.names
                        if name not in g.runs and g.base and g.base not in self.models}
        self.metrics = Metrics(self.engines, settings.output_filter)
        self.in_flight = {"streams": 0, "answers": 0}  # requests waiting for the engine now, by kind

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop every engine (finishing what runs, with ``drain``; else every request ends at the
        next step with finish_reason ``abort``: a stream sends its end, a whole answer is a 503)."""
        for eng in self.engines.values():
            eng.shutdown(drain=drain, timeout=timeout)

    def model_list(self) -> P.ModelList:
        """Every served name (the base, each adapter, each full fine-tune)."""
        return P.ModelList(data=[self.model_card(m) for m in self.models.values()])

    def model_card(self, m: ServedModel) -> P.ModelCard:
        return P.ModelCard(id=m.name, root=m.root, parent=m.parent)

    def resolve(self, name: str) -> ServedModel:
        """The served model called ``name``; 404 naming those served."""
        name = name if name in self.models else self.aliases.get(name, name)
        if name not in self.models:
            raise APIError(404, f"The model {name!r} does not exist; served models: {', '.join(self.models)}",
                           "model", "model_not_found")
        return self.models[name]

    async def chat(self, req: P.ChatCompletionRequest, http: Request) -> Response:
        """``/v1/chat/completions``: the messages rendered by the model's chat template (as in
        training), answered whole (JSON) or streamed (SSE). Raises APIError (400, 404, 429, 503...)."""
        m = self._start(req, http)
        if not m.chat:
            raise APIError(400, f"model {m.name!r} has no chat template; use /v1/completions", "messages")
        try:
            conversation = req.conversation()
            if m.system_prompt and conversation and conversation[0]["role"] != "system":  # as trained and evaluated
                conversation = [{"role": "system", "content": m.system_prompt}] + conversation
            # never truncated here (too long is a 400); in a thread: a long prompt must not stall other requests
            ids = await asyncio.to_thread(encode_prompt, m.tokenizer, conversation, 10**9)
        except (ValueError, DataError) as e:
            raise APIError(400, str(e), "messages") from None
        handles = self._submit(m, [ids], req, req.token_limit())
        if req.stream:
            return _sse(self._chat_chunks(m, req, handles))
        outs = await self._collect(m, handles, http)
        choices = [P.ChatCompletionChoice(index=i, message=P.ResponseMessage(content=o.text),
                                          finish_reason=o.finish) for i, o in enumerate(outs)]  # type: ignore[arg-type]
        return JSONResponse(P.ChatCompletionResponse(model=m.name, choices=choices, usage=self._usage(m, handles)
                                                     ).model_dump())

    async def completion(self, req: P.CompletionRequest, http: Request) -> Response:
        """``/v1/completions``: each prompt (text, tokenized plainly, or token ids) continued; choice
        ``k * n + i`` is choice ``i`` of prompt ``k``. Raises APIError like ``chat``."""
        m = self._start(req, http)
        texts = req.prompts()
        encoded = await asyncio.to_thread(lambda: [encode_document(m.tokenizer, p) for p in texts if isinstance(p, str)])
        prompts = [p if isinstance(p, list) else encoded.pop(0) for p in texts]
        if any(not p for p in prompts):
            raise APIError(400, "a prompt is empty", "prompt")
        vocab = len(m.tokenizer)
        if any(not 0 <= t < vocab for p in prompts for t in p):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
        handles = self._submit(m, prompts, req, req.token_limit())
        if req.stream:
            return _sse(self._completion_chunks(m, req, handles))
        outs = await self._collect(m, handles, http)
        choices = [P.CompletionChoice(index=i, text=o.text, finish_reason=o.finish)  # type: ignore[arg-type]
                   for i, o in enumerate(outs)]
        return JSONResponse(P.CompletionResponse(model=m.name, choices=choices, usage=self._usage(m, handles)
                                                 ).model_dump())

    # ------------------------------------------------------------ shared steps

    def _start(self, req: P.ChatCompletionRequest | P.CompletionRequest, http: Request) -> ServedModel:
        m = self.resolve(req.model)
        http.state.model = m.name  # for the request metrics
        bad = req.unsupported()
        if bad:
            raise APIError(400, "; ".join(why for _, why in bad), bad[0][0], "unsupported_parameter")
        if req.n > self.settings.max_n:
            raise APIError(400, f"n is {req.n}; this server allows at most {self.settings.max_n}", "n")
        return m

    def _params(self, m: ServedModel, req: Any, prompt_tokens: int, asked: int | None) -> SamplingParams:
        """Sampling settings of one prompt, every limit checked (400 with the numbers)."""
        s, context = self.settings, m.engine.context_length
        limit = min(s.max_prompt_tokens or context - 1, context - 1)
        if prompt_tokens > limit:
            param = "messages" if isinstance(req, P.ChatCompletionRequest) else "prompt"
            raise APIError(400, f"the prompt has {prompt_tokens} tokens; the limit is {limit}", param,
                           "context_length_exceeded")
        if asked is not None and asked > s.max_tokens:
            raise APIError(400, f"max_tokens is {asked}; this server allows at most {s.max_tokens}", "max_tokens")
        if asked is not None and prompt_tokens + asked > context:
            raise APIError(400, f"the prompt ({prompt_tokens} tokens) plus max_tokens ({asked}) exceeds the model's "
                           f"context of {context} tokens", "max_tokens", "context_length_exceeded")
        return SamplingParams(max_tokens=asked or min(s.max_tokens, context - prompt_tokens),
                              temperature=1.0 if req.temperature is None else req.temperature,
                              top_p=1.0 if req.top_p is None else req.top_p, stop=req.stop_list(),
                              stop_ids=m.stop_ids, seed=req.seed, n=req.n)

    def _submit(self, m: ServedModel, prompts: list[list[int]], req: Any, asked: int | None) -> list[RequestHandle]:
        """Queue one engine request per prompt (all or none: 429 when the queue is full)."""
        params = [self._params(m, req, len(p), asked) for p in prompts]
        handles: list[RequestHandle] = []
        try:
            for p, sp in zip(prompts, params):
                handles.append(m.engine.submit(GenerationRequest(p, m.adapter, sp)))
        except QueueFull as e:
            raise APIError(429, f"server busy: {e}") from None
        except EngineClosed:
            raise APIError(503, "the server is shutting down") from None
        except EngineError as e:
            raise APIError(400, str(e)) from None
        finally:
            if len(handles) < len(prompts):
                for h in handles:
                    h.cancel()
        self.metrics.prompt_tokens.labels(m.name).inc(sum(h.prompt_tokens for h in handles))
        return handles

    def _usage(self, m: ServedModel, handles: list[RequestHandle]) -> P.UsageInfo:
        completion = sum(h.completion_tokens for h in handles)
        self.metrics.completion_tokens.labels(m.name).inc(completion)
        return P.UsageInfo.of(sum(h.prompt_tokens for h in handles), completion)

    async def _events(self, m: ServedModel, handles: list[RequestHandle], outs: list[_ChoiceOutput],
                      kind: str = "answers") -> AsyncIterator[tuple[int, str, bool]]:
        """(choice index, text to send, whether the choice has just finished) as the engine
        produces them, across all prompts (choice ``k * n + i`` is choice ``i`` of prompt ``k``);
        ends when every choice has finished. Cancels the engine requests if the consumer stops.
        Counted in ``in_flight[kind]`` (streams | answers) meanwhile."""
        n = handles[0].n
        self.in_flight[kind] += 1
        merged: asyncio.Queue[tuple[int, Delta]] = asyncio.Queue()

        async def pump(k: int, h: RequestHandle) -> None:
            async for d in h.stream():
                merged.put_nowait((k, d))

        tasks = [asyncio.create_task(pump(k, h)) for k, h in enumerate(handles)]
        t0, first = time.perf_counter(), True
        try:
            while any(o.finish is None for o in outs):
                k, d = await merged.get()
                if first and d.token_ids:
                    self.metrics.ttft.labels(m.name).observe(time.perf_counter() - t0)
                    first = False
                o = outs[k * n + d.index]
                was_open = o.finish is None
                text = o.add(d)
                if was_open and o.finish == "content_filter":
                    handles[k].cancel(d.index)  # a refused choice stops generating; its siblings go on
                yield k * n + d.index, text, was_open and o.finish is not None
        finally:
            self.in_flight[kind] -= 1
            for h in handles:
                h.cancel()
            for t in tasks:
                t.cancel()

    async def _collect(self, m: ServedModel, handles: list[RequestHandle], http: Request) -> list[_ChoiceOutput]:
        """Every choice's whole text; the engine requests are cancelled if the client goes away."""
        outs = [_ChoiceOutput(self.settings.output_filter) for _ in range(len(handles) * handles[0].n)]

        async def drain() -> None:
            async with contextlib.aclosing(self._events(m, handles, outs)) as events:
                async for _ in events:
                    pass

        work = asyncio.create_task(drain())
        gone = asyncio.create_task(_disconnected(http))
        done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if work not in done:
            work.cancel()
            raise APIError(499, "client disconnected")
        gone.cancel()
        work.result()
        for o in outs:
            _finish_reason(o)
        return outs

    async def _chat_chunks(self, m: ServedModel, req: P.ChatCompletionRequest,
                           handles: list[RequestHandle]) -> AsyncIterator[str]:
        outs = [_ChoiceOutput(self.settings.output_filter) for _ in range(req.n)]
        cid, created = P.new_id("chatcmpl"), P.now()

        def chunk(i: int, delta: P.DeltaMessage, finish: str | None = None) -> str:
            c = P.ChatCompletionChunk(id=cid, created=created, model=m.name, choices=[
                P.ChatCompletionStreamChoice(index=i, delta=delta, finish_reason=finish)])  # type: ignore[arg-type]
            return _data(c.model_dump())

        for i in range(req.n):
            yield chunk(i, P.DeltaMessage(role="assistant", content=""))
        async with contextlib.aclosing(self._events(m, handles, outs, "streams")) as events:
            async for i, text, finished in events:
                if text:
                    yield chunk(i, P.DeltaMessage(content=text))
                if finished:
                    yield chunk(i, P.DeltaMessage(), _finish_reason(outs[i], streaming=True))
        usage = self._usage(m, handles)
        if req.include_usage():
            last = P.ChatCompletionChunk(id=cid, created=created, model=m.name, choices=[], usage=usage)
            yield _data(last.model_dump())
        _check_not_cut(outs)

    async def _completion_chunks(self, m: ServedModel, req: P.CompletionRequest,
                                 handles: list[RequestHandle]) -> AsyncIterator[str]:
        outs = [_ChoiceOutput(self.settings.output_filter) for _ in range(len(handles) * req.n)]
        cid, created = P.new_id("cmpl"), P.now()
        async with contextlib.aclosing(self._events(m, handles, outs, "streams")) as events:
            async for i, text, finished in events:
                if text or finished:
                    finish = _finish_reason(outs[i], streaming=True) if finished else None
                    c = P.CompletionChoice(index=i, text=text, finish_reason=finish)  # type: ignore[arg-type]
                    yield _data(P.CompletionResponse(id=cid, created=created, model=m.name, choices=[c]).model_dump())
        usage = self._usage(m, handles)
        if req.include_usage():
            last = P.CompletionResponse(id=cid, created=created, model=m.name, choices=[], usage=usage)
            yield _data(last.model_dump())
        _check_not_cut(outs)


def _stop_ids(tokenizer: Any) -> tuple[tuple[int, ...], bool]:
    """The ids generation stops on, and whether the tokenizer has a chat template at all."""
    try:
        return chat_format(tokenizer).stop_ids, True
    except DataError:
        eos = tokenizer.eos_token_id
        return ((eos,) if isinstance(eos, int) else ()), False


def _finish_reason(o: _ChoiceOutput, streaming: bool = False) -> str | None:
    """The OpenAI finish_reason of a finished choice. APIError for an engine error (500), and for a
    choice the engine aborted (a shutdown) unless ``streaming``: a stream has sent part of the
    answer, so it ends that choice with ``length`` (OpenAI has no "abort"; the answer was cut
    short, as by max_tokens) and says why in an error event after it (``_check_not_cut``)."""
    if o.finish == "error":
        raise APIError(500, f"generation failed: {o.error}")
    if o.finish == "abort":
        if not streaming:
            raise APIError(503, SHUTDOWN_MESSAGE, code="server_shutting_down")
        return "length"
    return o.finish


def _check_not_cut(outs: list[_ChoiceOutput]) -> None:
    """At the end of a stream: the 503 error event when a shutdown cut any of its choices short."""
    if any(o.finish == "abort" for o in outs):
        raise APIError(503, SHUTDOWN_MESSAGE, code="server_shutting_down")


async def _disconnected(http: Request) -> None:
    """Returns when the client has gone away (the body is already read, so the next message is
    the disconnect)."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            return


def _data(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _sse(chunks: AsyncIterator[str]) -> StreamingResponse:
    """Server-sent events; an error after the stream has started is sent as an ``error`` event
    (the openai client raises it), then the stream ends as usual with ``[DONE]``."""

    async def framed() -> AsyncIterator[str]:
        try:
            async for c in chunks:
                yield c
        except APIError as e:
            yield _data(error_body(e.status, e.message, e.param, e.code))
        except Exception as e:  # noqa: BLE001 - the response has started: the client must still hear of it
            log.exception("stream failed")
            yield _data(error_body(500, f"internal error: {type(e).__name__}"))
        yield "data: [DONE]\n\n"

    return StreamingResponse(framed(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---------------------------------------------------------------- the app


def create_app(groups: Sequence[ServedGroup], settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app serving ``groups`` (one engine each, started now; drained and stopped at
    the app's shutdown). ``app.state.serving`` is the ``OpenAIServing``. Raises ServeError for
    invalid settings or nothing to serve."""
    settings = settings or ServeSettings()
    serving = OpenAIServing(groups, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        # GracefulServer has let requests in flight finish (shutdown_timeout) and ended the rest
        await asyncio.to_thread(serving.shutdown, True, settings.shutdown_timeout)

    app = FastAPI(title="tunesmith", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serving, app.state.metrics = serving, serving.metrics
    install_error_handlers(app)
    _add_routes(app, serving)
    app.add_middleware(_Guard, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes,
                       metrics=serving.metrics)
    app.add_middleware(_Observe, metrics=serving.metrics)  # added last: outermost, sees every answer
    return app


def _add_routes(app: FastAPI, serving: OpenAIServing) -> None:
    @app.get("/health")
    async def health() -> Response:
        ok = all(e.running for e in serving.engines.values())
        return JSONResponse({"status": "ok" if ok else "engine stopped"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(serving.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse(serving.model_list().model_dump())

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> Response:
        return JSONResponse(serving.model_card(serving.resolve(name)).model_dump())

    @app.post("/v1/chat/completions")
    async def chat(req: P.ChatCompletionRequest, http: Request) -> Response:
        return await serving.chat(req, http)

    @app.post("/v1/completions")
    async def completions(req: P.CompletionRequest, http: Request) -> Response:
        return await serving.completion(req, http)


def check_bind(host: str, api_key: str | None) -> None:
    """ServeError when ``host`` is reachable from other machines and no API key is set."""
    if api_key:
        return
    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise ServeError(f"refusing to serve on {host} without an API key: anyone who can reach this address could "
                         f"use the models. Pass --api-key (or set {API_KEY_ENV}), or serve on 127.0.0.1")


def check_port(host: str, port: int) -> None:
    """Raise ServeError when ``port`` is no port number or is already taken on ``host``: checked
    before any model is loaded, so the user hears it at once (not as a traceback after loading)."""
    if not 0 <= port <= 65535:
        raise ServeError(f"--port {port}: a port is a number from 0 to 65535, e.g. 8000")
    address = host.strip("[]")
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a port in TIME_WAIT is free
        try:
            s.bind((address, port))
        except OSError as e:
            raise ServeError(f"cannot listen on {host}:{port}: {e.strerror or e} (is another server there? choose "
                             "another --port)") from None


def serve(run_dirs: Sequence[str | Path], model: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, **limits: Any) -> None:
    """Load the runs (and/or the base ``model``), and serve them until SIGINT/SIGTERM (requests in
    flight then get ``shutdown_timeout`` seconds, see ``GracefulServer``).

    ``api_key`` defaults to $TUNESMITH_API_KEY. ``limits``: fields of ``ServeSettings``
    (``max_tokens=...``, ``output_filter=...``, ``shutdown_timeout=...``). Raises ServeError
    (public address without a key, unknown limit, nothing to serve), RunError/ModelError from loading.
    """
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    check_bind(host, api_key)
    check_port(host, port)
    known = {f.name for f in fields(ServeSettings)} - {"api_key"}
    unknown = sorted(set(limits) - known)
    if unknown:
        raise ServeError(f"unknown serve settings {unknown}; known: {', '.join(sorted(known))}")
    settings = ServeSettings(api_key=api_key, **limits)
    settings.check()
    if not run_dirs and model is None:
        raise ServeError("nothing to serve: give run folders, or a base model (--model default)")
    app = create_app(_load_with_one_thread(list(run_dirs), model), settings)
    config = uvicorn.Config(app, host=host, port=port, log_level="info")
    logging.getLogger("uvicorn.error").info(  # uvicorn's logger: configured (visible) by now
        "serving %s at http://%s:%d/v1%s", ", ".join(app.state.serving.models), host, port,
        "" if api_key else " (no API key: this machine only)")
    GracefulServer(config).run()


def _load_with_one_thread(run_dirs: list[str | Path], model: str | None) -> list[ServedGroup]:
    """``load_for_serving`` with one torch thread in this thread: it then starts no OpenMP team
    of its own, and the engines' threads (which decode with the count set before) run at full
    speed (see ``generation.engine.Engine``: a second team cost ~25% per decoding step)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return load_for_serving(run_dirs, base=model)
    finally:
        torch.set_num_threads(n)


class GracefulServer(uvicorn.Server):
    """uvicorn's server for an app of ``create_app``, with a shutdown (SIGTERM, Ctrl-C) that ends
    what is still running properly instead of cutting it.

    uvicorn stops accepting connections, then waits for the requests in flight. After the app's
    ``shutdown_timeout`` this ends them: every engine aborts its requests at its next step, so each
    open stream sends a finish chunk (finish_reason ``length``), an error event (503) and
    ``[DONE]``, and each request waiting for a whole answer gets a 503 in OpenAI's shape; one log
    line says how many. (uvicorn's own ``timeout_graceful_shutdown``, set here a little longer,
    would cancel the tasks instead: streams cut without an end, a CancelledError traceback.)
    """

    END_SECONDS = 10  # time the ended requests get to send their last bytes before uvicorn cancels them

    def __init__(self, config: uvicorn.Config) -> None:
        self.serving: OpenAIServing = config.app.state.serving
        config.timeout_graceful_shutdown = math.ceil(self.serving.settings.shutdown_timeout) + self.END_SECONDS
        super().__init__(config)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        ender = asyncio.create_task(self._end_after_grace())
        try:
            await super().shutdown(sockets)
        finally:
            ender.cancel()

    async def _end_after_grace(self) -> None:
        grace = self.serving.settings.shutdown_timeout
        await asyncio.sleep(grace)
        streams, answers = self.serving.in_flight["streams"], self.serving.in_flight["answers"]
        await asyncio.to_thread(self.serving.shutdown, False, self.END_SECONDS)
        if streams or answers:
            logging.getLogger("uvicorn.error").warning(
                "shutdown: %g s grace period over; ended %d open stream%s and %d unfinished whole answer%s with 503",
                grace, streams, "" if streams == 1 else "s", answers, "" if answers == 1 else "s")
