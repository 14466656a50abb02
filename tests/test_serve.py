"""``tunesmith serve`` end to end: the real server (uvicorn, 127.0.0.1, a free port, a background
thread) talked to with the official ``openai`` client, on the tiny finished runs.

Answers are checked against each model's greedy answer computed alone (transformers' own
``generate`` with that adapter), so mixed-adapter batching through HTTP is tested for exactness.
Output-filter and slot-freeing tests use ``ScriptedLM``, a stand-in model whose answer is fixed
(an email to redact, a long slow answer to hang up on), run by the same engine.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import random
import re
import socket
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace

import openai
import pytest
import torch
import uvicorn

from conftest import generate_alone
from tunesmith.data.render import chat_format, encode_prompt
from tunesmith.deploy.loading import ServedGroup, load_for_serving
from tunesmith.deploy.safety import BlockRule, OutputFilter
from tunesmith.deploy.server import GracefulServer, ServeError, ServeSettings, check_bind, create_app, serve

KEY = "test-key-123"
HELLO = [{"role": "user", "content": "Say hello 3"}]
QUESTION = [{"role": "user", "content": "Who can I write to?"}]
EMAIL_ANSWER = "Sure: write to bob.smith@example.com and say hi. The secret plan is fine."


# ---------------------------------------------------------------- helpers


@contextlib.contextmanager
def running(app) -> Iterator[SimpleNamespace]:
    """``app`` served by uvicorn on 127.0.0.1 (a free port) in a background thread."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=10)
    server = GracefulServer(config) if hasattr(app.state, "serving") else uvicorn.Server(config)  # serve's, or the dashboard
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.01)
    try:
        yield SimpleNamespace(port=port, server=server, thread=thread, app=app,
                              url=f"http://127.0.0.1:{port}", serving=getattr(app.state, "serving", None))
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def client(srv, key: str | None = KEY, timeout: float = 60) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key or "none", max_retries=0, timeout=timeout)


def raw(srv, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
        key: str | None = KEY) -> tuple[int, dict | str]:
    """A plain HTTP request (for what the openai client cannot send); (status, JSON or text)."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    h = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    conn.request(method, path, body=body, headers=h)
    resp = conn.getresponse()
    data = resp.read().decode()
    conn.close()
    try:
        return resp.status, json.loads(data)
    except json.JSONDecodeError:
        return resp.status, data


def assert_openai_error(body, status: int, *words: str) -> None:
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    for w in words:
        assert w in body["error"]["message"], body


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of the first sample ``name`` whose labels include ``labels`` (Prometheus text)."""
    for line in text.splitlines():
        m = re.match(r"(\w+)(?:\{(.*)\})? (\S+)$", line)
        if m and m.group(1) == name:
            got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            if all(got.get(k) == v for k, v in labels.items()):
                return float(m.group(3))
    return None


def assert_healthy(srv) -> None:
    status, body = raw(srv, "GET", "/health", key=None)
    assert status == 200 and body == {"status": "ok"}


def reference_text(group, ids: list[int], adapter: str | None, max_tokens: int) -> str:
    """transformers' greedy generate on this prompt alone with this adapter alone, as text."""
    tok = group.tokenizer
    out = generate_alone(group.model, ids, adapter, max_tokens, list(chat_format(tok).stop_ids), tok.pad_token_id)
    return tok.decode(out, skip_special_tokens=True)


class ScriptedLM(torch.nn.Module):
    """A stand-in causal LM: to a prompt of ``prompt_len`` tokens it answers ``script`` (token
    ids), then ``stop_id``; each forward pass takes ``delay`` seconds. Only the output is fake:
    the engine, the server and the filter run as for a real model."""

    def __init__(self, script: list[int], prompt_len: int, vocab: int, stop_id: int, delay: float = 0.0) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # the engine reads the device from a parameter
        self.config = SimpleNamespace(max_position_embeddings=4096)
        self.script, self.prompt_len, self.vocab, self.stop_id, self.delay = script, prompt_len, vocab, stop_id, delay
        self.fail = False

    def forward(self, input_ids, attention_mask, position_ids, **kw):
        if self.fail:
            raise RuntimeError("scripted failure")
        time.sleep(self.delay)
        k = (position_ids[:, -1] - self.prompt_len + 1).tolist()  # which answer token each row is at
        ids = [self.script[i] if 0 <= i < len(self.script) else self.stop_id for i in k]
        logits = torch.full((len(ids), 1, self.vocab), -1e4)
        logits[torch.arange(len(ids)), 0, torch.tensor(ids)] = 0.0
        return SimpleNamespace(logits=logits)


def scripted(tokenizer, name: str, answer: str, delay: float = 0.0) -> ServedGroup:
    script = tokenizer(answer, add_special_tokens=False)["input_ids"]
    n_prompt = len(encode_prompt(tokenizer, QUESTION, 10**6))
    model = ScriptedLM(script, n_prompt, len(tokenizer), chat_format(tokenizer).stop_ids[0], delay)
    return ServedGroup(model, tokenizer, {name: None}, "scripted")


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def group(finished_runs):
    (g,) = load_for_serving([finished_runs["alpha-lora"], finished_runs["beta-lora"]])
    return g


@pytest.fixture(scope="module")
def base_name(group):
    return next(n for n, a in group.names.items() if a is None)


@pytest.fixture(scope="module")
def expected(group, base_name):
    """Greedy answers computed alone, before any server shares the model."""
    tok = group.tokenizer
    chat_ids = encode_prompt(tok, HELLO, 10**6)
    plain_ids = tok("the quick brown fox")["input_ids"]
    out = {}
    for name, adapter in group.names.items():
        out[("chat", name)] = reference_text(group, chat_ids, adapter, 12)
        out[("text", name)] = reference_text(group, plain_ids, adapter, 12)
    return out


@pytest.fixture(scope="module")
def srv(group, expected):
    settings = ServeSettings(api_key=KEY, max_body_bytes=32_000, max_prompt_tokens=120, max_tokens=64, max_n=4,
                             max_batch_size=16, max_waiting=64)
    with running(create_app([group], settings)) as s:
        yield s


@pytest.fixture(scope="module")
def scripted_srv(tokenizer):
    """Scripted models behind the PII filter: one answering with an email, one slow and long;
    one row and one waiting request per engine, so slots and the queue are easy to fill."""
    groups = [scripted(tokenizer, "emailer", EMAIL_ANSWER),
              scripted(tokenizer, "slowpoke", "la " * 200, delay=0.02)]
    settings = ServeSettings(max_batch_size=1, max_waiting=1, max_n=1, max_tokens=1000, output_filter=OutputFilter())
    with running(create_app(groups, settings)) as s:
        yield s


# ---------------------------------------------------------------- the API


def test_models_lists_every_served_name(srv, base_name):
    models = client(srv).models.list().data
    assert {m.id for m in models} == {base_name, "alpha-lora", "beta-lora"}
    assert {m.id: getattr(m, "parent", None) for m in models}["alpha-lora"] == base_name
    assert client(srv).models.retrieve("beta-lora").id == "beta-lora"


def test_chat_adapters_and_base_in_one_session_equal_each_alone(srv, group, expected):
    c = client(srv)
    n_prompt = len(encode_prompt(group.tokenizer, HELLO, 10**6))
    for name in ["alpha-lora", "beta-lora", next(iter(group.names)), "alpha-lora"]:
        r = c.chat.completions.create(model=name, messages=HELLO, temperature=0, max_tokens=12)
        assert r.model == name and r.object == "chat.completion"
        assert r.choices[0].message.content == expected[("chat", name)], name
        assert r.choices[0].finish_reason in ("stop", "length")
        assert r.usage.prompt_tokens == n_prompt and r.usage.total_tokens == n_prompt + r.usage.completion_tokens
    assert len({expected[("chat", n)] for n in group.names}) == 3  # the three models really differ


def test_completion_is_plain_text(srv, group, expected):
    c = client(srv)
    for name in group.names:
        r = c.completions.create(model=name, prompt="the quick brown fox", temperature=0, max_tokens=12)
        assert r.choices[0].text == expected[("text", name)]
    r = c.completions.create(model="beta-lora", prompt=["the quick brown fox", "the quick brown fox"], n=2,
                             temperature=0, max_tokens=12)
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    assert {ch.text for ch in r.choices} == {expected[("text", "beta-lora")]}


def test_chat_streaming_equals_whole_answer(srv, expected):
    stream = client(srv).chat.completions.create(model="beta-lora", messages=HELLO, temperature=0, max_tokens=12,
                                                 stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == expected[("chat", "beta-lora")]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_completion_streaming(srv, expected):
    stream = client(srv).completions.create(model="alpha-lora", prompt="the quick brown fox", temperature=0,
                                            max_tokens=12, stream=True)
    assert "".join(ch.choices[0].text for ch in stream) == expected[("text", "alpha-lora")]


def test_seeded_sampling_reproducible(srv):
    c = client(srv)
    a, b = (c.chat.completions.create(model="alpha-lora", messages=HELLO, temperature=1.0, seed=11, n=2, max_tokens=10)
            for _ in range(2))
    assert [x.message.content for x in a.choices] == [x.message.content for x in b.choices]


def test_concurrent_requests_are_batched_and_exact(srv, group, expected):
    names = list(group.names) * 3
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        r = client(srv).chat.completions.create(model=names[i], messages=HELLO, temperature=0, max_tokens=12)
        results[i] = r.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(names))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [results[i] for i in range(len(names))] == [expected[("chat", n)] for n in names]
    assert srv.serving.engines[next(iter(srv.serving.engines))].snapshot().max_rows > 1


# ---------------------------------------------------------------- refusals, each in OpenAI's shape


def test_wrong_or_missing_key_is_401(srv):
    with pytest.raises(openai.AuthenticationError):
        client(srv, key="wrong").models.list()
    status, body = raw(srv, "GET", "/v1/models", key=None)
    assert status == 401
    assert_openai_error(body, 401, "API key")
    assert_healthy(srv)  # /health needs no key


def test_oversize_body_is_413(srv):
    big = json.dumps({"model": "alpha-lora", "messages": [{"role": "user", "content": "x" * 40_000}]}).encode()
    status, body = raw(srv, "POST", "/v1/chat/completions", big)
    assert status == 413
    assert_openai_error(body, 413, "32000")
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)  # chunked: no Content-Length to check
    conn.request("POST", "/v1/chat/completions", body=iter([big[:20_000], big[20_000:]]),
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}, encode_chunked=True)
    resp = conn.getresponse()
    assert resp.status == 413
    assert_openai_error(json.loads(resp.read()), 413)
    conn.close()
    assert_healthy(srv)


@pytest.mark.parametrize("kwargs,param,words", [
    ({"messages": [{"role": "user", "content": "the quick brown fox " * 40}]}, "messages", ["tokens", "120"]),
    ({"max_tokens": 65}, "max_tokens", ["65", "64"]),
    ({"n": 5}, "n", ["5", "4"]),
    ({"logprobs": True}, "logprobs", ["not supported"]),
    ({"temperature": 3.0}, "temperature", []),
])
def test_limits_are_400(srv, kwargs, param, words):
    args = {"model": "alpha-lora", "messages": HELLO, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        client(srv).chat.completions.create(**args)
    assert e.value.status_code == 400
    assert_openai_error(e.value.body and {"error": e.value.body}, 400, *words)
    assert e.value.body["param"] == param
    assert_healthy(srv)


def test_bad_json_and_unknown_fields(srv):
    status, body = raw(srv, "POST", "/v1/chat/completions", b"{not json")
    assert status == 400
    assert_openai_error(body, 400)
    assert body["error"]["message"] == "invalid JSON at character 1: expecting property name enclosed in double quotes"
    assert body["error"]["param"] is None
    r = client(srv).chat.completions.create(model="alpha-lora", messages=HELLO, max_tokens=2,
                                            extra_body={"some_future_field": {"x": 1}})
    assert r.choices[0].message.content is not None  # unknown fields are ignored
    status, body = raw(srv, "GET", "/v1/nowhere")
    assert status == 404
    assert_openai_error(body, 404, "no such endpoint: GET /v1/nowhere")
    assert_healthy(srv)


@pytest.mark.parametrize("body,message,param", [
    ('{"model": "alpha-lora", "messages": [}', "invalid JSON at character 37: expecting value", None),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "missing required parameter 'model'", "model"),
    ('{"model": "alpha-lora", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}',
     "invalid value for 'max_tokens': should be a valid integer, unable to parse string as an integer (got \"ten\")",
     "max_tokens"),
    ('{"model": "alpha-lora", "messages": [{"role": "bot", "content": "hi"}]}',
     "invalid value for 'messages[0].role': should be 'system', 'developer', 'user' or 'assistant' (got \"bot\")",
     "messages[0].role"),
    ('{"model": "alpha-lora", "messages": [{"role": "user", "content": 5}]}',
     "invalid value for 'messages[0].content': should be a valid string or a valid list (got 5)", "messages[0].content"),
    ('{"model": "alpha-lora", "messages": [{"role": "user", "content": [{"text": "hi"}]}]}',
     "missing required parameter 'messages[0].content[0].type'", "messages[0].content[0].type"),
    ('{"model": "alpha-lora", "messages": [{"role": "user", "content": "hi"}], "stop": ["a", ""]}',
     "invalid value for 'stop': stop sequences must not be empty", "stop"),
    ('{"model": "alpha-lora", "messages": []}', "invalid value for 'messages': should have at least 1 item, not 0",
     "messages"),
    ('[1, 2]', "the request body must be a JSON object", None),
])
def test_invalid_requests_are_explained_in_plain_words(srv, body, message, param):
    """Each message names the field as the client wrote it; none of FastAPI's or pydantic's own
    words (a character offset as the param, 'Value error,', union branch names such as 'str')."""
    status, got = raw(srv, "POST", "/v1/chat/completions", body.encode())
    assert status == 400
    assert_openai_error(got, 400)
    assert (got["error"]["message"], got["error"]["param"]) == (message, param)


def test_unknown_model_is_404_naming_the_served_ones(srv, base_name):
    with pytest.raises(openai.NotFoundError) as e:
        client(srv).chat.completions.create(model="gpt-4o", messages=HELLO)
    msg = e.value.body["message"]
    assert "gpt-4o" in msg and "alpha-lora" in msg and "beta-lora" in msg and base_name in msg
    assert e.value.body["code"] == "model_not_found"
    assert_healthy(srv)


def test_metrics(srv):
    c = client(srv)
    c.chat.completions.create(model="alpha-lora", messages=HELLO, temperature=0, max_tokens=3)
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope", messages=HELLO)
    with pytest.raises(openai.AuthenticationError):
        client(srv, key="wrong").models.list()
    status, text = raw(srv, "GET", "/metrics")
    assert status == 200
    assert metric(text, "tunesmith_requests_total", model="alpha-lora", endpoint="/v1/chat/completions", status="200")
    assert metric(text, "tunesmith_requests_total", model="", endpoint="/v1/chat/completions", status="404")
    assert metric(text, "tunesmith_errors_total", status="404", code="model_not_found")
    assert metric(text, "tunesmith_errors_total", status="401", code="invalid_api_key")
    assert metric(text, "tunesmith_requests_total", model="", endpoint="/v1/models", status="401")
    assert metric(text, "tunesmith_prompt_tokens_total", model="alpha-lora") > 0
    assert metric(text, "tunesmith_completion_tokens_total", model="alpha-lora") > 0
    assert metric(text, "tunesmith_request_latency_seconds_count", model="alpha-lora") > 0
    assert metric(text, "tunesmith_time_to_first_token_seconds_count", model="alpha-lora") > 0
    for gauge in ("tunesmith_queue_depth", "tunesmith_running_batch_size", "tunesmith_engine_steps_total",
                  "tunesmith_max_batch_size_seen"):
        assert metric(text, gauge) is not None, gauge
    assert raw(srv, "GET", "/metrics", key=None)[0] == 401


# ---------------------------------------------------------------- the output filter, slots, shutdown


def test_email_redacted_whole_and_streamed(scripted_srv):
    c = client(scripted_srv)
    want = "Sure: write to [EMAIL] and say hi. The secret plan is fine."
    r = c.chat.completions.create(model="emailer", messages=QUESTION, max_tokens=200)
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
    pieces = [ch.choices[0].delta.content or "" for ch in
              c.chat.completions.create(model="emailer", messages=QUESTION, max_tokens=200, stream=True)
              if ch.choices]
    assert "".join(pieces) == want
    assert not any("@" in p or "bob" in p for p in pieces)  # no piece of the address ever left the server
    _, metrics = raw(scripted_srv, "GET", "/metrics")
    assert metric(metrics, "tunesmith_output_filtered_total", kind="email") >= 2


def test_refuse_rule_ends_with_content_filter(tokenizer):
    f = OutputFilter(rules=[BlockRule.words("secrets", ["secret plan"])], action="refuse")
    with running(create_app([scripted(tokenizer, "emailer", EMAIL_ANSWER)], ServeSettings(output_filter=f))) as s:
        c = client(s)
        r = c.chat.completions.create(model="emailer", messages=QUESTION, max_tokens=200)
        assert r.choices[0].finish_reason == "content_filter"
        assert r.choices[0].message.content == "Sure: write to [EMAIL] and say hi. The "
        chunks = [ch for ch in c.chat.completions.create(model="emailer", messages=QUESTION, max_tokens=200,
                                                         stream=True) if ch.choices]
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == r.choices[0].message.content
        assert chunks[-1].choices[0].finish_reason == "content_filter"
        wait_idle(s.serving.engines["emailer"])


def wait_idle(engine, seconds: float = 10) -> None:
    deadline = time.time() + seconds
    while engine.snapshot().running or engine.snapshot().waiting:
        assert time.time() < deadline, engine.snapshot()
        time.sleep(0.02)


def test_disconnect_mid_stream_frees_the_slot(scripted_srv):
    engine = scripted_srv.serving.engines["slowpoke"]
    before = engine.snapshot().generated_tokens
    stream = client(scripted_srv).chat.completions.create(model="slowpoke", messages=QUESTION, max_tokens=600,
                                                          stream=True)
    it = iter(stream)
    for _ in range(4):
        next(it)
    assert engine.snapshot().running == 1
    stream.close()  # the client hangs up
    wait_idle(engine)
    assert engine.snapshot().generated_tokens - before < 100  # stopped long before the answer's ~200 tokens
    assert_healthy(scripted_srv)


def test_disconnect_while_waiting_for_a_whole_answer_frees_the_slot(scripted_srv):
    engine = scripted_srv.serving.engines["slowpoke"]
    with pytest.raises(openai.APITimeoutError):
        client(scripted_srv, timeout=0.5).chat.completions.create(model="slowpoke", messages=QUESTION, max_tokens=600)
    wait_idle(engine)
    assert_healthy(scripted_srv)


def test_queue_full_is_429(scripted_srv):
    engine = scripted_srv.serving.engines["slowpoke"]
    c = client(scripted_srv)
    running_ = c.chat.completions.create(model="slowpoke", messages=QUESTION, max_tokens=600, stream=True)
    next(iter(running_))  # holds the only row
    waiting = c.chat.completions.create(model="slowpoke", messages=QUESTION, max_tokens=600, stream=True)
    deadline = time.time() + 10
    while engine.snapshot().waiting < 1:
        assert time.time() < deadline
        time.sleep(0.01)
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model="slowpoke", messages=QUESTION, max_tokens=5)
    assert e.value.status_code == 429 and "busy" in e.value.body["message"]
    assert c.chat.completions.create(model="emailer", messages=QUESTION).choices  # another engine is free
    running_.close()
    waiting.close()
    wait_idle(engine)


def test_engine_failure_is_500_and_the_server_lives_on(tokenizer):
    g = scripted(tokenizer, "flaky", "fine thanks")
    with running(create_app([g], ServeSettings())) as s:
        g.model.fail = True
        with pytest.raises(openai.InternalServerError):
            client(s).chat.completions.create(model="flaky", messages=QUESTION)
        with pytest.raises(openai.APIError, match="generation failed"):
            list(client(s).chat.completions.create(model="flaky", messages=QUESTION, stream=True))
        g.model.fail = False
        assert client(s).chat.completions.create(model="flaky", messages=QUESTION).choices[0].message.content == \
            "fine thanks"
        assert_healthy(s)


def test_graceful_shutdown_finishes_requests_in_flight(tokenizer):
    """What SIGTERM does (uvicorn sets ``should_exit``): the stream in flight still ends whole."""
    g = scripted(tokenizer, "slow", "la " * 30, delay=0.02)
    with running(create_app([g], ServeSettings())) as s:
        stream = client(s).chat.completions.create(model="slow", messages=QUESTION, stream=True)
        it = iter(stream)
        next(it)
        s.server.should_exit = True  # the SIGTERM handler's whole job
        rest = list(it)
        s.thread.join(30)
        assert not s.thread.is_alive()
        assert not s.serving.engines["slow"].running  # the lifespan shutdown stopped the engine
    assert "".join(ch.choices[0].delta.content or "" for ch in rest if ch.choices) == "la " * 30
    assert rest[-1].choices[0].finish_reason == "stop"


def test_shutdown_ends_what_the_grace_period_did_not_finish(tokenizer):
    """After shutdown_timeout, a stream still running ends with a finish chunk (length), a 503 error
    event and [DONE]; a request waiting for a whole answer gets a 503; nothing is cut."""
    g = scripted(tokenizer, "slow", "la " * 400, delay=0.02)
    with running(create_app([g], ServeSettings(shutdown_timeout=0.5))) as s:
        c = client(s)
        stream = c.chat.completions.create(model="slow", messages=QUESTION, max_tokens=1000, stream=True,
                                           stream_options={"include_usage": True})
        it = iter(stream)
        first = next(it)
        whole: dict = {}
        waiting = threading.Thread(target=lambda: whole.update(zip(("status", "body"), raw(
            s, "POST", "/v1/chat/completions", json.dumps({"model": "slow", "messages": QUESTION}).encode()))))
        waiting.start()
        deadline = time.time() + 10
        while s.serving.in_flight["answers"] < 1:
            assert time.time() < deadline
            time.sleep(0.01)
        s.server.should_exit = True  # what SIGTERM does
        chunks = [first]
        with pytest.raises(openai.APIError, match="shutting down") as e:
            for ch in it:
                chunks.append(ch)
        waiting.join(30)
        s.thread.join(30)
        assert not s.thread.is_alive()
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finish == ["length"] and chunks[-1].usage.completion_tokens < 400  # then the usage, then the error
    assert e.value.body["code"] == "server_shutting_down"
    assert whole["status"] == 503
    assert_openai_error(whole["body"], 503, "shutting down")


# ---------------------------------------------------------------- startup checks


def test_public_address_needs_a_key(monkeypatch):
    with pytest.raises(ServeError, match="api-key"):
        check_bind("0.0.0.0", None)
    check_bind("0.0.0.0", "k")
    check_bind("127.0.0.1", None)
    check_bind("::1", None)
    check_bind("localhost", None)
    monkeypatch.delenv("TUNESMITH_API_KEY", raising=False)
    with pytest.raises(ServeError, match="without an API key"):
        serve([], model="default", host="0.0.0.0")


def test_serve_rejects_unknown_limits_and_nothing_to_serve():
    with pytest.raises(ServeError, match="max_tokenz"):
        serve([], model="default", max_tokenz=5)
    with pytest.raises(ServeError, match="nothing to serve"):
        serve([])
    with pytest.raises(ServeError, match="max_n"):
        serve([], model="default", max_n=0)


# ---------------------------------------------------------------- the filter alone


TEXTS = ["Sure! Write to bob.smith@example.com or call +1 (415) 555-2671 okay.",
         "My card is 4111 1111 1111 1111 and IBAN GB82 WEST 1234 5698 7654 32 thanks",
         "server at 192.168.1.20 is down; darn it, the secret plan is ready",
         "no personal data here at all, just words and more words"]


@pytest.mark.parametrize("action", ["redact", "refuse"])
def test_stream_filter_equals_whole_filter_for_any_split(action):
    """However the answer is cut into deltas, the streamed text is the whole text filtered: so no
    piece of a hidden span is ever sent (what is sent is never taken back)."""
    f = OutputFilter(rules=[BlockRule.words("words", ["darn", "secret plan"])], action=action)
    rng = random.Random(0)
    for text in TEXTS:
        whole = f.apply(text)
        for _ in range(100):
            cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 30)))
            s, sent, refused = f.stream(), [], False
            for a, b in zip([0] + cuts, cuts + [len(text)]):
                out = s.feed(text[a:b])
                sent.append(out.text)
                if out.refused:
                    refused = True
                    break
            if not refused:
                sent.append(s.close().text)
            assert "".join(sent) == whole.text and refused == whole.refused


def test_filter_rules_and_counts():
    f = OutputFilter(pii_kinds=["email"], rules=[BlockRule.regex("ticket", r"TICKET-\d+"),
                                                 BlockRule.words("w", ["Darn"])], placeholder="[X]")
    out = f.apply("darn, TICKET-42 from a@b.io; darned is fine")
    assert out.text == "[X], [X] from [EMAIL]; darned is fine"
    assert out.counts == {"w": 1, "ticket": 1, "email": 1} and f.totals() == {"w": 1, "ticket": 1, "email": 1}
    with pytest.raises(ValueError, match="action"):
        OutputFilter(action="shout")
    with pytest.raises(ValueError, match="unknown PII kinds"):
        OutputFilter(pii_kinds=["emails"])
    with pytest.raises(ValueError, match="regex"):
        BlockRule.regex("bad", "(")


# ---------------------------------------------------------------- SIGTERM to a real `tunesmith serve`


@pytest.fixture
def endless_model_dir(tmp_path, tokenizer):
    """A tiny Llama that never stops: its final norm is zero, so every logit is 0 and greedy decoding
    picks token 0 (``<|endoftext|>``, not a stop token) again and again, for a context of 65536."""
    from conftest import make_model

    model = make_model(len(tokenizer))
    model.config.max_position_embeddings = 65536  # rotary positions are computed, not tabled
    with torch.no_grad():
        model.model.norm.weight.zero_()
    model.save_pretrained(tmp_path / "endless")
    tokenizer.save_pretrained(tmp_path / "endless")
    return tmp_path / "endless"


def test_sigterm_ends_open_streams_and_waiting_requests_properly(endless_model_dir):
    """``tunesmith serve`` in its own process, SIGTERM while two streams and a whole answer run:
    after --shutdown-timeout each stream sends a finish chunk, an error event and [DONE]; the
    whole answer is a 503 in OpenAI's shape; one log line counts them; no traceback."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith", "serve", "--model", str(endless_model_dir), "--port",
                             str(port), "--max-tokens", "60000", "--shutdown-timeout", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    srv = SimpleNamespace(port=port, url=f"http://127.0.0.1:{port}")
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None and time.time() < deadline, "the server did not start"
            with contextlib.suppress(OSError):
                if raw(srv, "GET", "/health", key=None)[0] == 200:
                    break
            time.sleep(0.2)
        model = client(srv).models.list().data[0].id
        body = {"model": model, "messages": HELLO, "max_tokens": 50000, "temperature": 0}
        got: dict = {}
        started = threading.Barrier(3)

        def raw_stream() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": True}),
                         {"Content-Type": "application/json"})
            resp = conn.getresponse()
            first = resp.readline()
            started.wait()
            got["raw"] = (first + resp.read()).decode()

        def openai_stream() -> None:
            it = iter(client(srv).chat.completions.create(**body, stream=True))
            got["chunks"] = [next(it)]
            started.wait()
            try:
                for ch in it:
                    got["chunks"].append(ch)
            except openai.APIError as e:
                got["error"] = e

        threads = [threading.Thread(target=raw_stream), threading.Thread(target=openai_stream),
                   threading.Thread(target=lambda: got.update(whole=raw(srv, "POST", "/v1/chat/completions",
                                                                        json.dumps(body).encode())))]
        for t in threads[:2]:
            t.start()
        started.wait(60)
        threads[2].start()
        time.sleep(1.0)  # the whole answer is waiting for the engine too
        sent = time.time()
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        log = proc.communicate(timeout=60)[0]
        took = time.time() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    events = [line[6:] for line in got["raw"].splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    finish, error = json.loads(events[-3]), json.loads(events[-2])
    assert finish["choices"][0]["finish_reason"] == "length" and not any(finish["choices"][0]["delta"].values())
    assert_openai_error(error, 503, "shutting down")
    assert error["error"]["code"] == "server_shutting_down"
    assert got["chunks"][-1].choices[0].finish_reason == "length" and "shutting down" in str(got["error"])
    status, whole = got["whole"]
    assert status == 503
    assert_openai_error(whole, 503, "shutting down")
    assert "shutdown: 1 s grace period over; ended 2 open streams and 1 unfinished whole answer with 503" in log, log
    assert "Traceback" not in log and "CancelledError" not in log, log
    assert 1 <= took < 15, took


def test_a_run_trained_with_a_system_prompt_is_served_with_it(finished_runs, tmp_path):
    """Training and evaluation put the run's system prompt first, so serving does too when the
    request brings no system message; a request's own system message replaces it; the base gets none."""
    import shutil

    import yaml

    run = tmp_path / "sys-lora"
    shutil.copytree(finished_runs["alpha-lora"], run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["name"] = "sys-lora"
    cfg["data"]["system_prompt"] = "Answer with one greeting."
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (g,) = load_for_serving([run])
    base = next(n for n, a in g.names.items() if a is None)
    tok = g.tokenizer
    question = [{"role": "user", "content": "Say hello 3"}]
    own = [{"role": "system", "content": "Be terse."}] + question
    with running(create_app([g], ServeSettings(api_key=KEY, max_tokens=4))) as s:
        c = client(s)

        def prompt_tokens(model, messages):
            return c.chat.completions.create(model=model, messages=messages, max_tokens=1, temperature=0).usage.prompt_tokens

        assert prompt_tokens("sys-lora", question) == len(encode_prompt(
            tok, [{"role": "system", "content": "Answer with one greeting."}] + question, 10**6))
        assert prompt_tokens("sys-lora", own) == len(encode_prompt(tok, own, 10**6))
        assert prompt_tokens(base, question) == len(encode_prompt(tok, question, 10**6))


def test_runs_on_one_base_with_different_templates_are_served_together(finished_runs, tmp_path):
    """A chat run beside a run with another chat template on the same base (a newcomer's alpaca run
    and task: text run): both served, the base once (it was 'served model names clash'); the base
    also answers to its config ``model:`` value (gemma3-270m for "gemma-3-270m (Q4_K_M)")."""
    import shutil

    import yaml

    from tunesmith.deploy.server import OpenAIServing

    other = tmp_path / "alpha-alpaca"
    shutil.copytree(finished_runs["alpha-lora"], other)
    cfg = yaml.safe_load((other / "config.yaml").read_text())
    cfg["name"], cfg["data"]["chat_template"] = "alpha-alpaca", "alpaca"
    (other / "config.yaml").write_text(yaml.safe_dump(cfg))
    groups = load_for_serving([finished_runs["alpha-lora"], other])
    names = [n for g in groups for n in g.names]
    assert len(groups) == 2 and len(names) == len(set(names)) == 3 and {"alpha-lora", "alpha-alpaca"} <= set(names)
    serving = OpenAIServing(groups, ServeSettings())
    try:
        base = next(n for g in groups for n in g.names if n not in g.runs)
        assert serving.resolve(groups[0].base).name == base and serving.resolve(base).name == base
        assert serving.resolve("alpha-alpaca").tokenizer.chat_template != serving.resolve("alpha-lora").tokenizer.chat_template
    finally:
        serving.shutdown(drain=False)
