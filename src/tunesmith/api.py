"""An OpenAI-compatible chat-completions endpoint as a model to prompt (the API baseline).

Only ``POST {base_url}/chat/completions`` is used, with greedy decoding (temperature 0), so any
compatible server works (OpenAI, vLLM, llama.cpp's server, tunesmith's own later). The key is
read from the environment variable the config names, never from the config file. Requests
run ``max_concurrency`` at a time; 429 and 5xx answers are retried with exponential backoff.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tunesmith.config import ApiConfig


class ApiError(RuntimeError):
    """The endpoint refused or failed a request; the message has the status and the reply."""


class ApiModel:
    """A remote chat model: ``chat(messages)`` returns the reply text."""

    def __init__(self, cfg: ApiConfig) -> None:
        if not cfg.base_url:
            raise ApiError("prompt.api.base_url is not set")
        self.cfg = cfg
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self.key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        self.name = cfg.model
        self.request_ms: list[float] = []  # wall time of every answered request, retries included
        self.tokens = 0  # prompt + completion tokens, as the endpoint's ``usage`` reports them

    def chat(self, messages: list[dict[str, str]], max_tokens: int) -> str:
        body = json.dumps({"model": self.cfg.model, "messages": messages, "temperature": 0,
                           "max_tokens": max_tokens}).encode()
        headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {self.key}"} if self.key else {})
        t0 = time.perf_counter()
        for attempt in range(self.cfg.max_retries + 1):
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.cfg.timeout_s) as reply:
                    answer = json.loads(reply.read())
                text = _content(answer, self.url)
                self.request_ms.append(1000 * (time.perf_counter() - t0))
                usage = answer.get("usage") if isinstance(answer, dict) else None
                self.tokens += int(usage.get("total_tokens") or 0) if isinstance(usage, dict) else 0
                return text
            except urllib.error.HTTPError as e:
                text = e.read()[:500].decode("utf-8", "replace")
                if (e.code == 429 or e.code >= 500) and attempt < self.cfg.max_retries:
                    time.sleep(_wait(e.headers.get("Retry-After"), attempt))
                    continue
                hint = f" (is ${self.cfg.api_key_env} set?)" if e.code in (401, 403) else ""
                raise ApiError(f"{self.url}: HTTP {e.code}{hint}: {text}") from None
            except (urllib.error.URLError, TimeoutError) as e:
                if attempt < self.cfg.max_retries:
                    time.sleep(_wait(None, attempt))
                    continue
                raise ApiError(f"{self.url}: {getattr(e, 'reason', e)}") from None
        raise ApiError(f"{self.url}: no answer after {self.cfg.max_retries + 1} attempts")

    def chat_many(self, conversations: list[list[dict[str, str]]], max_tokens: int,
                  on_done: Any = None) -> list[str]:
        """Replies in the order of ``conversations``, ``max_concurrency`` requests at a time."""
        def one(messages: list[dict[str, str]]) -> str:
            reply = self.chat(messages, max_tokens)
            if on_done is not None:
                on_done()
            return reply

        with ThreadPoolExecutor(max_workers=self.cfg.max_concurrency) as pool:
            return list(pool.map(one, conversations))


def _content(reply: dict[str, Any], url: str) -> str:
    try:
        return str(reply["choices"][0]["message"]["content"] or "")
    except (KeyError, IndexError, TypeError):
        raise ApiError(f"{url}: not a chat-completions reply: {json.dumps(reply)[:300]}") from None


def _wait(retry_after: str | None, attempt: int) -> float:
    try:
        return min(float(retry_after), 30.0) if retry_after else 0.5 * 2**attempt
    except ValueError:
        return 0.5 * 2**attempt
