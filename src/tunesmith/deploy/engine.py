"""The generation engine: continuous batching of many requests, each with its own LoRA adapter.

One ``Engine`` owns one model (a ``peft.PeftModel`` with several adapters, or a plain causal LM)
and one background thread that runs the decoding loop; nothing here knows about HTTP.

The scheduler, once per decoding step:
1. admits waiting requests while there are free rows (``max_batch_size``) and the prefill budget
   (``max_prefill_tokens`` padded tokens) allows, first come first served;
2. prefills the newcomers (grouped by prompt length, left-padded, explicit position ids; a
   request with ``n`` choices once, its cache copied per choice), samples their first token, and
   merges their KV cache into the running batch's: keys and values of both sides are left-padded
   to a common length, the padding masked out (attention mask 0), so every row keeps its own
   positions and a row never sees another's tokens;
3. runs one forward pass of one token for every running row, each row with its own adapter
   (PEFT's LoRA layers, applied per row by ``_AdapterRouter``; none for base rows), and samples
   each row with its own settings and its own ``torch.Generator``;
4. drops finished and cancelled rows (``index_select`` on the cache) and the padding columns no
   row needs any more.

Each answer is the one the model gives to that prompt alone (tested token for token against
transformers' ``generate``, in fp32): padding is masked, positions are per row, and nothing of
one row enters another's computation. The engine must be the model's only user while it runs.

transformers' own continuous batching (``generate_batch``/``ContinuousBatchingManager``) flattens
all requests into one packed row over a paged cache, so PEFT's per-row ``adapter_names`` cannot
apply there; this scheduler is small and keeps mixed-adapter batches exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import random
import threading
import types
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from tunesmith.errors import TunesmithError
from tunesmith import models, runtime

log = logging.getLogger(__name__)
BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch
_DETOK_CONTEXT = 5  # prompt tokens decoded before the first new one, so its leading space survives


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

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self, index: int | None = None) -> None:
        """Ask the engine to drop this request (or only its choice ``index``) at its next step."""
        if index is None:
            self._cancelled.set()
        else:
            self._cancelled_choices.add(index)

    def _choice_cancelled(self, index: int) -> bool:
        return self._cancelled.is_set() or index in self._cancelled_choices

    def _put(self, delta: Delta) -> None:  # engine thread
        self._events.put(delta)
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


class _Detokenizer:
    """Incremental decoding: the text each new token adds, held back while it ends inside a
    multi-byte character (decoded as U+FFFD). Decodes a short window, not the whole answer."""

    def __init__(self, tokenizer: Any, context: Sequence[int]) -> None:
        self.tok = tokenizer
        self.ids = list(context[-_DETOK_CONTEXT:])
        self.prefix = 0
        self.read = len(self.ids)

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        after = self.tok.decode(self.ids[self.prefix :], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Text still held back (an unfinished character, shown as U+FFFD) when the answer ends."""
        before = self.tok.decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        after = self.tok.decode(self.ids[self.prefix :], skip_special_tokens=True)
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]


class _Row:
    """One choice being generated: its text so far, what was sent, its sampler and stop rules."""

    def __init__(self, handle: RequestHandle, index: int, tokenizer: Any, max_tokens: int) -> None:
        p = handle.request.params
        self.handle, self.index, self.params = handle, index, p
        self.adapter = handle.request.adapter
        self.max_tokens = max_tokens
        self.position = handle.prompt_tokens  # position id of the next token fed
        self.next_token = -1  # sampled and reported, not yet fed to the model
        self.generated = 0
        self.unsent_ids: list[int] = []
        self.text, self.sent = "", 0
        self.finished = False
        self.detok = _Detokenizer(tokenizer, handle.request.prompt_ids)
        self.generator: torch.Generator | None = None
        if p.temperature > 0:
            seed = p.seed if p.seed is not None else random.SystemRandom().getrandbits(62)
            self.generator = torch.Generator().manual_seed((seed * 1_000_003 + index) % 2**63)

    def accept(self, token: int) -> None:
        """Take the sampled token: stop, or report the text that is safe to show."""
        self.generated += 1
        self.handle.completion_tokens += 1
        self.unsent_ids.append(token)
        self.next_token = token
        if token in self.params.stop_ids:
            self.text += self.detok.flush()
            self.finish("stop")
        elif self._cut_at_stop_string(self.detok.add(token)):
            self.finish("stop")
        elif self.generated >= self.max_tokens:
            self.text += self.detok.flush()
            self.finish("length")
        else:
            safe = len(self.text) - _partial_stop(self.text, self.params.stop)
            if safe > self.sent:
                self._emit(self.text[self.sent : safe])

    def _cut_at_stop_string(self, new_text: str) -> bool:
        """Add ``new_text``; if a stop string now appears, cut the answer where it starts."""
        self.text += new_text
        if not self.params.stop or not new_text:
            return False
        start = max(0, self.sent - max(map(len, self.params.stop)) + 1)  # where a new one can start
        hits = [i for i in (self.text.find(s, start) for s in self.params.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
        return bool(hits)

    def finish(self, reason: str, error: str | None = None) -> None:
        if self.finished:
            return
        self.finished = True
        self._emit(self.text[self.sent :], reason, error)

    def _emit(self, text: str, reason: str | None = None, error: str | None = None) -> None:
        self.sent += len(text)
        self.handle._put(Delta(self.index, text, tuple(self.unsent_ids), reason, error))
        self.unsent_ids = []


def _partial_stop(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that is the start of a stop string (held back: the
    next tokens may complete the stop string, which must never be shown)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def _left_pad(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``x`` padded with zeros at the start of ``dim`` up to ``width``."""
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


class _Batch:
    """The running rows and their KV cache: keys/values (B, H, T, D) per layer, left-padded, and the
    attention mask (B, T) saying which of the T positions of each row are real."""

    def __init__(self) -> None:
        self.rows: list[_Row] = []
        self.cache = DynamicCache()
        self.mask = torch.zeros(0, 0, dtype=torch.long)

    def merge(self, rows: list[_Row], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Newcomers join: both caches left-padded to the longer one, then stacked row-wise."""
        if not self.rows:
            self.rows, self.cache, self.mask = rows, cache, mask
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, width, 2), _left_pad(theirs.keys, width, 2)])
            mine.values = torch.cat([_left_pad(mine.values, width, 2), _left_pad(theirs.values, width, 2)])
        self.mask = torch.cat([_left_pad(self.mask, width, 1), _left_pad(mask, width, 1)])
        self.rows = self.rows + rows

    def keep(self, keep: list[int]) -> None:
        """Only rows ``keep`` stay; then padding columns that no row uses any more are cut."""
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.__init__()  # type: ignore[misc]
            return
        idx = torch.tensor(keep, device=self.mask.device)
        self.mask = self.mask.index_select(0, idx)
        lead = int((self.mask.cumsum(1) == 0).sum(1).min())  # padding every remaining row has
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, idx)[:, :, lead:]
            layer.values = layer.values.index_select(0, idx)[:, :, lead:]
        self.mask = self.mask[:, lead:]
        self.rows = [self.rows[i] for i in keep]


class _AdapterRouter:
    """Applies each row's adapter during one forward pass of a ``peft.PeftModel``.

    Every LoRA ``Linear`` layer gets a serving forward for the engine's steps: the base layer on
    the whole batch, then each adapter's ``B(A(x)) * scaling`` added to its rows only (the whole
    batch when all rows share it; none for base rows): PEFT's own operations in PEFT's order, so
    the numbers are PEFT's bit for bit, without PEFT's per-call costs (``adapter_names=`` walks the
    model and hooks every layer at each call, then gathers rows per layer; on SmolLM2-135M on CPU
    a mixed batch ran 35% slower than one adapter, one adapter 20% slower than the merged model).
    LoRA layers of other kinds (embeddings, convolutions, variants) get ``adapter_names`` from a
    hook registered once and run PEFT's mixed-batch path. Outside the engine's steps every layer
    behaves exactly as before; ``close()`` undoes it all. The engine must be the model's only user
    while a step runs.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.device = device
        self.plan: list[tuple[str, torch.Tensor | None]] | None = None  # (adapter, its rows; None: all)
        self.names: list[str] | None = None  # per row, for layers PEFT runs itself
        self._undo: list[Callable[[], None]] = []
        configs = getattr(model, "peft_config", {}) or {}
        if not configs:
            return
        from peft.tuners.lora import LoraLayer
        from peft.tuners.lora import Linear as LoraLinear

        dora = sorted(n for n, c in configs.items() if getattr(c, "use_dora", False))
        if dora:
            raise EngineError(f"DoRA adapters cannot be served in mixed batches: {', '.join(dora)}")
        for m in model.modules():
            if isinstance(m, LoraLinear) and type(m.get_base_layer()) is torch.nn.Linear:
                self._patch(m)
            elif isinstance(m, LoraLayer):
                self._undo.append(m.register_forward_pre_hook(self._inject, with_kwargs=True).remove)

    def _patch(self, layer: Any) -> None:
        """Route ``layer``'s forward through ``_lora_linear`` during steps (its own forward otherwise)."""
        previous = layer.__dict__.get("forward")  # an instance-level forward already there (fused_lora)
        fallback = previous or types.MethodType(type(layer).forward, layer)
        router = self

        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if router.plan is None:
                return fallback(x, *args, **kwargs)
            if args or kwargs or not _plain_lora(layer, x, router.plan):
                return type(layer).forward(layer, x, *args, adapter_names=router.names, **kwargs)
            return _lora_linear(layer, x, router.plan)

        layer.forward = forward

        def undo() -> None:
            if previous is None:
                del layer.forward
            else:
                layer.forward = previous

        self._undo.append(undo)

    def _inject(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        if self.names is None:
            return None
        kwargs["adapter_names"] = self.names
        return args, kwargs

    @contextlib.contextmanager
    def route(self, adapters: Sequence[str | None]) -> Iterator[None]:
        """Within the block, row ``i`` of a forward pass uses ``adapters[i]`` (None: the base)."""
        if not self._undo:
            yield
            return
        plan: list[tuple[str, torch.Tensor | None]] = []
        for name in dict.fromkeys(a for a in adapters if a is not None):
            rows = [i for i, a in enumerate(adapters) if a == name]
            plan.append((name, None if len(rows) == len(adapters) else torch.tensor(rows, device=self.device)))
        self.plan, self.names = plan, [a or BASE for a in adapters]
        try:
            yield
        finally:
            self.plan = self.names = None

    def close(self) -> None:
        for undo in self._undo:
            undo()
        self._undo = []


def _plain_lora(layer: Any, x: torch.Tensor, plan: list[tuple[str, torch.Tensor | None]]) -> bool:
    """Whether ``_lora_linear`` computes exactly what PEFT would: adapters active and unmerged,
    plain LoRA (no variant), no dropout at work, one dtype, no autocast."""
    if layer.disable_adapters or layer.merged or layer.training or torch.is_autocast_enabled(x.device.type):
        return False
    if x.dtype != layer.base_layer.weight.dtype:
        return False
    return all(name not in layer.lora_A
               or (name not in layer.lora_variant and layer.lora_A[name].weight.dtype == x.dtype)
               for name, _ in plan)


def _lora_linear(layer: Any, x: torch.Tensor, plan: list[tuple[str, torch.Tensor | None]]) -> torch.Tensor:
    """PEFT's LoRA ``Linear`` forward for a batch whose rows use different adapters: the base on
    all rows, ``lora_B(lora_A(x)) * scaling`` added to each adapter's rows. x: (B, T, in)."""
    base = layer.base_layer
    y = F.linear(x, base.weight, base.bias)  # (B, T, out)
    for name, rows in plan:
        if name not in layer.lora_A:
            continue  # this adapter does not adapt this layer
        a, b, scale = layer.lora_A[name], layer.lora_B[name], layer.scaling[name]
        if rows is None:
            y = y + F.linear(F.linear(x, a.weight, a.bias), b.weight, b.bias) * scale
        else:
            delta = F.linear(F.linear(x.index_select(0, rows), a.weight, a.bias), b.weight, b.bias) * scale
            y.index_add_(0, rows, delta)
    return y


PREFILL_PADDING = 1.25  # padded tokens allowed per real token when prompts are prefilled together


def prefill_groups(handles: Sequence[RequestHandle]) -> list[list[RequestHandle]]:
    """Newcomers grouped by prompt length so that one forward pass computes at most
    ``PREFILL_PADDING`` times their real tokens (prefill is compute-bound: padding is wasted work)."""
    groups: list[list[RequestHandle]] = []
    for h in sorted(handles, key=lambda h: h.prompt_tokens):
        g = groups[-1] if groups else None
        if g is not None and h.prompt_tokens * (len(g) + 1) <= PREFILL_PADDING * (
                sum(x.prompt_tokens for x in g) + h.prompt_tokens):
            g.append(h)
        else:
            groups.append([h])
    return groups


def sample(logits: torch.Tensor, rows: Sequence[_Row]) -> list[int]:
    """One token per row from ``logits`` (B, V): argmax where temperature is 0, otherwise
    temperature and top-p sampling with the row's own generator (so a seeded request draws the
    same tokens whatever else is in the batch)."""
    logits = logits.float()
    out = logits.argmax(-1).tolist()
    for i, r in enumerate(rows):
        p = r.params
        if p.temperature <= 0:
            continue
        probs = torch.softmax(logits[i] / p.temperature, -1)  # (V,)
        if p.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            # drop tokens once the mass before them already reaches top_p (the first always stays)
            drop = sorted_p.cumsum(0) - sorted_p >= p.top_p
            sorted_p[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        out[i] = int(torch.multinomial(probs.cpu(), 1, generator=r.generator))
    return out


class Engine:
    """Continuous batching over one model; thread-safe ``submit``, a background decoding thread.

    ``model``: a ``peft.PeftModel`` (requests name one of its adapters, or None for the base) or
    a plain causal LM (adapter must be None). ``max_batch_size``: rows decoded together (a
    request with ``n`` choices takes ``n`` rows). ``max_waiting``: requests queued beyond that
    (``submit`` raises QueueFull). ``max_prefill_tokens``: padded prompt tokens prefilled in one
    step (one request is always admitted, however long). ``context_length``: positions the model
    has (default: ``models.context_length``). ``bf16``: autocast the forward (evaluation and every
    answer the product gives use ``runtime.INFERENCE_PRECISION``).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, max_batch_size: int = 32, max_waiting: int = 128,
                 max_prefill_tokens: int = 4096, context_length: int | None = None, bf16: bool = False) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_waiting, self.max_prefill_tokens = max_batch_size, max_waiting, max_prefill_tokens
        self.adapters: frozenset[str] = frozenset(getattr(model, "peft_config", {}) or {})
        self.context_length = int(context_length or models.context_length(model, tokenizer))
        self.device = next(model.parameters()).device
        self.bf16 = bf16
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.stats = EngineStats()
        self._router = _AdapterRouter(model, self.device)
        self._waiting: deque[RequestHandle] = deque()
        self._batch = _Batch()
        self._cond = threading.Condition()
        self._closed = self._stop = self._abort = False
        self._thread = threading.Thread(target=self._loop, name="tunesmith-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ public API

    def submit(self, request: GenerationRequest, block: bool = False) -> RequestHandle:
        """Queue a request; its handle streams the answer. Raises EngineError for an empty or
        over-long prompt, an unknown adapter, or ``n`` above ``max_batch_size``; QueueFull when
        ``max_waiting`` requests wait (unless ``block``: then it waits for room); EngineClosed
        after ``shutdown``."""
        self._check(request)
        handle = RequestHandle(request)
        with self._cond:
            while len(self._waiting) >= self.max_waiting and not self._closed:
                if not block:
                    raise QueueFull(f"{len(self._waiting)} requests are already waiting; retry later")
                self._cond.wait()
            if self._closed:
                raise EngineClosed("the engine is shutting down")
            self._waiting.append(handle)
            self._cond.notify_all()
        return handle

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Answer many requests, batched continuously; results in request order (blocks)."""
        handles = [self.submit(r, block=True) for r in requests]
        return [h.result() for h in handles]

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; with ``drain`` finish every waiting and running one first,
        otherwise end them at once (finish_reason ``abort``). Waits up to ``timeout`` seconds for
        the thread; requests still running then are aborted."""
        with self._cond:
            self._closed = self._stop = True
            self._abort = not drain
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._abort = True  # read by the loop at its next step
            self._thread.join(5)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def snapshot(self) -> EngineStats:
        """The counters, with the current queue depth and batch size."""
        with self._cond:
            s = EngineStats(**vars(self.stats))
            s.waiting, s.running = len(self._waiting), len(self._batch.rows)
        return s

    def _check(self, request: GenerationRequest) -> None:
        p, n_prompt = request.params, len(request.prompt_ids)
        if n_prompt == 0:
            raise EngineError("the prompt is empty")
        if n_prompt >= self.context_length:
            raise EngineError(f"the prompt has {n_prompt} tokens; the model's context is {self.context_length}")
        if request.adapter is not None and request.adapter not in self.adapters:
            raise EngineError(f"unknown adapter {request.adapter!r}; this model has: {sorted(self.adapters) or 'none'}")
        if not 1 <= p.n <= self.max_batch_size:
            raise EngineError(f"n must be between 1 and {self.max_batch_size}")
        if p.max_tokens < 1:
            raise EngineError("max_tokens must be at least 1")

    # ------------------------------------------------------------ the loop (engine thread)

    def _loop(self) -> None:
        try:
            self._run()
        finally:
            self._router.close()  # the model is left as it was found

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._waiting and not self._batch.rows and not self._stop:
                        self._cond.wait()
                    if self._stop and not self._waiting and not self._batch.rows:
                        return
                    newcomers = self._admit()
                    self._cond.notify_all()  # room in the queue for blocked submitters
                try:
                    for group in prefill_groups(newcomers):
                        self._prefill(group)
                    self._reap()
                    if self._batch.rows:
                        self._decode()
                    self._reap()
                except Exception as e:  # noqa: BLE001 - a failing step fails its requests, never the engine
                    log.exception("generation step failed")
                    self._fail(newcomers, f"{type(e).__name__}: {e}")

    def _admit(self) -> list[RequestHandle]:
        """Waiting requests that fit the free rows and the prefill budget, in arrival order."""
        out: list[RequestHandle] = []
        rows = len(self._batch.rows)
        width = 0
        while self._waiting:
            h = self._waiting[0]
            if h.cancelled or self._abort:
                self._waiting.popleft()
                for i in range(h.n):
                    h._put(Delta(i, "", (), "abort"))
                continue
            w = max(width, h.prompt_tokens)
            if rows + h.n > self.max_batch_size or (out and w * (len(out) + 1) > self.max_prefill_tokens):
                break
            out.append(self._waiting.popleft())
            rows, width = rows + h.n, w
        return out

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: DynamicCache,
                 rows: Sequence[_Row] | Sequence[RequestHandle]) -> torch.Tensor:
        """Last-position logits (B, V) of ``ids`` (B, T), each row with its own adapter."""
        adapters = [r.adapter if isinstance(r, _Row) else r.request.adapter for r in rows]
        with self._router.route(adapters), runtime.autocast(self.device, self.bf16):
            out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                             position_ids=pos.to(self.device), cache=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :]

    def _prefill(self, handles: list[RequestHandle]) -> None:
        """Prompts of ``handles`` left-padded into one forward pass; each request's first token
        sampled for each of its ``n`` rows; the rows join the batch."""
        width = max(h.prompt_tokens for h in handles)
        ids = torch.tensor([[self.pad_id] * (width - h.prompt_tokens) + list(h.request.prompt_ids) for h in handles])
        mask = torch.tensor([[0] * (width - h.prompt_tokens) + [1] * h.prompt_tokens for h in handles])
        pos = (mask.cumsum(1) - 1).clamp(min=0)  # (b, T): real tokens count from 0 after the padding
        cache = DynamicCache()
        logits = self._forward(ids, mask, pos, cache, handles)  # (b, V)
        repeat = torch.tensor([i for i, h in enumerate(handles) for _ in range(h.n)])
        if len(repeat) != len(handles):  # n > 1: the prompt is computed once, its cache copied per choice
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys.index_select(0, repeat), layer.values.index_select(0, repeat)
            mask, logits = mask.index_select(0, repeat), logits.index_select(0, repeat.to(logits.device))
        rows = [_Row(h, i, self.tokenizer, min(h.request.params.max_tokens, self.context_length - h.prompt_tokens))
                for h in handles for i in range(h.n)]
        for r, t in zip(rows, sample(logits, rows)):
            r.accept(t)
        self.stats.prompt_tokens += sum(h.prompt_tokens for h in handles)
        self.stats.generated_tokens += len(rows)
        with self._cond:
            self.stats.joined += len(handles) if self._batch.rows else 0
            self._batch.merge(rows, cache, mask.to(self.device))

    def _decode(self) -> None:
        """One token for every running row."""
        b = self._batch
        ids = torch.tensor([[r.next_token] for r in b.rows])  # (B, 1)
        pos = torch.tensor([[r.position] for r in b.rows])  # (B, 1)
        mask = torch.cat([b.mask, torch.ones(len(b.rows), 1, dtype=b.mask.dtype, device=b.mask.device)], 1)
        logits = self._forward(ids, mask, pos, b.cache, b.rows)
        b.mask = mask
        for r, t in zip(b.rows, sample(logits, b.rows)):
            r.position += 1
            r.accept(t)
        self.stats.steps += 1
        self.stats.rows += len(b.rows)
        self.stats.max_rows = max(self.stats.max_rows, len(b.rows))
        self.stats.generated_tokens += len(b.rows)

    def _reap(self) -> None:
        """Drop finished rows, and cancelled ones (their stream ends with ``abort``)."""
        for r in self._batch.rows:
            if not r.finished and (self._abort or r.handle._choice_cancelled(r.index)):
                r.finish("abort")
        with self._cond:
            self._batch.keep([i for i, r in enumerate(self._batch.rows) if not r.finished])

    def _fail(self, newcomers: list[RequestHandle], error: str) -> None:
        """After a failed step: every running row and newcomer ends with ``error``; the batch resets."""
        joined = {id(r.handle) for r in self._batch.rows}
        for r in self._batch.rows:
            r.finish("error", error)
        for h in newcomers:
            if id(h) not in joined:
                for i in range(h.n):
                    h._put(Delta(i, "", (), "error", error))
        with self._cond:
            self._batch = _Batch()
