"""Shared-prefix forward passes: tokens every row of a batch starts with are run once.

Classification and instruction data repeat one system prompt or instruction in every example
(the demo's SST-2 prompt: 21 of ~55 tokens per review). When the B rows of a right-padded batch
share their first p tokens, ``decode_shared`` runs those p tokens once (batch 1), repeats their
keys and values for every row as a view (``expand``) and runs each row's remaining T - p tokens
on that cache. Causal attention makes this exact: the shared positions never attend to what
follows them, so their keys and values are those of each row's own pass, and the gradient that
reaches the shared pass is the sum over the rows (the backward of ``expand``). Work saved per
forward and backward: (B - 1)·p token positions of B·T.

Not used where it would change the result or cannot work: rows packed with ``position_ids``,
activation checkpointing (transformers turns the cache off), active dropout in training (the
rows would share one dropout mask on the prefix), caches other than transformers'
``DynamicLayer`` (sliding-window and hybrid layers).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from tunesmith.data.render import IGNORE

MIN_SAVED_POSITIONS = 64  # below this the second decoder call costs about what it saves

_saved = {"positions": 0}  # token positions not run in training passes since the last ``take_saved``


def note_saved(positions: int) -> None:
    """Count ``positions`` (B - 1)·p not run by a shared pass that training's gradients flow through."""
    _saved["positions"] += positions


def take_saved() -> int:
    """Token positions training passes skipped since the last call (then 0 again): the training
    loop's MFU counts the arithmetic really done, and metrics.jsonl says sharing happened."""
    n, _saved["positions"] = _saved["positions"], 0
    return n


def shared_length(input_ids: torch.Tensor, labels: torch.Tensor | None = None, most: int | None = None) -> int:
    """How many leading tokens the rows of ``input_ids`` (B, T) can run once: the tokens identical
    in every row, at most ``most`` (default T - 1, so every row keeps a token for the second pass)
    and, with ``labels`` (B, T; IGNORE where no target), stopping before the position that predicts
    the first target (the shared pass returns no hidden states). 0 when the batch has one row or
    sharing would save fewer than ``MIN_SAVED_POSITIONS`` token positions."""
    b, t = input_ids.shape
    if b < 2 or t < 2:
        return 0
    same = (input_ids == input_ids[:1]).all(0)  # (T,)
    p = int(same.long().cumprod(0).sum())
    p = min(p, t - 1 if most is None else most)
    if labels is not None:
        targets = (labels != IGNORE).any(0).nonzero()  # token j is a target: position j - 1 must be in the second pass
        if len(targets):
            p = min(p, int(targets[0]) - 1)
    return p if p > 0 and (b - 1) * p >= MIN_SAVED_POSITIONS else 0


def can_share(model: torch.nn.Module, decoder: torch.nn.Module) -> bool:
    """True when ``decode_shared`` gives ``decoder``'s own result: plain dynamic KV layers, no
    activation checkpointing and, in training mode, no dropout with p > 0 anywhere in ``model``."""
    if getattr(decoder, "gradient_checkpointing", False) or getattr(model, "is_activation_checkpointing", False):
        return False
    try:
        layers = DynamicCache(config=decoder.config).layers
    except (AttributeError, TypeError, ValueError):
        return False
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return False
    if model.training and any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
        return False
    return not any(getattr(decoder.config, k, 0) for k in ("attention_dropout", "hidden_dropout") if model.training)


def decode_shared(decoder: torch.nn.Module, input_ids: torch.Tensor, p: int,
                  cache: DynamicCache | None = None) -> tuple[torch.Tensor, DynamicCache]:
    """The decoder's last hidden states of positions p..T-1 (B, T - p, d) of right-padded
    ``input_ids`` (B, T) whose first ``p`` tokens are the same in every row (``shared_length``),
    and the KV cache of all T positions (``cache`` if given, filled). Differentiable: gradients
    flow into the shared pass summed over the rows."""
    b = input_ids.shape[0]
    cache = cache if cache is not None else DynamicCache(config=decoder.config)
    decoder(input_ids=input_ids[:1, :p], cache=cache, use_cache=True)
    for layer in cache.layers:  # (1, H, p, D) -> (B, H, p, D) without a copy
        layer.keys = layer.keys.expand(b, -1, -1, -1)
        layer.values = layer.values.expand(b, -1, -1, -1)
    out = decoder(input_ids=input_ids[:, p:], cache=cache, use_cache=True)
    return out.last_hidden_state, cache
