"""Greedy replies to each example's conversation, by the generation engine (``generation.engine``).

Prompts are fitted into the model's context by the one prompt rule (``data.render.fit_prompt``);
every prompt is queued at once and decoded with continuous batching, so a reply that ends early
frees its row for the next prompt. A stop request (Ctrl-C, SIGTERM) ends generation between
decoding steps with ``EvaluationStopped``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from rich.progress import Progress

from tunesmith.data.formats import Example
from tunesmith.data.render import PromptCut, answer_room, chat_format, fit_prompt
from tunesmith.generation.engine import Engine, GenerationRequest, SamplingParams
from tunesmith.models import context_length

KV_BUDGET_BYTES = 1 << 30  # the KV cache of the rows decoded together stays within this (1 GiB)
MAX_ROWS = 32  # rows decoded together at most: beyond this a 2-core CPU gains little per row


def generate(model: torch.nn.Module, tokenizer: Any, examples: list[Example], max_new_tokens: int,
             batch_size: int, bf16: bool, progress: Progress | None = None, side: str = "middle",
             should_stop: Callable[[], bool] | None = None) -> tuple[list[str], int]:
    """Greedy replies to each example's conversation up to its last assistant turn, and the number
    of tokens read and written; ``generate_replies`` also says which prompts were cut."""
    texts, tokens, _ = generate_replies(model, tokenizer, examples, max_new_tokens, batch_size, bf16, progress, side,
                                        should_stop)
    return texts, tokens


def generate_replies(model: torch.nn.Module, tokenizer: Any, examples: list[Example], max_new_tokens: int,
                     batch_size: int, bf16: bool, progress: Progress | None = None, side: str = "middle",
                     should_stop: Callable[[], bool] | None = None) -> tuple[list[str], int, list[PromptCut | None]]:
    """Greedy replies to each example's conversation up to its last assistant turn, the number of
    tokens read and written (prompt tokens, then each reply up to and including its end token),
    and each prompt's cut (None where it fit).

    Prompts are encoded like training prompts (special strings in the data as text) and fitted
    into the model's context (``data.render.fit_prompt``: cut only when longer than the model
    can read, never to make room for the reply); a reply gets ``max_new_tokens`` or what the
    context has left. Generation stops at the chat template's end-of-turn token or the end of
    sequence. The model answers as it stands (a ``PeftModel`` with its active adapter), in eval
    mode (left so). Rows decoded together: at least ``batch_size``, more while their KV cache
    fits ``KV_BUDGET_BYTES`` (``decode_rows``). ``should_stop()`` is asked between decoding
    steps: when it turns true the replies are abandoned and EvaluationStopped is raised.
    """
    model.eval()
    stops = tuple(chat_format(tokenizer).stop_ids)
    context = context_length(model, tokenizer)
    room = answer_room(context, max_new_tokens)
    fitted = [fit_prompt(tokenizer, ex.messages[: last_answer(ex)], context - 1, side, ex.source, context - room)
              for ex in examples]
    prompts, cuts = [f[0] for f in fitted], [f[1] for f in fitted]
    if not prompts:
        return [], 0, []
    task = progress.add_task("generating", total=len(prompts), info="") if progress else None
    longest = min(context, max(map(len, prompts)) + max_new_tokens)
    engine = Engine(model, tokenizer, max_batch_size=decode_rows(model, longest, batch_size), context_length=context,
                    bf16=bf16, per_row_adapters=False, background=False)
    params = SamplingParams(max_tokens=max_new_tokens, stop_ids=stops)
    try:
        results = engine.generate([GenerationRequest(p, None, params) for p in prompts], should_stop,
                                  lambda i, r: progress.update(task, advance=1) if progress is not None else None)
    finally:
        engine.shutdown(drain=False)
    texts = [tokenizer.decode(r.choices[0].token_ids, skip_special_tokens=True).strip() for r in results]
    return texts, sum(r.prompt_tokens + r.completion_tokens for r in results), cuts


def decode_rows(model: torch.nn.Module, tokens_per_row: int, at_least: int = 1, budget: int = KV_BUDGET_BYTES,
                most: int = MAX_ROWS) -> int:
    """How many rows to decode together: as many as fit ``budget`` bytes of KV cache at
    ``tokens_per_row`` tokens each (keys and values of every layer, in the weights' dtype), at most
    ``most``, at least ``at_least`` (the caller's batch size) and 1."""
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    layers = getattr(cfg, "num_hidden_layers", None)
    heads = getattr(cfg, "num_key_value_heads", None) or getattr(cfg, "num_attention_heads", None)
    dim = getattr(cfg, "head_dim", None) or (getattr(cfg, "hidden_size", 0) // max(1, getattr(cfg, "num_attention_heads", 1) or 1))
    if not (layers and heads and dim):
        return max(1, at_least)
    per_token = 2 * layers * heads * dim * next(model.parameters()).element_size()
    return max(1, at_least, min(most, budget // max(1, per_token * tokens_per_row)))


def last_answer(ex: Example) -> int:
    """Index of the final assistant turn (the answer to score), or the end when there is none."""
    return max((i for i, m in enumerate(ex.messages) if m["role"] == "assistant"), default=len(ex.messages))
