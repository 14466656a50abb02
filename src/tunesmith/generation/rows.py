"""One choice being generated (``Row``): incremental detokenization, stop tokens and stop strings,
what is safe to stream; and ``sample``, one token per row with the row's own settings."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

from tunesmith.generation.requests import Delta, RequestHandle

DETOK_CONTEXT = 5  # prompt tokens decoded before the first new one, so its leading space survives


class Detokenizer:
    """Incremental decoding: the text each new token adds, held back while it ends inside a
    multi-byte character (decoded as U+FFFD). Decodes a short window, not the whole answer."""

    def __init__(self, tokenizer: Any, context: Sequence[int]) -> None:
        self.tok = tokenizer
        self.ids = list(context[-DETOK_CONTEXT:])
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


class Row:
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
        self.detok = Detokenizer(tokenizer, handle.request.prompt_ids)
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
            safe = len(self.text) - partial_stop(self.text, self.params.stop)
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
        self.handle.publish(Delta(self.index, text, tuple(self.unsent_ids), reason, error))
        self.unsent_ids = []


def partial_stop(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that is the start of a stop string (held back: the
    next tokens may complete the stop string, which must never be shown)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def sample(logits: torch.Tensor, rows: Sequence[Row]) -> list[int]:
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
