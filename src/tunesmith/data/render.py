"""Rendering conversations with the tokenizer's own chat template, and the loss mask.

Only the assistant's tokens and its end-of-turn token are trained (label = token id);
every other position gets -100. The mask is found by character spans: the template is
rendered for the conversation up to each assistant turn (with the generation prompt) and
up to its end, and the tokens whose characters fall inside that span are targets, up to
and including the end-of-turn token. Anything the template adds after it (a newline) is not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tunesmith.data.formats import DataError, Example

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken
    truncated: bool = False
    source: str = ""
    class_label: int | None = None  # for a classification head: the label's index (then ``labels`` is empty)

    @property
    def n_targets(self) -> int:
        if self.class_label is not None:
            return 1
        return sum(1 for x in self.labels if x != IGNORE)


def render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def target_spans(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character span [start, end) of each assistant reply.

    The end includes the end-of-turn token when the template emits one.
    """
    text = render(tokenizer, messages)
    eot = tokenizer.eos_token or ""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = render(tokenizer, messages[: i + 1])
        if not (text.startswith(before) and text.startswith(upto) and upto.startswith(before)):
            raise DataError(
                "the tokenizer's chat template does not render conversations incrementally, "
                "so assistant tokens cannot be located; use a model with a standard chat template"
            )
        start, end = len(before), len(upto)
        cut = upto.rfind(eot, start, end) if eot else -1
        spans.append((start, cut + len(eot) if cut >= 0 else end))
    return text, spans


def encode(tokenizer: Any, example: Example, max_seq_len: int, last_turn_only: bool = False) -> Encoded:
    """Token ids and labels for one conversation, truncated on the right to ``max_seq_len``.

    Raw text (``example.text``) is trained on every token, then the end-of-text token.
    ``last_turn_only`` (for scoring an answer after few-shot turns) makes only the final
    assistant turn a target and truncates on the left instead, so the answer survives.
    """
    if example.text is not None:
        ids = tokenizer(example.text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return Encoded(ids[:max_seq_len], list(ids[:max_seq_len]), len(ids) > max_seq_len, example.source)
    text, spans = target_spans(tokenizer, example.messages)
    if last_turn_only:
        spans = spans[-1:]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    labels = [IGNORE] * len(ids)
    for k, (a, b) in enumerate(enc["offset_mapping"]):
        if b > a and any(s <= a and b <= e for s, e in spans):
            labels[k] = ids[k]
    truncated = len(ids) > max_seq_len
    keep = slice(-max_seq_len, None) if last_turn_only else slice(None, max_seq_len)
    return Encoded(ids[keep], labels[keep], truncated, example.source)


def encode_all(tokenizer: Any, examples: list[Example], max_seq_len: int,
               last_turn_only: bool = False) -> tuple[list[Encoded], dict[str, int]]:
    """Encode examples; drop those left with no target token after truncation.

    Returns the encodings and counts: ``examples``, ``truncated``, ``dropped_no_target``, ``tokens``,
    ``target_tokens``.
    """
    out, truncated, dropped = [], 0, 0
    for ex in examples:
        e = encode(tokenizer, ex, max_seq_len, last_turn_only)
        truncated += e.truncated
        if e.n_targets == 0:
            dropped += 1
            continue
        out.append(e)
    stats = {
        "examples": len(examples),
        "kept": len(out),
        "truncated": truncated,
        "dropped_no_target": dropped,
        "tokens": sum(len(e.input_ids) for e in out),
        "target_tokens": sum(e.n_targets for e in out),
    }
    return out, stats


def encode_for_head(tokenizer: Any, example: Example, label_index: dict[str, int], max_seq_len: int) -> Encoded:
    """The example's text for a classification head: the last user turn (or raw text), no chat
    template, with the model's own special tokens ([CLS] ... [SEP] for BERT), and the label's index."""
    users = [m["content"] for m in example.messages if m["role"] == "user"]
    text = example.text if example.text is not None else (users[-1] if users else "")
    if example.label not in label_index:
        raise DataError(f"{example.source or 'an example'}: label {example.label!r} is not one of {sorted(label_index)}")
    full = tokenizer(text)["input_ids"]
    ids = tokenizer(text, truncation=True, max_length=max_seq_len)["input_ids"] if len(full) > max_seq_len else full
    return Encoded(ids, [], len(full) > max_seq_len, example.source, class_label=label_index[example.label])


def collate(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encodings into (B, T) tensors (labels (B,) for a classification head)."""
    width = max(len(e.input_ids) for e in batch)
    if batch[0].class_label is not None:
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, e in enumerate(batch):
            input_ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
            attention_mask[i, : len(e.input_ids)] = 1
        labels = torch.tensor([e.class_label for e in batch], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def pack(lengths: list[int], max_len: int) -> list[list[int]]:
    """Best-fit decreasing: indices of examples grouped into rows of at most ``max_len`` tokens."""
    bins: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        fits = [b for b in range(len(bins)) if free[b] >= lengths[i]]
        if fits:
            b = min(fits, key=lambda k: free[k])  # the tightest row that still fits
            bins[b].append(i)
            free[b] -= lengths[i]
        else:
            bins.append([i])
            free.append(max_len - lengths[i])
    return bins


def collate_packed(batch: list[Encoded], pad_id: int, max_len: int) -> dict[str, torch.Tensor]:
    """Pack examples into as few rows as fit ``max_len``; no padding between examples.

    ``position_ids`` restart at 0 for each example, and no ``attention_mask`` is passed:
    transformers then builds a block-diagonal causal mask from the position ids, so no
    example attends to another. The first token of each example is not a target (it would
    be predicted from the previous example's last token).
    """
    rows = pack([len(e.input_ids) for e in batch], max_len)
    width = max(sum(len(batch[i].input_ids) for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = len(batch[i].input_ids)
            input_ids[r, at : at + n] = torch.tensor(batch[i].input_ids)
            labels[r, at + 1 : at + n] = torch.tensor(batch[i].labels[1:])
            position_ids[r, at : at + n] = torch.arange(n)
            at += n
        position_ids[r, at:] = torch.arange(width - at)  # padding forms its own segment, never a target
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
