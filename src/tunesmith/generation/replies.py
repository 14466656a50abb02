"""A model's greedy replies to a list of conversations, cached on disk by the model's weights.

The forgetting check compares a tuned model's replies with the base model's, and instruction
replay (``replay.data: instructions``) trains on the base model's own replies; both ask the same
base the same questions run after run. ``cached_replies`` answers them once per base (a
fingerprint of its weights, the chat template, the conversations and the generation settings)
and keeps the answers as JSON under ``$TUNESMITH_HOME/general/``, written atomically; a
read-only home only costs the time of answering again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import torch
from rich.progress import Progress

from tunesmith.data.formats import Example
from tunesmith.generation.generate import generate
from tunesmith.io import atomic_write_json
from tunesmith.models import context_length, tunesmith_home
from tunesmith.models import unwrap


def cached_replies(model: torch.nn.Module, tokenizer: Any, conversations: list[Example], max_new_tokens: int,
                   batch_size: int, bf16: bool, progress: Progress | None = None,
                   should_stop: Callable[[], bool] | None = None) -> list[str]:
    """Greedy replies (``generation.generate``) to each conversation up to its last assistant turn,
    from the cache when this model (by its weights) gave them with these settings. Leaves the
    model in eval mode, as ``generate`` does. ``should_stop``: as ``generate`` takes it."""
    key = hashlib.sha256(json.dumps([fingerprint(model), tokenizer.chat_template, [c.messages for c in conversations],
                                     max_new_tokens, context_length(model, tokenizer), bf16]).encode())
    path = tunesmith_home() / "general" / f"replies-{key.hexdigest()[:20]}.json"
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(cached, list) and len(cached) == len(conversations):
            return cached
    except (OSError, ValueError):
        pass
    replies, _ = generate(model, tokenizer, conversations, max_new_tokens, batch_size, bf16, progress,
                          should_stop=should_stop)
    try:
        atomic_write_json(path, replies)
    except OSError:  # a read-only home: still correct, only slower next time
        pass
    return replies


def fingerprint(model: torch.nn.Module) -> str:
    """A hash of a model's weights (a sample of every tensor): the same weights, the same replies."""
    h = hashlib.sha256()
    for name, p in unwrap(model).state_dict().items():
        flat = p.detach().reshape(-1)
        h.update(name.encode())
        h.update(flat[:: max(1, flat.numel() // 64)].float().cpu().numpy().tobytes())
    return h.hexdigest()
