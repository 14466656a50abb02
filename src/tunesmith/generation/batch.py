"""The running batch's KV cache (left-padded rows, merged and trimmed as requests come and go) and
how newcomers are grouped for prefill."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from tunesmith.generation.requests import RequestHandle
from tunesmith.generation.rows import Row


SPARE_POSITIONS = 64  # positions a cache layer keeps free beyond what it holds


class SpareRoomLayer(DynamicLayer):
    """transformers' ``DynamicLayer`` with its keys and values held in a buffer that has room for
    ``SPARE_POSITIONS`` more: a decoding step writes its token in place instead of copying the
    whole cache with ``torch.cat`` (on SmolLM2-135M, 16 rows x 240 positions, the copies took a
    fifth of every step). ``keys``/``values`` stay (B, H, T, D) views of the buffer. Whoever
    assigns them a tensor of their own (merging rows, dropping rows) may: the next ``update``
    moves them into a new buffer."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized or self.keys.numel() == 0:
            self.lazy_initialization(key_states, value_states)
            self._rebuffer(key_states, value_states, 0)
            return self.keys, self.values
        n, t = self.keys.shape[-2], key_states.shape[-2]
        ours = self.keys is getattr(self, "_view_k", None) and self.values is getattr(self, "_view_v", None)
        if not ours or n + t > self._buf_k.shape[-2]:  # assigned from outside, or full
            self._rebuffer(self.keys, self.values, t)
        self._buf_k[:, :, n : n + t] = key_states
        self._buf_v[:, :, n : n + t] = value_states
        self.keys = self._view_k = self._buf_k[:, :, : n + t]
        self.values = self._view_v = self._buf_v[:, :, : n + t]
        return self.keys, self.values

    def _rebuffer(self, keys: torch.Tensor, values: torch.Tensor, coming: int) -> None:
        """Move ``keys``/``values`` into new buffers with room for ``coming`` positions and the spare."""
        b, h, n, d = keys.shape
        self._buf_k = keys.new_empty(b, h, n + coming + SPARE_POSITIONS, d)
        self._buf_v = values.new_empty(b, values.shape[1], n + coming + SPARE_POSITIONS, values.shape[3])
        self._buf_k[:, :, :n] = keys
        self._buf_v[:, :, :n] = values
        self.keys = self._view_k = self._buf_k[:, :, :n]
        self.values = self._view_v = self._buf_v[:, :, :n]


class SpareRoomCache(DynamicCache):
    """A ``DynamicCache`` of ``SpareRoomLayer``s (every layer full attention, as ``DynamicCache()``)."""

    def __init__(self) -> None:
        Cache.__init__(self, layer_class_to_replicate=SpareRoomLayer)


def left_pad(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``x`` padded with zeros at the start of ``dim`` up to ``width``."""
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


class RunningBatch:
    """The running rows and their KV cache: keys/values (B, H, T, D) per layer, left-padded, and the
    attention mask (B, T) saying which of the T positions of each row are real."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.cache: DynamicCache = SpareRoomCache()
        self.mask = torch.zeros(0, 0, dtype=torch.long)

    def merge(self, rows: list[Row], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Newcomers join: both caches left-padded to the longer one, then stacked row-wise, and the
        rows ordered by adapter (stable), so a forward pass adapts each adapter's rows as one run
        (``generation.adapters``: views instead of gathers)."""
        if not self.rows:
            self.rows, self.cache, self.mask = rows, cache, mask
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([left_pad(mine.keys, width, 2), left_pad(theirs.keys, width, 2)])
            mine.values = torch.cat([left_pad(mine.values, width, 2), left_pad(theirs.values, width, 2)])
        self.mask = torch.cat([left_pad(self.mask, width, 1), left_pad(mask, width, 1)])
        self.rows = self.rows + rows
        self.keep(sorted(range(len(self.rows)), key=lambda i: self.rows[i].adapter or ""))  # adapters' rows together

    def keep(self, keep: list[int]) -> None:
        """Only rows ``keep`` stay, in that order; then padding columns that no row uses any more are cut."""
        if keep == list(range(len(self.rows))):
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
