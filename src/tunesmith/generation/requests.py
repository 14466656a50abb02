"""What the generation engine takes and gives: sampling settings, requests, the stream of events
(``Delta``) a request's handle yields, whole results, counters, and the engine's errors."""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field

from tunesmith.errors import TunesmithError


class EngineError(TunesmithError, RuntimeError):
    """A request the engine cannot take (bad prompt, unknown adapter, limits)."""


class QueueFull(EngineError):
    """``max_waiting`` requests are already waiting; try again later (HTTP 429)."""


class EngineClosed(EngineError):
    """The engine is shutting down and takes no new requests (HTTP 503)."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request is sampled. ``temperature`` 0 is greedy; ``top_p`` keeps the smallest set
    of tokens whose probability reaches it; ``seed`` makes sampling reproducible (choice ``i`` of
    ``n`` uses its own generator seeded from (seed, i)); ``stop`` strings end the answer and are
    not part of it; ``stop_ids`` are token ids that end it (e.g. end of turn, eos)."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    stop_ids: tuple[int, ...] = ()
    seed: int | None = None
    n: int = 1


@dataclass(frozen=True)
class GenerationRequest:
    """Prompt token ids, the PEFT adapter to apply (None: the base model) and sampling settings."""

    prompt_ids: Sequence[int]
    adapter: str | None = None
    params: SamplingParams = SamplingParams()


@dataclass(frozen=True)
class Delta:
    """One event of a request's stream: new text of choice ``index`` (possibly empty), the token
    ids generated since the last event, and on the last event of that choice its ``finish_reason``:
    ``stop`` (stop token or string), ``length`` (max_tokens or the context), ``abort`` (cancelled
    or shut down) or ``error`` (then ``error`` says what failed)."""

    index: int
    text: str
    token_ids: tuple[int, ...] = ()
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class Choice:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class GenerationResult:
    """A whole answer: ``n`` choices and the token counts (completion counts the stop token)."""

    choices: list[Choice]
    prompt_tokens: int
    completion_tokens: int


@dataclass
class EngineStats:
    """Counters since start: decoding steps, rows summed over steps (mean batch = rows/steps),
    the largest batch seen, tokens prefilled and generated, requests that joined a batch already
    decoding; and now: waiting requests, running rows."""

    steps: int = 0
    rows: int = 0
    max_rows: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    joined: int = 0
    waiting: int = 0
    running: int = 0


class RequestHandle:
    """A submitted request: iterate it (blocking, or ``async for``) for its ``Delta`` events until
    every choice has finished; ``cancel()`` removes it from the batch at the next step."""

    _ids = itertools.count()

    def __init__(self, request: GenerationRequest) -> None:
        self.id = next(self._ids)
        self.request = request
        self.n = request.params.n
        self.prompt_tokens = len(request.prompt_ids)
        self.completion_tokens = 0
        self._events: queue.SimpleQueue[Delta] = queue.SimpleQueue()
        self._wake: Callable[[], None] | None = None
        self._cancelled = threading.Event()
        self._cancelled_choices: set[int] = set()
        self._unfinished = self.n
        self.finished = threading.Event()  # set once every choice has its last event

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self, index: int | None = None) -> None:
        """Ask the engine to drop this request (or only its choice ``index``) at its next step."""
        if index is None:
            self._cancelled.set()
        else:
            self._cancelled_choices.add(index)

    def choice_cancelled(self, index: int) -> bool:
        return self._cancelled.is_set() or index in self._cancelled_choices

    def publish(self, delta: Delta) -> None:
        """Queue one event for the consumer (called by the engine's thread)."""
        self._events.put(delta)
        if delta.finish_reason is not None:
            self._unfinished -= 1
            if self._unfinished == 0:
                self.finished.set()
        wake = self._wake
        if wake is not None:
            try:
                wake()
            except RuntimeError:  # the consumer's event loop has closed: nobody is listening any more
                self._wake = None

    def __iter__(self) -> Iterator[Delta]:
        open_ = self.n
        while open_:
            d = self._events.get()
            open_ -= d.finish_reason is not None
            yield d

    async def stream(self) -> AsyncIterator[Delta]:
        """The events, awaited without tying up a thread per request (the engine wakes the loop)."""
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        self._wake = lambda: loop.call_soon_threadsafe(ready.set)
        open_ = self.n
        try:
            while open_:
                try:
                    d = self._events.get_nowait()
                except queue.Empty:
                    ready.clear()
                    if self._events.empty():  # re-check after clearing: no wake-up is lost
                        await ready.wait()
                    continue
                open_ -= d.finish_reason is not None
                yield d
        finally:
            self._wake = None

    def result(self) -> GenerationResult:
        """Block until every choice has finished; the whole answer."""
        choices = [Choice() for _ in range(self.n)]
        for d in self:
            c = choices[d.index]
            c.text += d.text
            c.token_ids += d.token_ids
            if d.finish_reason:
                c.finish_reason, c.error = d.finish_reason, d.error
        return GenerationResult(choices, self.prompt_tokens, self.completion_tokens)
