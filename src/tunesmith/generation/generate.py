"""Greedy replies to each example's conversation, with transformers' ``generate``.

Prompts are fitted into the model's context by the one prompt rule (``data.render.fit_prompt``);
a stop request (Ctrl-C, SIGTERM) ends generation between decoding steps with ``EvaluationStopped``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from rich.progress import Progress
from transformers import StoppingCriteria, StoppingCriteriaList

from tunesmith import runtime
from tunesmith.data.formats import Example
from tunesmith.data.render import PromptCut, answer_room, chat_format, fit_prompt
from tunesmith.models import context_length
from tunesmith.runtime.stopping import EvaluationStopped


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer: Any, examples: list[Example], max_new_tokens: int,
             batch_size: int, bf16: bool, progress: Progress | None = None, side: str = "middle",
             should_stop: Callable[[], bool] | None = None) -> tuple[list[str], int]:
    """Greedy replies to each example's conversation up to its last assistant turn, and the number
    of tokens read and written; ``generate_replies`` also says which prompts were cut."""
    texts, tokens, _ = generate_replies(model, tokenizer, examples, max_new_tokens, batch_size, bf16, progress, side,
                                        should_stop)
    return texts, tokens


@torch.no_grad()
def generate_replies(model: torch.nn.Module, tokenizer: Any, examples: list[Example], max_new_tokens: int,
                     batch_size: int, bf16: bool, progress: Progress | None = None, side: str = "middle",
                     should_stop: Callable[[], bool] | None = None) -> tuple[list[str], int, list[PromptCut | None]]:
    """Greedy replies to each example's conversation up to its last assistant turn, the number of
    tokens read and written (prompt tokens, then each reply up to its end token), and each
    prompt's cut (None where it fit).

    Prompts are encoded like training prompts (special strings in the data as text) and fitted
    into the model's context (``data.render.fit_prompt``: cut only when longer than the model
    can read, never to make room for the reply); a reply gets ``max_new_tokens`` or what the
    context has left. Generation stops at the chat template's end-of-turn token or the end of
    sequence. ``should_stop()`` is asked between decoding steps: when it turns true the replies
    are abandoned and EvaluationStopped is raised.
    """
    model.eval()
    dev = next(model.parameters()).device
    stops = list(chat_format(tokenizer).stop_ids)
    context = context_length(model, tokenizer)
    room = answer_room(context, max_new_tokens)
    fitted = [fit_prompt(tokenizer, ex.messages[: last_answer(ex)], context - 1, side, ex.source, context - room)
              for ex in examples]
    prompts, cuts = [f[0] for f in fitted], [f[1] for f in fitted]
    task = progress.add_task("generating", total=len(prompts), info="") if progress else None
    criteria = StoppingCriteriaList([_AskedToStop(should_stop)]) if should_stop else None
    out, tokens = [], 0
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        width = max(len(p) for p in chunk)  # left-padded: generation continues from the right edge
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in chunk], device=dev)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=dev)
        with runtime.autocast(dev, bf16):
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=min(max_new_tokens, context - width),
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=stops or None,
                                 stopping_criteria=criteria)
        if should_stop is not None and should_stop():
            raise EvaluationStopped("stopped while generating; the replies of this batch are made again")
        new = gen[:, width:]
        out += tokenizer.batch_decode(new, skip_special_tokens=True)
        tokens += int(mask.sum()) + reply_tokens(new, stops)
        if progress is not None:
            progress.update(task, advance=len(chunk))
    return [s.strip() for s in out], tokens, cuts


class _AskedToStop(StoppingCriteria):
    """Ends ``generate`` at the next decoding step once a stop was requested (SIGTERM, Ctrl-C)."""

    def __init__(self, should_stop: Callable[[], bool]) -> None:
        self.should_stop = should_stop

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.should_stop(), dtype=torch.bool, device=input_ids.device)


def reply_tokens(new: torch.Tensor, stops: int | list[int] | None) -> int:
    """Tokens generated per row up to and including the first stop token (padding after it excluded)."""
    stops = [stops] if isinstance(stops, int) else list(stops or [])
    if not stops or new.shape[1] == 0:
        return new.numel()
    ended = torch.isin(new, torch.tensor(stops, device=new.device))
    first = torch.where(ended.any(1), ended.int().argmax(1) + 1, torch.full_like(ended[:, 0], new.shape[1], dtype=torch.long))
    return int(first.sum())


def last_answer(ex: Example) -> int:
    """Index of the final assistant turn (the answer to score), or the end when there is none."""
    return max((i for i, m in enumerate(ex.messages) if m["role"] == "assistant"), default=len(ex.messages))
