"""An OpenAI-compatible chat-completions endpoint as a model to prompt (the API baseline).

Requests go through the official ``openai`` client (``client.chat.completions.create``) with
greedy decoding (temperature 0), so any compatible server works (OpenAI, vLLM, llama.cpp's server,
``tunesmith serve``). The key is read from the environment variable the config names, never from
the config file. Requests run ``max_concurrency`` at a time; the client retries 429 and 5xx answers
with exponential backoff, honouring ``Retry-After``.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai

from tunesmith.errors import TunesmithError
from tunesmith.config import ApiConfig


class ApiError(TunesmithError, RuntimeError):
    """The endpoint refused or failed a request; the message has the status and the reply."""


class ApiModel:
    """A remote chat model: ``chat(messages)`` returns the reply text."""

    def __init__(self, cfg: ApiConfig) -> None:
        if not cfg.base_url:
            raise ApiError("prompt.api.base_url is not set")
        self.cfg = cfg
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        # a server without auth ignores the header; the client insists on some key
        self.client = openai.OpenAI(base_url=cfg.base_url, api_key=key or "no-key", timeout=cfg.timeout_s,
                                    max_retries=cfg.max_retries)
        self.name = cfg.model
        self.request_ms: list[float] = []  # wall time of every answered request, retries included
        self.tokens = 0  # prompt + completion tokens, as the endpoint's ``usage`` reports them

    def chat(self, messages: list[dict[str, str]], max_tokens: int) -> str:
        """The reply to ``messages`` (greedy, at most ``max_tokens`` tokens). Raises ApiError with
        the HTTP status and the server's message, naming the key's variable on 401/403."""
        t0 = time.perf_counter()
        try:
            reply = self.client.chat.completions.create(model=self.cfg.model, messages=messages,  # type: ignore[arg-type]
                                                        temperature=0, max_tokens=max_tokens)
        except openai.APIStatusError as e:
            hint = f" (is ${self.cfg.api_key_env} set?)" if e.status_code in (401, 403) else ""
            raise ApiError(f"{self.url}: HTTP {e.status_code}{hint}: {e.response.text[:500]}") from None
        except openai.APIConnectionError as e:  # includes timeouts, after the client's retries
            raise ApiError(f"{self.url}: {e.__cause__ or e}") from None
        if not reply.choices:
            raise ApiError(f"{self.url}: not a chat-completions reply (no choices): {reply.model_dump_json()[:300]}")
        self.request_ms.append(1000 * (time.perf_counter() - t0))
        self.tokens += int(reply.usage.total_tokens or 0) if reply.usage else 0
        return str(reply.choices[0].message.content or "")

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
