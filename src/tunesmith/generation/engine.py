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
   (PEFT's LoRA layers, applied per row by ``AdapterRouter``; none for base rows), and samples
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

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import DynamicCache

from tunesmith import models, runtime
from tunesmith.generation.adapters import AdapterRouter
from tunesmith.generation.batch import RunningBatch, SpareRoomCache, prefill_groups
from tunesmith.generation.requests import (Choice, Delta, EngineClosed, EngineError, EngineStats, GenerationRequest,
                                           GenerationResult, QueueFull, RequestHandle, SamplingParams)
from tunesmith.generation.rows import Row, sample
from tunesmith.runtime.stopping import EvaluationStopped

__all__ = ["Choice", "Delta", "Engine", "EngineClosed", "EngineError", "EngineStats", "GenerationRequest",
           "GenerationResult", "QueueFull", "RequestHandle", "SamplingParams"]

log = logging.getLogger(__name__)


class Engine:
    """Continuous batching over one model; thread-safe ``submit``, a background decoding thread.

    ``model``: a ``peft.PeftModel`` (requests name one of its adapters, or None for the base) or
    a plain causal LM (adapter must be None). ``max_batch_size``: rows decoded together (a
    request with ``n`` choices takes ``n`` rows). ``max_waiting``: requests queued beyond that
    (``submit`` raises QueueFull). ``max_prefill_tokens``: padded prompt tokens prefilled in one
    step (one request is always admitted, however long). ``context_length``: positions the model
    has (default: ``models.context_length``). ``bf16``: autocast the forward (evaluation and every
    answer the product gives use ``runtime.INFERENCE_PRECISION``). ``per_row_adapters=False``: the
    model runs as it stands (a ``PeftModel`` with its active adapter, merged or not; requests
    name no adapter): how evaluation answers with the model it just trained. ``background=False``:
    no thread of its own; only ``generate`` answers, decoding in the caller's thread (for offline
    work: one OpenMP thread team instead of two; a decoding step on SmolLM2-135M, 8 rows, 2 cores
    took ~25% longer in a second Python thread once the first had run torch work: libgomp shortens
    its spin-waits when it manages more threads than there are CPUs). The engine's thread uses the
    torch thread count of the thread that made the engine; ``deploy.server.serve`` loads models
    with one thread, so that the engines' threads own the only OpenMP teams.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, max_batch_size: int = 32, max_waiting: int = 128,
                 max_prefill_tokens: int = 4096, context_length: int | None = None, bf16: bool = False,
                 per_row_adapters: bool = True, background: bool = True) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_waiting, self.max_prefill_tokens = max_batch_size, max_waiting, max_prefill_tokens
        self.adapters: frozenset[str] = frozenset(getattr(model, "peft_config", {}) or {}) if per_row_adapters else frozenset()
        self.context_length = int(context_length or models.context_length(model, tokenizer))
        self.device = next(model.parameters()).device
        self.bf16 = bf16
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.stats = EngineStats()
        self._router = AdapterRouter(model if per_row_adapters else None, self.device)
        self._waiting: deque[RequestHandle] = deque()
        self._batch = RunningBatch()
        self._cond = threading.Condition()
        self._closed = self._stop = self._abort = False
        self._thread: threading.Thread | None = None
        self._threads = torch.get_num_threads()
        if background:
            self._thread = threading.Thread(target=self._loop, name="tunesmith-engine", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------ public API

    def submit(self, request: GenerationRequest, block: bool = False) -> RequestHandle:
        """Queue a request; its handle streams the answer. Raises EngineError for an empty or
        over-long prompt, an unknown adapter, or ``n`` above ``max_batch_size``; QueueFull when
        ``max_waiting`` requests wait (unless ``block``: then it waits for room); EngineClosed
        after ``shutdown``; EngineError on an engine made with ``background=False``."""
        if self._thread is None:
            raise EngineError("this engine has no thread of its own: use generate()")
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

    def generate(self, requests: Sequence[GenerationRequest], should_stop: Callable[[], bool] | None = None,
                 on_result: Callable[[int, GenerationResult], None] | None = None) -> list[GenerationResult]:
        """Answer many requests, batched continuously; results in request order (blocks).

        For offline work (evaluation, ``tunesmith generate``, the forgetting check): every request
        is queued at once, before the engine admits any, so the batches formed, and with them
        the answers to the last bit, are the same run to run (``max_waiting`` does not apply).
        ``on_result(i, result)`` is called for each request in order as it is answered; on a stop,
        also for the answers already made behind an unfinished one (out of order), so none is lost.
        ``should_stop()`` is asked between decoding steps (every 50 ms with a background thread):
        when it turns true the requests are cancelled and EvaluationStopped is raised. Raises EngineError for a bad request (none is queued then),
        EngineClosed after ``shutdown``."""
        for r in requests:
            self._check(r)
        handles = [RequestHandle(r) for r in requests]
        with self._cond:
            if self._closed:
                raise EngineClosed("the engine is shutting down")
            self._waiting.extend(handles)
            self._cond.notify_all()
        results: list[GenerationResult] = []

        def report() -> None:  # the answers finished so far, in request order
            while len(results) < len(handles) and handles[len(results)].finished.is_set():
                results.append(handles[len(results)].result())
                if on_result is not None:
                    on_result(len(results) - 1, results[-1])

        try:
            if self._thread is None:
                self._drive(handles, should_stop, report)
            while len(results) < len(handles):
                if not handles[len(results)].finished.wait(0.05 if should_stop else None):
                    if should_stop is not None and should_stop():
                        raise EvaluationStopped(f"stopped while generating, with {len(results)} of {len(handles)} "
                                                "answers made")
                report()
        except BaseException as stop:
            for h in handles:
                h.cancel()
            if isinstance(stop, EvaluationStopped) and on_result is not None:
                for i in range(len(results), len(handles)):  # made after one still unfinished: not lost
                    if handles[i].finished.is_set():
                        on_result(i, handles[i].result())
            raise
        return results

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; with ``drain`` finish every waiting and running one first,
        otherwise end them at once (finish_reason ``abort``). Waits up to ``timeout`` seconds for
        the thread; requests still running then are aborted."""
        with self._cond:
            self._closed = self._stop = True
            self._abort = not drain
            self._cond.notify_all()
        if self._thread is None:  # no loop of its own: nothing runs between ``generate`` calls
            self._router.close()
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._abort = True  # read by the loop at its next step
            self._thread.join(5)

    @property
    def running(self) -> bool:
        """Whether the engine takes requests (its thread is alive; without one: until shutdown)."""
        return self._thread.is_alive() if self._thread is not None else not self._closed

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
        torch.set_num_threads(self._threads)  # this thread's OpenMP team (the count is per thread)
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
                self._step(newcomers)

    def _step(self, newcomers: list[RequestHandle]) -> None:
        """Prefill the newcomers, then one decoding step for every running row."""
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

    def _drive(self, handles: list[RequestHandle], should_stop: Callable[[], bool] | None,
               after_step: Callable[[], None]) -> None:
        """The decoding loop in the caller's thread (``background=False``) until ``handles`` are
        answered, ``after_step()`` after each step; on a stop request or an error every request
        is dropped and the batch emptied."""
        try:
            with torch.inference_mode():
                while not all(h.finished.is_set() for h in handles):
                    if should_stop is not None and should_stop():
                        done = sum(h.finished.is_set() for h in handles)
                        raise EvaluationStopped(f"stopped while generating, with {done} of {len(handles)} answers made")
                    with self._cond:
                        newcomers = self._admit()
                    self._step(newcomers)
                    after_step()
        except BaseException:
            with self._cond:
                self._waiting.clear()
                self._batch = RunningBatch()
            raise

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
                    h.publish(Delta(i, "", (), "abort"))
                continue
            w = max(width, h.prompt_tokens)
            if rows + h.n > self.max_batch_size or (out and w * (len(out) + 1) > self.max_prefill_tokens):
                break
            out.append(self._waiting.popleft())
            rows, width = rows + h.n, w
        return out

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: DynamicCache,
                 rows: Sequence[Row] | Sequence[RequestHandle]) -> torch.Tensor:
        """Last-position logits (B, V) of ``ids`` (B, T), each row with its own adapter."""
        adapters = [r.adapter if isinstance(r, Row) else r.request.adapter for r in rows]
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
        cache = SpareRoomCache()
        logits = self._forward(ids, mask, pos, cache, handles)  # (b, V)
        repeat = torch.tensor([i for i, h in enumerate(handles) for _ in range(h.n)])
        if len(repeat) != len(handles):  # n > 1: the prompt is computed once, its cache copied per choice
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys.index_select(0, repeat), layer.values.index_select(0, repeat)
            mask, logits = mask.index_select(0, repeat), logits.index_select(0, repeat.to(logits.device))
        rows = [Row(h, i, self.tokenizer, min(h.request.params.max_tokens, self.context_length - h.prompt_tokens))
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
            if not r.finished and (self._abort or r.handle.choice_cancelled(r.index)):
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
                    h.publish(Delta(i, "", (), "error", error))
        with self._cond:
            self._batch = RunningBatch()
