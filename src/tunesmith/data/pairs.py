"""Preference rows as token ids: the chosen and the rejected answer after one shared prompt.

Each side is the conversation ``prompt + [assistant: answer]`` rendered by the model's chat template, with only the
answer's tokens (and the end-of-turn token the template or tokenizer adds) as targets, exactly as SFT encodes its last
turn (``render.encode(last_turn_only=True)``). Truncation treats both sides alike: the prompt loses its start first
(its end, the question just answered, is kept; a leading BOS token stays), down to ``max_prompt_len`` tokens (half of
``max_seq_len`` by default), then each answer keeps its start. So the two sides always share the same prompt tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunesmith.data.formats import Example
from tunesmith.data.preference import PreferenceExample
from tunesmith.data.render import IGNORE, Encoded, bos_ids, encode


@dataclass
class Pair(Encoded):
    """One preference row, encoded. ``input_ids``/``labels`` hold the chosen side (an unpaired row: its one answer,
    ``desirable`` saying whether it is a good one); ``rejected`` the rejected side (None when unpaired);
    ``reference``: the reference model's summed log-probabilities of the answers' target tokens, [chosen, rejected]
    (one entry when unpaired; then the mismatched row's, for KTO), filled in before training when the objective
    needs them."""

    rejected: Encoded | None = None
    desirable: bool | None = None
    reference: list[float] | None = None
    prompt_len: int = 0
    kl: Encoded | None = None  # KTO: this prompt with another row's answer (training.preference.mismatched)

    @property
    def n_targets(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE) + (self.rejected.n_targets if self.rejected else 0)

    @property
    def n_tokens(self) -> int:
        """Tokens of both sides (what a training pass runs)."""
        return len(self.input_ids) + (len(self.rejected.input_ids) if self.rejected else 0)

    def sides(self) -> list[Encoded]:
        """The sides as plain encodings, chosen first."""
        first = Encoded(self.input_ids, self.labels, self.truncated, self.source)
        return [first] + ([self.rejected] if self.rejected is not None else [])


def encode_pair(tokenizer: Any, ex: PreferenceExample, max_seq_len: int, max_prompt_len: int | None = None) -> Pair:
    """``ex`` as a ``Pair`` of at most ``max_seq_len`` tokens a side (see the module docstring). An unpaired row (one
    answer) gives a Pair with ``rejected`` None and ``desirable`` set. Raises DataError when the chat template cannot
    render the conversation."""
    answers = [a for a in (ex.chosen, ex.rejected) if a is not None]
    full = [encode(tokenizer, Example(ex.prompt + [{"role": "assistant", "content": a}], source=ex.source), 10**9,
                   last_turn_only=True) for a in answers]
    # the prompt: the tokens both sides share before their first target (the same text, tokenized alike)
    k = min(_first_target(f.labels) for f in full)
    for f in full[1:]:
        k = next((i for i, (a, b) in enumerate(zip(full[0].input_ids[:k], f.input_ids[:k])) if a != b), k)
    prompt = full[0].input_ids[:k]
    sides = [(f.input_ids[k:], f.labels[k:]) for f in full]
    longest = max(len(ids) for ids, _ in sides)
    truncated = None
    if len(prompt) + longest > max_seq_len:
        keep = min(len(prompt), max(max_seq_len - longest, max_prompt_len or max_seq_len // 2))
        if keep < len(prompt):
            head = prompt[:1] if bos_ids(tokenizer) and prompt[:1] == bos_ids(tokenizer) else []
            prompt = head + prompt[len(prompt) - (keep - len(head)):]
            truncated = "prompt"
        room = max_seq_len - len(prompt)
        if longest > room:
            sides = [(ids[:room], labels[:room]) for ids, labels in sides]
            truncated = "answer"
    encoded = [Encoded(prompt + ids, [IGNORE] * len(prompt) + labels, truncated, ex.source) for ids, labels in sides]
    first = encoded[0]
    return Pair(first.input_ids, first.labels, truncated, ex.source,
                rejected=encoded[1] if ex.paired else None,
                desirable=None if ex.paired else ex.chosen is not None, prompt_len=len(prompt))


def _first_target(labels: list[int]) -> int:
    return next((i for i, x in enumerate(labels) if x != IGNORE), len(labels))


def encode_pairs(tokenizer: Any, rows: list[PreferenceExample], max_seq_len: int, max_prompt_len: int | None = None,
                 unpaired: bool = False) -> tuple[list[Pair], dict[str, int]]:
    """Every row encoded, and counts of what truncation did (``prompt_cut``, ``answer_cut``). ``unpaired``: a paired
    row becomes two unpaired ones (its chosen answer desirable, its rejected one not), as KTO trains on them."""
    if unpaired:
        rows = [r for ex in rows for r in ([PreferenceExample(ex.prompt, ex.chosen, None, ex.source),
                                            PreferenceExample(ex.prompt, None, ex.rejected, ex.source)]
                                           if ex.paired else [ex])]
    out = [encode_pair(tokenizer, ex, max_seq_len, max_prompt_len) for ex in rows]
    stats = {"rows": len(out), "prompt_cut": sum(p.truncated == "prompt" for p in out),
             "answer_cut": sum(p.truncated == "answer" for p in out),
             "tokens": sum(p.n_tokens for p in out), "target_tokens": sum(p.n_targets for p in out)}
    return out, stats
