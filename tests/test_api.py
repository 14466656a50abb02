"""The API baseline: the prompt method asking an OpenAI-compatible endpoint (a local server the test starts)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from tunesmith.api import ApiError, ApiModel
from tunesmith.cli import main
from tunesmith.config import ApiConfig

from test_cli import write_config

POSITIVE = ("funny", "stirring", "transporting", "finally")


@pytest.fixture
def server():
    """A chat-completions server: answers by keyword, wants `Bearer sekrit`, refuses its first call with a 429."""
    seen, state = [], {"calls": 0}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            state["calls"] += 1
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path != "/v1/chat/completions" or self.headers.get("Authorization") != "Bearer sekrit":
                return self.reply(401, {"error": {"message": "bad key"}})
            if state["calls"] == 1:
                return self.reply(429, {"error": {"message": "slow down"}}, {"Retry-After": "0"})
            seen.append(body)
            question = body["messages"][-1]["content"]
            answer = "Positive." if any(w in question for w in POSITIVE) else "I would say negative"
            self.reply(200, {"choices": [{"message": {"role": "assistant", "content": answer}}],
                             "usage": {"prompt_tokens": 40, "completion_tokens": 2, "total_tokens": 42}})

        def reply(self, code, doc, headers=None):
            data = json.dumps(doc).encode()
            self.send_response(code)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", seen
    httpd.shutdown()


def test_chat_retries_a_429_and_sends_greedy_requests(server, monkeypatch):
    url, seen = server
    monkeypatch.setenv("TEST_KEY", "sekrit")
    model = ApiModel(ApiConfig(base_url=url, model="big-model", api_key_env="TEST_KEY"))
    assert model.chat([{"role": "user", "content": "a funny film"}], 8) == "Positive."
    assert seen[0]["model"] == "big-model" and seen[0]["temperature"] == 0 and seen[0]["max_tokens"] == 8


def test_a_wrong_key_names_the_variable(server, monkeypatch):
    url, _ = server
    monkeypatch.setenv("TEST_KEY", "wrong")
    with pytest.raises(ApiError, match=r"HTTP 401 \(is \$TEST_KEY set\?\)"):
        ApiModel(ApiConfig(base_url=url, model="m", api_key_env="TEST_KEY")).chat([{"role": "user", "content": "x"}], 4)


def test_prompt_method_against_the_endpoint(server, monkeypatch, tmp_path, tiny_model_dir, sst_files):
    url, seen = server
    monkeypatch.setenv("TEST_KEY", "sekrit")
    path = write_config(tmp_path, tiny_model_dir, sst_files)
    cfg = yaml.safe_load(path.read_text())
    cfg["method"] = "prompt"
    cfg["prompt"] = {"shots": 2, "api": {"base_url": url, "model": "big-model", "api_key_env": "TEST_KEY"}}
    cfg["eval"]["bootstrap_resamples"] = 200
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 0
    run = tmp_path / "runs" / "tiny"
    ev = json.loads((run / "eval.json").read_text())
    assert len(seen) == ev["test_examples"] == 6
    assert all(len(b["messages"]) == 1 + 2 * 2 + 1 for b in seen)  # system, 2 shots (user + assistant), the question
    assert ev["tuned"]["invalid_rate"] == 0 and "loss" not in ev["tuned"]
    # latency: the evaluation's own request times, no extra (paid) requests; tokens from `usage`
    assert ev["tuned"]["latency"]["examples"] == 6 and ev["tuned"]["latency"]["median_ms"] > 0
    assert ev["tuned"]["tokens_per_s"] == pytest.approx(6 * 42 / ev["tuned"]["seconds"])
    rows = [json.loads(x) for x in (run / "predictions.jsonl").read_text().splitlines()]
    for r, body in zip(rows, seen):
        assert r["tuned"] in ("0", "1")
    assert ev["tuned"]["accuracy"] == pytest.approx(sum(r["tuned"] == r["reference"] for r in rows) / 6)
    assert "base" in ev  # the local base model, zero-shot, for comparison


def test_api_settings_are_checked(tmp_path, tiny_model_dir, sst_files, capsys):
    path = write_config(tmp_path, tiny_model_dir, sst_files)
    assert main(["train", str(path), "--set", "method=prompt", "--set", "prompt.api.base_url=ftp://x"]) == 2
    err = capsys.readouterr().err
    assert "prompt.api.base_url: must start with http://" in err and "prompt.api.model: required" in err


def test_an_unreachable_endpoint_is_a_clear_error():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    model = ApiModel(ApiConfig(base_url=f"http://127.0.0.1:{port}/v1", model="m", max_retries=0, timeout_s=5))
    with pytest.raises(ApiError, match=f"127.0.0.1:{port}/v1/chat/completions: "):
        model.chat([{"role": "user", "content": "x"}], 4)
