"""Resumable answering: a model's answers to a test set, kept on disk batch by batch.

A run's final evaluation can take longer than its training (generation tasks); a SIGTERM or
Ctrl-C in the middle must lose nothing. ``answer_all`` answers the examples in batches (shortest
prompts first, so a batch holds similar lengths) and appends each batch's answers, losses and
prompt cuts to ``eval_cache/<key>.jsonl`` in the run folder as soon as they are made (a line,
flushed and fsynced; a half-written last line is dropped when read). The file starts with a
fingerprint of everything that decides the answers (model, weights, test examples, settings);
a different fingerprint discards it. Between batches (and between decoding steps of a
generation) the stop request is checked; then ``EvaluationStopped`` is raised and the same
command continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.data.formats import Example
from tunesmith.runtime.stopping import EvaluationStopped

CACHE = "eval_cache"


@dataclass
class Answers:
    """Answers to every example, in example order: ``outputs`` (labels or texts), each example's loss
    (summed NLL, target tokens; None when not computed), tokens read and written, and the prompt cut
    of each example (None where the prompt fit whole)."""

    outputs: list[str]
    nll: tuple[list[float], list[int]] | None
    tokens: int
    cuts: list[dict[str, Any] | None] = field(default_factory=list)
    from_store: int = 0  # examples whose answers were kept from an earlier, stopped evaluation
    fresh_tokens: int = 0  # tokens read and written by the answers made now (not from the store)


# What answers one batch of examples: (outputs, nll or None, tokens, cuts) for those examples, in order.
AnswerBatch = Callable[[list[Example]], tuple[list[str], tuple[list[float], list[int]] | None, int, list[Any]]]


class AnswerStore:
    """``eval_cache/<key>.jsonl`` of one model on one task: batches already answered, by their first
    example's position in the answering order. ``path`` None keeps nothing (plain evaluation)."""

    def __init__(self, path: Path | None, fingerprint: str) -> None:
        self.path, self.fingerprint = path, fingerprint
        self.batches: dict[int, dict[str, Any]] = self._read() if path is not None else {}

    def _read(self) -> dict[int, dict[str, Any]]:
        assert self.path is not None
        try:
            lines = self.path.read_bytes().split(b"\n")
        except OSError:
            return {}
        try:
            head = json.loads(lines[0])
        except ValueError:
            return {}
        if head.get("fingerprint") != self.fingerprint:
            return {}  # made for other weights or settings: answered again
        out = {}
        for raw in lines[1:]:
            try:
                rec = json.loads(raw)
                out[int(rec["start"])] = rec
            except (ValueError, KeyError, TypeError):
                break  # a half-written last line (a kill mid-write): that batch is answered again
        return out

    def add(self, record: dict[str, Any]) -> None:
        """Keep one batch's answers (a whole line, flushed and fsynced, or nothing)."""
        self.batches[int(record["start"])] = record
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.is_file() or not self._valid_head()
        with open(self.path, "w" if fresh else "a", encoding="utf-8") as f:
            if fresh:
                f.write(json.dumps({"fingerprint": self.fingerprint}) + "\n")
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _valid_head(self) -> bool:
        assert self.path is not None
        try:
            with open(self.path, encoding="utf-8") as f:
                head = json.loads(f.readline())
        except (OSError, ValueError):
            return False
        return head.get("fingerprint") == self.fingerprint


def fingerprint(*parts: Any) -> str:
    """A short hash of JSON-able parts (settings, example texts, weights' identity)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def answer_all(examples: list[Example], answer: AnswerBatch, batch_size: int, store: AnswerStore,
               should_stop: Callable[[], bool] = lambda: False,
               on_batch: Callable[[int, bool], None] | None = None, with_nll: bool = True) -> Answers:
    """Answer ``examples`` with ``answer``, ``batch_size`` at a time, shortest prompts first; batches
    already in ``store`` are taken from it. ``on_batch(n, kept)`` is told of each batch done, and
    whether it came from the store (for progress: kept answers are not this sitting's work). Raises EvaluationStopped (answers so far kept) when ``should_stop()`` turns true."""
    order = sorted(range(len(examples)), key=lambda i: _length(examples[i]))
    outputs: list[str] = [""] * len(examples)
    nll: tuple[list[float], list[int]] | None = ([0.0] * len(examples), [0] * len(examples)) if with_nll else None
    cuts: list[dict[str, Any] | None] = [None] * len(examples)
    tokens = reused = fresh_tokens = 0
    kept = {start for start, rec in store.batches.items()
            if rec.get("n") == len(order[start : start + batch_size])}  # answered by an earlier, stopped run
    for start in range(0, len(order), max(1, batch_size)):
        idx = order[start : start + batch_size]
        rec = store.batches.get(start) if start in kept else None
        reused += len(idx) if rec is not None else 0
        if rec is None:
            if should_stop():
                raise EvaluationStopped(f"stopped with {start} of {len(order)} answers kept")
            outs, batch_nll, batch_tokens, batch_cuts = answer([examples[i] for i in idx])
            rec = {"start": start, "n": len(idx), "outputs": outs, "nll": batch_nll, "tokens": batch_tokens,
                   "cuts": [c.as_dict() if hasattr(c, "as_dict") else c for c in batch_cuts]}
            store.add(rec)
            fresh_tokens += int(batch_tokens or 0)
        for k, i in enumerate(idx):
            outputs[i] = rec["outputs"][k]
            cuts[i] = rec["cuts"][k] if rec.get("cuts") else None
            if nll is not None and rec.get("nll") is not None:
                nll[0][i], nll[1][i] = rec["nll"][0][k], rec["nll"][1][k]
        tokens += int(rec.get("tokens") or 0)
        if on_batch is not None:
            on_batch(len(idx), start in kept)
    return Answers(outputs, nll, tokens, cuts, reused, fresh_tokens)


def _length(ex: Example) -> int:
    """A cheap stand-in for the prompt's token count: its characters."""
    return len(ex.text) if ex.text is not None else sum(len(m["content"]) for m in ex.messages)
