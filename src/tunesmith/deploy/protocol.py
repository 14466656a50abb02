"""The OpenAI HTTP schema, field for field, as pydantic classes (the one protocol module of ``serve``).

Requests accept and ignore fields they do not know (OpenAI clients send new ones before servers
learn them); known fields are validated, and a value we cannot honour (``logprobs``, tools, a
non-zero penalty) is refused by ``unsupported()`` rather than silently ignored. Responses and
stream chunks serialize to exactly what the official ``openai`` client parses.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

FinishReason = Literal["stop", "length", "content_filter"]
MAX_STOP_STRINGS = 8  # OpenAI allows 4; a little more costs nothing


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


def new_id(prefix: str) -> str:
    """An OpenAI-style object id: ``chatcmpl-<hex>``, ``cmpl-<hex>``."""
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


# ---------------------------------------------------------------- requests


class StreamOptions(_Request):
    include_usage: bool = False


class ContentPart(_Request):
    type: str
    text: str | None = None


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message's text; ValueError for content parts that are not text (images, audio)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        other = sorted({p.type for p in self.content if p.type != "text"})
        if other:
            raise ValueError(f"only text content is supported, not {', '.join(other)}")
        return "".join(p.text or "" for p in self.content)


class _SamplingRequest(_Request):
    """Fields chat and text completions share."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return v

    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def unsupported(self) -> list[tuple[str, str]]:
        """(param, why) for each value this server cannot honour; the route answers 400 naming them."""
        out = []
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                out.append((name, f"{name} is not supported; leave it unset or 0"))
        if self.logit_bias:
            out.append(("logit_bias", "logit_bias is not supported"))
        return out


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def token_limit(self) -> int | None:
        """``max_completion_tokens`` (the newer name) wins over ``max_tokens``."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def unsupported(self) -> list[tuple[str, str]]:
        out = super().unsupported()
        if self.logprobs or self.top_logprobs:
            out.append(("logprobs", "logprobs are not supported"))
        if self.tools:
            out.append(("tools", "tools (function calling) are not supported"))
        if self.response_format and self.response_format.get("type", "text") != "text":
            out.append(("response_format", "only response_format type 'text' is supported"))
        return out

    def conversation(self) -> list[dict[str, str]]:
        """Messages as the chat template takes them; ``developer`` is the newer name of ``system``."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None

    def token_limit(self) -> int | None:
        return self.max_tokens

    def prompts(self) -> list[str | list[int]]:
        """Each prompt as text or token ids (the four shapes OpenAI accepts)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    def unsupported(self) -> list[tuple[str, str]]:
        out = super().unsupported()
        for name, value, default in (("echo", self.echo, False), ("logprobs", self.logprobs, None),
                                     ("suffix", self.suffix, None)):
            if value not in (default, 0, ""):
                out.append((name, f"{name} is not supported"))
        if self.best_of not in (None, 1, self.n):
            out.append(("best_of", "best_of other than n is not supported"))
        if not self.prompts():
            out.append(("prompt", "prompt must not be empty"))
        return out


# ---------------------------------------------------------------- responses


class UsageInfo(_Response):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, prompt: int, completion: int) -> UsageInfo:
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class ResponseMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatCompletionChoice(_Response):
    index: int
    message: ResponseMessage
    finish_reason: FinishReason | None
    logprobs: None = None


class ChatCompletionResponse(_Response):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class DeltaMessage(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatCompletionStreamChoice(_Response):
    index: int
    delta: DeltaMessage
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class CompletionChoice(_Response):
    index: int
    text: str
    finish_reason: FinishReason | None = None
    logprobs: None = None


class CompletionResponse(_Response):
    """Both the whole answer and, with ``stream``, each chunk (OpenAI uses one shape for both)."""

    id: str = Field(default_factory=lambda: new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "tunesmith"
    root: str | None = None  # the base model these weights came from
    parent: str | None = None  # for an adapter: the served base model's name


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Response):
    error: ErrorInfo


# ---------------------------------------------------------------- validation errors in plain words


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "bytes", "none", "list", "dict", "set", "tuple"})


def explain_invalid(errors: Sequence[dict[str, Any]]) -> tuple[str, str | None]:
    """A request's validation errors (pydantic's, as FastAPI reports them) as one plain sentence
    naming each field (``messages[0].role``), and the first field (OpenAI's ``param``).

    Malformed JSON: ``invalid JSON at character 28: expecting value``. A union's branches (string
    or list?) are said once; where one branch got deeper, only that branch's error is said.
    """
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        why = str((first.get("ctx") or {}).get("error") or "")
        return f"invalid JSON at character {first['loc'][-1]}" + (f": {why[:1].lower()}{why[1:]}" if why else ""), None
    said: dict[str, list[dict[str, Any]]] = {}
    for e in errors:
        said.setdefault(_field(e.get("loc", ())), []).append(e)
    fields = [f for f in said if not (f and any(g.startswith((f + ".", f + "[")) for g in said))]
    if not fields:
        return "invalid request", None
    return "; ".join(_sentence(f, said[f]) for f in fields[:5]), fields[0] or None


def _field(loc: Sequence[Any]) -> str:
    """``('body', 'messages', 0, 'content', 'str')`` -> ``messages[0].content``: the request part
    (body, query) and pydantic's union-branch tags (``str``, ``list[ContentPart]``) left out."""
    out = ""
    for part in loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.isidentifier() and part not in _TYPE_TAGS and not part[:1].isupper():
            out += f".{part}" if out else part
    return out


def _sentence(field: str, errors: list[dict[str, Any]]) -> str:
    if errors[0].get("type") == "missing":
        return f"missing required parameter '{field}'" if field else "the request body is empty: send a JSON object"
    if not field:
        return "the request body must be a JSON object"
    phrases = list(dict.fromkeys(_phrase(e) for e in errors))
    text = phrases[0] + "".join(" or " + p.removeprefix("should be ") for p in phrases[1:])
    value = errors[0].get("input")
    shown = json.dumps(value) if isinstance(value, (str, int, float, bool)) else ""
    return f"invalid value for '{field}': {text}" + (f" (got {shown})" if shown and len(shown) <= 40 else "")


def _phrase(error: dict[str, Any]) -> str:
    """pydantic's message without its own words: 'Input should be' -> 'should be', no 'Value error, '."""
    msg = re.sub(r"^(Value error|Assertion failed), ", "", str(error.get("msg", "is invalid")))
    return re.sub(r"^\w+ should ", "should ", msg).replace(" after validation", "")
