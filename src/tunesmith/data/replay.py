"""Replay: general data mixed into the training list, so the model keeps practising what it knew.

Two kinds of replay rows, both marked ``kind="replay"``:

* **text** (``replay.data: general`` or a file of general text): plain language modelling (every
  token after a window's first is a target), cut into windows of ``train.max_seq_len`` tokens by
  the raw-text encoder (``render.encode_text``);
* **conversations** (``replay.data: instructions`` or a file of instructions / chats): each
  conversation with a reply, the reply's tokens (and end of turn) the targets, rendered like task
  rows. With ``replay.replies: base`` the reply is the base model's own greedy answer
  (``replies.cached_replies``): the run keeps rehearsing how the base answered everyday requests,
  which is what a narrow task makes a chat model forget first (answers collapse to a word).

``mix`` chooses how many go into the training list so that the
replay share of one epoch is ``replay.ratio``:

* by ``examples``: r / (n + r) = ratio, so r = round(ratio * n / (1 - ratio)) rows for n task rows;
* by ``tokens``: R / (N + R) = ratio over target tokens, so R = ratio * N / (1 - ratio); whole
  windows are taken until R is reached and the last one is shortened to hit it (to the token).

Each epoch visits every row of the list once (train.step_batches), so the share holds exactly
over an epoch (a run of ``max_steps`` shorter than an epoch sees it only on average). Windows are
taken in an order seeded by ``train.seed``; when the general set has fewer windows than needed,
it is gone through again in a new order (windows repeat) and the summary says so.
Validation stays the task's own rows: the validation loss is the task's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from tunesmith.data.formats import DataError, Example, read_table
from tunesmith.data.layouts import detect_layout, rows_to_examples
from tunesmith.data.render import IGNORE, Encoded, encode, encode_text


def replay_rows(tokenizer: Any, texts: list[str], max_seq_len: int) -> list[Encoded]:
    """Every general text as windows of at most ``max_seq_len`` tokens (``encode_text``: the text,
    then the end-of-text token, windows overlapping by one token), marked ``kind="replay"``.
    Windows with no target token (a one-token text) are left out."""
    out: list[Encoded] = []
    for i, text in enumerate(texts):
        windows = encode_text(tokenizer, Example(messages=[], text=text, source=f"replay:{i + 1}"), max_seq_len)
        out += [dataclasses.replace(w, kind="replay") for w in windows if w.n_targets]
    return out


PROMPT_COLUMNS = ("instruction", "prompt", "question", "query")  # a one-column file of these: instructions alone


def conversation_rows(tokenizer: Any, conversations: list[Example], max_seq_len: int) -> list[Encoded]:
    """Each conversation (ending with an assistant reply) encoded like a task row, every assistant
    turn a target (``render.encode``), marked ``kind="replay"``; rows left with no target are dropped."""
    out = []
    for ex in conversations:
        row = encode(tokenizer, ex, max_seq_len)
        if row.n_targets:
            out.append(dataclasses.replace(row, kind="replay"))
    return out


def with_replies(conversations: list[Example], replies: list[str]) -> list[Example]:
    """Each conversation up to its last assistant turn (the whole of it when there is none), then
    ``replies[i]`` as the assistant's answer."""
    out = []
    for ex, reply in zip(conversations, replies, strict=True):
        last = max((i for i, m in enumerate(ex.messages) if m["role"] == "assistant"), default=len(ex.messages))
        out.append(dataclasses.replace(ex, messages=ex.messages[:last] + [{"role": "assistant", "content": reply}]))
    return out


def read_replay_file(path: str) -> tuple[list[str] | None, list[Example] | None]:
    """A user's replay file: ``(texts, None)`` for general text (a text file, or a table with a
    ``text`` column or a single column), ``(None, conversations)`` for instructions or chats (any
    layout tunesmith reads: instruction/input/output, messages, prompt/completion, ...). Raises
    DataError naming the file when it is neither."""
    table = read_table(path)
    prompts = [c for c in table.columns if c.lower() in PROMPT_COLUMNS]
    if len(table.columns) == 1 and prompts:  # instructions alone: the base model writes the replies
        asked = [str(r.values.get(prompts[0]) or "").strip() for r in table.rows]
        return None, [Example([{"role": "user", "content": q}], source=f"{path}:{i + 1}") for i, q in enumerate(asked) if q]
    if table.format == "text" or "text" in table.columns or len(table.columns) == 1:
        from tunesmith.data.general import read_texts

        return read_texts(path), None
    try:
        layout = detect_layout(table, None, None, "instruction")
    except DataError as e:
        raise DataError(f"{path}: replay data must be general text (a 'text' column) or instructions/conversations; "
                        f"{e}") from None
    conversations = [ex for ex in rows_to_examples(table, layout) if ex.messages]
    if not conversations:
        raise DataError(f"{path}: no conversation to replay")
    return None, conversations


def mix(task: list[Encoded], pool: list[Encoded], ratio: float, by: str, seed: int) -> tuple[list[Encoded], dict[str, Any]]:
    """The training list: ``task`` rows followed by the replay rows chosen from ``pool``, and a
    summary for train_result.json.

    ``ratio`` in [0, 1) is the wanted replay share of the list, by ``examples`` or by target
    ``tokens`` (see the module docstring). Deterministic for a given ``seed``. Raises ValueError
    when replay is wanted but ``pool`` is empty or ``by`` is unknown.
    """
    if by not in ("examples", "tokens"):
        raise ValueError(f"replay.by: {by!r} is not one of examples, tokens")
    if ratio <= 0:
        return list(task), {"ratio": 0.0, "rows": 0}
    if not pool:
        raise ValueError("replay: the general text gave no window with a target token")
    n_task = len(task) if by == "examples" else sum(e.n_targets for e in task)
    want = round(ratio * n_task / (1 - ratio))  # replay rows, or replay target tokens
    chosen: list[Encoded] = []
    got, cycle = 0, 0
    while got < want:
        g = torch.Generator().manual_seed(seed * 1_000_003 + 7_919 * cycle + 17)
        for i in torch.randperm(len(pool), generator=g).tolist():
            missing = want - got
            if missing <= 0:
                break
            row = pool[i]
            if by == "tokens" and row.n_targets > missing:  # the last window, shortened to hit the token count
                row = _shorten(row, missing)
            chosen.append(row)
            got += 1 if by == "examples" else row.n_targets
        cycle += 1
    repeated = cycle > 1
    mixed = list(task) + chosen
    summary = {
        "ratio": ratio, "by": by, "rows": len(chosen), "windows_available": len(pool), "repeated": repeated,
        "target_tokens": sum(e.n_targets for e in chosen),
        "achieved_ratio_examples": len(chosen) / max(len(mixed), 1),
        "achieved_ratio_tokens": sum(e.n_targets for e in chosen) / max(sum(e.n_targets for e in mixed), 1),
    }
    notes = []
    if repeated:
        notes.append(f"the replay data gives {len(pool)} rows and {len(chosen)} were needed: "
                     "rows repeat (each pass in a new seeded order)")
    tokens_share = summary["achieved_ratio_tokens"]
    if by == "examples" and tokens_share > max(2 * ratio, ratio + 0.2):  # e.g. long replies next to one-word labels
        notes.append(f"the replay rows are much longer than the task's: {tokens_share:.0%} of the trained target "
                     f"tokens are replay for {ratio:.0%} of the rows (replay.by: tokens sets the token share instead)")
    if notes:
        summary["note"] = "; ".join(notes)
    return mixed, summary


def _shorten(row: Encoded, targets: int) -> Encoded:
    """The first tokens of ``row`` holding exactly ``targets`` target tokens (a replay window's
    targets are every token but the first)."""
    kept, end = 0, 0
    for end, label in enumerate(row.labels):
        kept += label != IGNORE
        if kept == targets:
            break
    return dataclasses.replace(row, input_ids=row.input_ids[: end + 1], labels=row.labels[: end + 1], truncated="window")
