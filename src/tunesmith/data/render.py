"""Rendering conversations with the chat template, the loss mask, and truncation.

One source of truth for the chat format: ``chat_format(tokenizer)`` learns from the tokenizer's
own template, by rendering probe conversations, which token ends an assistant turn (``<|im_end|>``
for ChatML even when ``eos_token`` is ``<|endoftext|>``), whether the template accepts a system
turn, and the ids generation must stop on. Training, evaluation (and later export and serving)
read it from here.

Loss mask: only the assistant's tokens and its end-of-turn token are trained (label = token id);
every other position gets -100. The mask is found by character spans: the template is rendered
for the conversation up to each assistant turn (with the generation prompt) and up to its end,
and the tokens whose characters fall inside that span are targets, up to and including the
end-of-turn token; anything the template adds after it (a newline) is not. A template that closes
no turn gets the end-of-sequence token appended to each reply, so the model learns to stop.

Special-token strings inside the data (a reply that quotes ``<|im_end|>``) are text: such
examples are tokenized piece by piece, their contents with ``split_special_tokens``, so only the
template's own markers are control tokens.

Truncation keeps the answer: an example longer than ``max_seq_len`` loses tokens of its last
user message (its middle by default, or its start or end: ``data.truncation_side``); only when
that is not enough is the end of the sequence cut, the answer with it.
"""

from __future__ import annotations

import contextlib
import hashlib
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from tunesmith.config import Config
from tunesmith.data.formats import DataError, Example

IGNORE = -100
# Templates that write today's date (Llama 3.1-3.3: "Today Date: ...") get this one, their own fallback,
# so a run's text is the same whatever day it is rendered: a resume after midnight, a rerun next week
# and the prompts sent at inference see what training saw.
TEMPLATE_DATE = "26 Jul 2024"
_PROBE = "tunesmith probe reply 7"

# Named templates for models without one (``data.chat_template``): {{ }} Jinja, like the tokenizer's own.
TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # the Alpaca prompt format, for base models: plain text, each reply closed by the end-of-sequence token
    "alpaca": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
        "{% else %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
    ),
    # Gemma's turn format (its instruction-tuned models' template): roles user and model, no system
    # role (tunesmith folds a system prompt into the first user turn), each turn closed by <end_of_turn>
    "gemma": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' "
        "+ message['content'] + '<end_of_turn>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    ),
}
# the control tokens of each named template: marked special where the vocabulary has them as single
# tokens (a GGUF's tokenizer may carry them as plain tokens), so the end of turn is found and user
# text that spells them is encoded as text
CONTROL_TOKENS = {"chatml": ("<|im_start|>", "<|im_end|>"), "gemma": ("<start_of_turn>", "<end_of_turn>")}


@dataclass(frozen=True)
class ChatFormat:
    """What a tokenizer's chat template does, learnt by rendering probe conversations."""

    end_of_turn: str  # the special token that closes an assistant turn, e.g. "<|im_end|>"
    end_of_turn_id: int | None
    from_template: bool  # False: the template closes no turn; the eos token is appended to replies
    system_role: bool  # False: the template rejects (or drops) system turns; they are folded into the first user turn
    stop_ids: tuple[int, ...]  # generation stops on any of these: the end of turn and the end of sequence
    specials: tuple[str, ...]  # special-token strings, longest first
    # What the template writes inside an assistant turn before the reply, e.g. Qwen3's empty thinking
    # block "<think>\n\n</think>\n\n". Generation prompts end with it (Qwen's non-thinking mode, what
    # `enable_thinking=False` renders), so it is prompt, never a target, and answers do not start with it.
    reply_prefix: str = ""


_FORMATS: weakref.WeakKeyDictionary[Any, tuple[str, ChatFormat]] = weakref.WeakKeyDictionary()


def chat_format(tokenizer: Any) -> ChatFormat:
    """The tokenizer's chat format, learnt once per tokenizer (again if its template or special
    tokens change). Raises DataError when the tokenizer has no chat template."""
    signature = hashlib.sha1(repr((tokenizer.chat_template, tokenizer.eos_token, tokenizer.all_special_tokens)).encode()).hexdigest()
    cached = _FORMATS.get(tokenizer)
    if cached is None or cached[0] != signature:
        cached = (signature, _learn_format(tokenizer))
        _FORMATS[tokenizer] = cached
    return cached[1]


def _learn_format(tokenizer: Any) -> ChatFormat:
    if not tokenizer.chat_template:
        raise DataError("the tokenizer has no chat template; set data.chat_template")
    specials = tuple(sorted({str(t) for t in tokenizer.all_special_tokens} | {
        t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}, key=len, reverse=True))
    system_role = True
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "system", "content": "probe system 5"}, {"role": "user", "content": "hi"},
             {"role": "assistant", "content": _PROBE}], tokenize=False)
        system_role = "probe system 5" in text
    except Exception:  # noqa: BLE001 - Jinja templates raise whatever they like ("System role not supported")
        system_role = False
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}],
                                             tokenize=False)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"the chat template cannot render a user turn and a reply ({e}); set data.chat_template") from None
    if _PROBE not in text:
        raise DataError("the chat template does not write the messages' content (rendered: "
                        f"{text[:80]!r}); fix data.chat_template")
    suffix = text[text.rfind(_PROBE) + len(_PROBE):]
    found = [(suffix.find(s), s) for s in specials if s in suffix]
    eot = min(found)[1] if found else (tokenizer.eos_token or "")
    eot_id = tokenizer.convert_tokens_to_ids(eot) if eot else None
    stops = tuple(dict.fromkeys(i for i in (eot_id, tokenizer.eos_token_id) if isinstance(i, int)))
    return ChatFormat(eot, eot_id, bool(found), system_role, stops, specials, _reply_prefix(tokenizer, text))


def _reply_prefix(tokenizer: Any, text: str) -> str:
    """The non-blank text between the generation prompt and the reply in ``text`` (a rendered user
    turn "hi" and the probe reply), or ""."""
    try:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - Jinja templates raise whatever they like
        return ""
    between = text[len(prompt):text.rfind(_PROBE)] if text.startswith(prompt) else ""
    return between if between.strip() else ""


def require_chat_template(tokenizer: Any, model: str) -> None:
    """ModelError-style DataError, before any data work, when ``model`` has no chat template."""
    if not tokenizer.chat_template:
        raise DataError(f"model {model!r} has no chat template (a base model?), so conversations cannot be rendered. "
                        f"Set data.chat_template to a Jinja template or to one of: {', '.join(TEMPLATES)} "
                        "(alpaca: the plain '### Instruction: / ### Response:' format, ended by the eos token)")


def set_chat_template(tokenizer: Any, setting: str | None) -> None:
    """Apply ``data.chat_template`` (a name in TEMPLATES, or Jinja) to the tokenizer; None keeps its own.
    A named template's control tokens (``CONTROL_TOKENS``) that the vocabulary holds as single tokens
    are marked special (no new tokens: the vocabulary and the model's embeddings keep their size)."""
    if not setting:
        return
    template = TEMPLATES.get(setting, setting)
    if setting in TEMPLATES and "bos_token" not in template and bos_ids(tokenizer):
        # a model pretrained with every text starting at its BOS token (Gemma, Llama) reads a named
        # template from there too, as its own templates begin ({{ bos_token }})
        template = "{{ bos_token }}" + template
    tokenizer.chat_template = template
    vocab = tokenizer.get_vocab()
    marks = [t for t in CONTROL_TOKENS.get(setting, ()) if t in vocab and t not in tokenizer.all_special_tokens]
    if marks:
        tokenizer.add_special_tokens({"extra_special_tokens": marks}, replace_extra_special_tokens=False)


def fold_system(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """System turns merged into the next user turn (for templates that reject the system role)."""
    out: list[dict[str, str]] = []
    pending = ""
    for m in messages:
        if m["role"] == "system":
            pending += m["content"] + "\n\n"
        elif pending and m["role"] == "user":
            out.append({"role": "user", "content": pending + m["content"]})
            pending = ""
        else:
            if pending:  # a system prompt before an assistant turn: it becomes a user turn of its own
                out.append({"role": "user", "content": pending.rstrip()})
                pending = ""
            out.append(m)
    return out + ([{"role": "user", "content": pending.rstrip()}] if pending else [])


def render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = False, source: str = "") -> str:
    """The conversation as the chat template writes it; DataError (naming ``source``) when the
    template rejects it, e.g. roles that do not alternate."""
    fmt = chat_format(tokenizer)
    if not fmt.system_role:
        messages = fold_system(messages)
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             date_string=TEMPLATE_DATE)
        return text + fmt.reply_prefix if add_generation_prompt else text
    except Exception as e:  # noqa: BLE001 - a Jinja template can raise anything
        raise DataError(f"{source or 'a conversation'}: the chat template cannot render it ({e})") from None


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken
    truncated: str | None = None  # None, "prompt" (the answer kept), "answer" (cut too) or "text"
    source: str = ""
    class_label: int | None = None  # for a classification head: the label's index (then ``labels`` is empty)
    special_text: bool = False  # the data held special-token strings, tokenized as text
    task: str = ""  # a multi-task run: the name of the task (tasks[].name) the row belongs to
    kind: str = "task"  # "task": the run's own data; "replay": general text mixed in (data/replay.py)
    cut: PromptCut | None = None  # how the example was shortened to fit (None: whole)

    @property
    def n_targets(self) -> int:
        if self.class_label is not None:
            return 1
        return sum(1 for x in self.labels if x != IGNORE)


def target_spans(tokenizer: Any, messages: list[dict[str, str]], source: str = "") -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character span [start, end) of each assistant reply.

    The end includes the end-of-turn token when the template emits one; otherwise it is the end
    of the reply (the caller appends the eos token).
    """
    fmt = chat_format(tokenizer)
    text = render(tokenizer, messages, source=source)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        upto = render(tokenizer, messages[: i + 1], source=source)
        try:
            before = render(tokenizer, messages[:i], add_generation_prompt=True, source=source)
        except DataError:  # e.g. a template that cannot render an empty conversation
            before = None
        if i == 0 and (before is None or not upto.startswith(before)):
            # a conversation that opens with the assistant: its prompt is whatever the template puts first
            at = upto.rfind(m["content"]) if m["content"] else -1
            before = upto[:at] if at >= 0 else before
        if before is None or not (text.startswith(before) and text.startswith(upto) and upto.startswith(before)):
            located = _spans_by_content(tokenizer, messages, text, fmt)
            if located is not None:  # a template that renders earlier turns otherwise (Qwen3 drops their thinking)
                return text, located
            raise DataError(
                f"{source or 'a conversation'}: the tokenizer's chat template does not render conversations "
                "incrementally, so assistant tokens cannot be located; use a model with a standard chat template "
                "or set data.chat_template")
        start, end = len(before), len(upto)
        if fmt.from_template:
            cut = upto.rfind(fmt.end_of_turn, start, end)
            spans.append((start, cut + len(fmt.end_of_turn) if cut >= 0 else end))
        else:
            reply = m["content"].strip()
            at = upto.rfind(reply, start, end) if reply else -1
            spans.append((start, at + len(reply) if at >= 0 else end))
    return text, spans


def _spans_by_content(tokenizer: Any, messages: list[dict[str, str]], text: str,
                      fmt: ChatFormat) -> list[tuple[int, int]] | None:
    """Assistant spans found in the whole rendering by their content, for templates that do not
    render incrementally: from each reply's first character to the end-of-turn token after it
    (inclusive). None when a reply cannot be found or the template closes no turn."""
    if not fmt.from_template:
        return None
    msgs = messages if fmt.system_role else fold_system(messages)
    found = _content_spans(tokenizer, msgs, text)
    spans = []
    for m, where in zip(msgs, found):
        if m["role"] != "assistant":
            continue
        if where is None or not m["content"]:
            return None
        end = text.find(fmt.end_of_turn, where[1])
        if end < 0:
            return None
        spans.append((where[0], end + len(fmt.end_of_turn)))
    return spans


def _content_spans(tokenizer: Any, messages: list[dict[str, str]], text: str) -> list[tuple[int, int] | None]:
    """Where each message's content sits in the rendered ``text`` (None where it cannot be found)."""
    out: list[tuple[int, int] | None] = []
    cursor = 0
    for i, m in enumerate(messages):
        try:
            prefix = render(tokenizer, messages[:i]) if i else ""
            start = len(prefix) if text.startswith(prefix) else cursor
        except DataError:
            start = cursor
        at = text.find(m["content"], max(start, cursor)) if m["content"] else -1
        out.append((at, at + len(m["content"])) if at >= 0 else None)
        if at >= 0:
            cursor = at + len(m["content"])
    return out


def _tokenize(tokenizer: Any, text: str, protect: list[tuple[int, int]]) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of ``text``; inside the ``protect`` spans special-token
    strings are split as text (``split_special_tokens``), elsewhere they are control tokens."""
    if not protect:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    at = 0
    pieces = []
    for a, b in sorted(protect):
        pieces += [(at, a, False), (a, b, True)]
        at = b
    pieces.append((at, len(text), False))
    for a, b, as_text in pieces:
        if a >= b:
            continue
        enc = tokenizer(text[a:b], add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=as_text)
        ids += enc["input_ids"]
        offsets += [(x + a, y + a) for x, y in enc["offset_mapping"]]
    return ids, offsets


def encode_plain(tokenizer: Any, text: str, add_special_tokens: bool = False) -> list[int]:
    """Token ids of a plain text (no chat template), special-token strings in it tokenized as text.

    The one way text from data or users becomes ids outside the chat template (raw text windows,
    classification heads, general text, lengths in data reports): ``<|im_end|>`` written in a
    review is the characters ``<|im_end|>``, never the control token. ``add_special_tokens``: the
    model's own markers around the text (``[CLS] ... [SEP]`` for BERT), as its tokenizer adds them."""
    return list(tokenizer(text, add_special_tokens=add_special_tokens, split_special_tokens=True)["input_ids"])


def bos_ids(tokenizer: Any) -> list[int]:
    """``[bos_token_id]`` when the tokenizer puts its beginning-of-sequence token before a text by
    itself (Gemma, Llama, Mistral: ``add_special_tokens=True``), else ``[]`` (SmolLM2, Qwen,
    GPT-2, and encoders, whose ``[CLS]`` is not a BOS). Such models were pretrained with every
    document starting at that token and are off their distribution without it: Gemma 3 270M read
    the shipped Wikipedia text at perplexity 50.7 without it and 14.3 with it, and scored SST-2
    zero-shot 0.612 without it in the alpaca template, 0.667 with it."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if not isinstance(bos, int):
        return []
    cached = getattr(tokenizer, "_tunesmith_bos", None)
    if cached is not None and cached[0] == bos:
        return list(cached[1])
    with_specials = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    out = [bos] if with_specials[:1] == [bos] and plain[:1] != [bos] else []
    with contextlib.suppress(AttributeError):  # a tokenizer that refuses attributes is asked each time
        tokenizer._tunesmith_bos = (bos, tuple(out))
    return out


def encode_document(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a text a causal language model reads from its start (raw-text training and
    evaluation windows, general text, ``task: text`` prompts, ``/v1/completions``): the model's own
    beginning-of-sequence token where its tokenizer adds one (``bos_ids``), then ``encode_plain``."""
    return bos_ids(tokenizer) + encode_plain(tokenizer, text)


def has_special_text(tokenizer: Any, text: str) -> bool:
    """Whether ``text`` holds a special-token string of ``tokenizer`` (counted in data reports)."""
    specials = {str(t) for t in getattr(tokenizer, "all_special_tokens", [])} | {
        t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if getattr(t, "special", False)}
    return any(s and s in text for s in specials)


def _protected_spans(tokenizer: Any, messages: list[dict[str, str]], text: str) -> list[tuple[int, int]]:
    """Content spans that hold a special-token string (usually none: then the text is tokenized whole,
    exactly as ``apply_chat_template(tokenize=True)`` would)."""
    specials = chat_format(tokenizer).specials
    if not any(s in m["content"] for m in messages for s in specials):
        return []
    spans = _content_spans(tokenizer, messages, text)
    return [sp for m, sp in zip(messages, spans) if sp is not None and any(s in m["content"] for s in specials)]


def encode(tokenizer: Any, example: Example, max_seq_len: int, last_turn_only: bool = False,
           side: str = "middle") -> Encoded:
    """Token ids and labels for one conversation, at most ``max_seq_len`` tokens.

    Raw text (``example.text``): its first window (see ``encode_text``, which gives them all).
    ``last_turn_only``
    (for scoring an answer after few-shot turns) makes only the final assistant turn a target and
    drops the earliest shots first when the conversation is too long. Raises DataError when the
    template cannot render the conversation.
    """
    if example.text is not None:
        return encode_text(tokenizer, example, max_seq_len)[0]
    messages = example.messages
    ids, labels, special = _encode_full(tokenizer, messages, last_turn_only, example.source)
    total, where = len(ids), []
    if last_turn_only and len(ids) > max_seq_len:  # few-shot prompts lose their oldest shots first
        kept = _drop_old_shots(tokenizer, messages, max_seq_len, example.source)
        if len(kept) < len(messages):
            where.append(f"the {(len(messages) - len(kept)) // 2} oldest earlier turns (examples) left out")
        messages = kept
        ids, labels, special = _encode_full(tokenizer, messages, last_turn_only, example.source)
    if len(ids) <= max_seq_len:
        cut = PromptCut(total, len(ids), "; ".join(where)) if where else None
        return Encoded(ids, labels, None, example.source, special_text=special, cut=cut)
    ids, labels, how = _fit(tokenizer, messages, ids, labels, max_seq_len, side, example.source, last_turn_only)
    part = {"left": "start", "right": "end"}.get(side, "middle")
    where.append(f"the {part} of the last user message" if how == "prompt" else
                 "the start of the conversation" if last_turn_only else "the end of the answer")
    return Encoded(ids, labels, how, example.source, special_text=special, cut=PromptCut(total, len(ids), "; ".join(where)))


def encode_text(tokenizer: Any, example: Example, max_seq_len: int) -> list[Encoded]:
    """A raw text, then the end-of-text token, in windows of at most ``max_seq_len`` tokens that
    overlap by one token: every token after the text's first is a target exactly once (the first
    token of a window is context only), so a long document is trained on whole, not cut short.
    For a model whose tokenizer puts a BOS token before every text (``bos_ids``), every window
    starts with it, not only the first: such a model reads a window without it as far off its
    distribution (Gemma 3 270M: loss 5.7 against 3.3 on the same second window of a Wikipedia text)."""
    bos = bos_ids(tokenizer)
    ids = encode_plain(tokenizer, example.text) + [tokenizer.eos_token_id]
    body = max(2, max_seq_len - len(bos))
    special = has_special_text(tokenizer, example.text)
    out = []
    start = 0
    while True:
        chunk = ids[start : start + body]
        # the text's first token is a target when a BOS precedes it; a later window's first token
        # was the previous window's last target: context only
        first = chunk[:1] if (bos and start == 0) else [IGNORE]
        out.append(Encoded(bos + chunk, [IGNORE] * len(bos) + first + chunk[1:],
                           "window" if len(ids) > body else None, example.source, special_text=special))
        if start + body >= len(ids) or len(ids) < 2:
            break
        start += body - 1
    return out


def _encode_full(tokenizer: Any, messages: list[dict[str, str]], last_turn_only: bool,
                 source: str) -> tuple[list[int], list[int], bool]:
    """Ids and labels of the whole conversation, untruncated, and whether special strings were protected."""
    fmt = chat_format(tokenizer)
    if not fmt.system_role:
        messages = fold_system(messages)
    text, spans = target_spans(tokenizer, messages, source)
    if last_turn_only:
        spans = spans[-1:]
    protect = _protected_spans(tokenizer, messages, text)
    ids, offsets = _tokenize(tokenizer, text, protect)
    labels = [IGNORE] * len(ids)
    for k, (a, b) in enumerate(offsets):
        if b > a and any(s <= a and b <= e for s, e in spans):
            labels[k] = ids[k]
    if not fmt.from_template and tokenizer.eos_token_id is not None:
        ids, labels = _append_eos(ids, labels, offsets, spans, tokenizer.eos_token_id)
    return ids, labels, bool(protect)


def _append_eos(ids: list[int], labels: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]],
                eos: int) -> tuple[list[int], list[int]]:
    """Insert the eos token, as a target, after the last token of each reply span."""
    ends = sorted({max((k for k, (a, b) in enumerate(offsets) if b > a and s <= a and b <= e), default=-1)
                   for s, e in spans} - {-1}, reverse=True)
    for k in ends:
        ids = ids[: k + 1] + [eos] + ids[k + 1:]
        labels = labels[: k + 1] + [eos] + labels[k + 1:]
    return ids, labels


def _drop_old_shots(tokenizer: Any, messages: list[dict[str, str]], max_seq_len: int,
                    source: str) -> list[dict[str, str]]:
    """The conversation without its earliest shots (user/assistant pairs after any system turn),
    as few dropped as make it fit ``max_seq_len``, the question and its answer always kept."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    rest = messages[len(system):]
    while len(rest) > 2:
        rest = rest[2:]
        if len(_encode_full(tokenizer, system + rest, True, source)[0]) <= max_seq_len:
            break
    return system + rest


def _fit(tokenizer: Any, messages: list[dict[str, str]], ids: list[int], labels: list[int], max_len: int,
         side: str, source: str, keep_end: bool = False) -> tuple[list[int], list[int], str]:
    """Cut an over-long example to ``max_len`` tokens, keeping its answer where possible.

    A single answer (classification, instruction, few-shot scoring): tokens of the last user
    message's content go, by ``side``, down to a quarter of ``max_len`` (a question needs some of
    itself); if that is not enough, the end of the answer goes too (the start, with ``keep_end``,
    for scoring an answer). Several answers (a multi-turn chat): the end is cut, keeping the
    earlier turns whole.
    """
    targets = [k for k, x in enumerate(labels) if x != IGNORE]
    answers = _answer_starts(labels)
    how = "prompt"
    if len(answers) == 1 and targets:
        question = _question_tokens(tokenizer, messages, answers[0], source)
        if question is not None:
            excess = len(ids) - max_len
            qlen = question[1] - question[0]
            cut = min(excess, qlen - min(qlen, max(1, max_len // 4)))
            if cut > 0:
                a, b = _cut_range(question[0], question[1], cut, side)
                ids, labels = ids[:a] + ids[b:], labels[:a] + labels[b:]
            if len(ids) <= max_len:
                return ids, labels, how
    targets = [k for k, x in enumerate(labels) if x != IGNORE]
    excess = len(ids) - max_len
    if keep_end:
        return ids[-max_len:], labels[-max_len:], "prompt" if not targets or targets[0] >= excess else "answer"
    return ids[:max_len], labels[:max_len], "answer" if targets and targets[-1] >= max_len else how


def _answer_starts(labels: list[int]) -> list[int]:
    """Index of the first target token of each run of targets (one run per assistant turn)."""
    return [k for k, x in enumerate(labels) if x != IGNORE and (k == 0 or labels[k - 1] == IGNORE)]


def _question_tokens(tokenizer: Any, messages: list[dict[str, str]], answer: int, source: str) -> tuple[int, int] | None:
    """Token range [a, b) of the last user message's content before the answer, or None."""
    fmt = chat_format(tokenizer)
    msgs = messages if fmt.system_role else fold_system(messages)
    users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
    if not users:
        return None
    text = render(tokenizer, msgs, source=source)
    spans = _content_spans(tokenizer, msgs, text)
    span = spans[users[-1]]
    if span is None:
        return None
    ids, offsets = _tokenize(tokenizer, text, _protected_spans(tokenizer, msgs, text))
    inside = [k for k, (a, b) in enumerate(offsets) if b > a and span[0] <= a and b <= span[1] and k < answer]
    return (inside[0], inside[-1] + 1) if inside else None


def _cut_range(a: int, b: int, n: int, side: str) -> tuple[int, int]:
    """The ``n`` positions of [a, b) to remove: its start (left), its end (right) or its middle."""
    if side == "left":
        return a, a + n
    if side == "right":
        return b - n, b
    head = (b - a - n + 1) // 2  # middle: as much kept before the cut as after it (one more when odd)
    return a + head, a + head + n


@dataclass(frozen=True)
class PromptCut:
    """How a prompt was shortened to fit the model's context: its length before and after (tokens)
    and what was removed, e.g. "the middle of the last user message"."""

    tokens: int
    kept: int
    where: str

    @property
    def removed(self) -> int:
        return self.tokens - self.kept

    def describe(self) -> str:
        return f"{self.removed} of {self.tokens} prompt tokens cut ({self.where})"

    def as_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "kept": self.kept, "removed": self.removed, "where": self.where}


def encode_prompt(tokenizer: Any, messages: list[dict[str, str]], max_len: int, side: str = "middle",
                  source: str = "") -> list[int]:
    """Token ids of a conversation up to the point where the assistant answers (with the generation
    prompt), special strings in the data kept as text, fitted into ``max_len`` tokens as
    ``fit_prompt`` does (use that to learn what was cut)."""
    return fit_prompt(tokenizer, messages, max_len, side, source)[0]


def fit_prompt(tokenizer: Any, messages: list[dict[str, str]], max_len: int, side: str = "middle",
               source: str = "", cut_to: int | None = None) -> tuple[list[int], PromptCut | None]:
    """The prompt's ids (as ``encode_prompt``) and, when it had to be shortened, a ``PromptCut``
    saying how much and where (None when it fits whole).

    The rule for every path that builds a prompt (evaluation, generate, studies, the prompt
    method): the caller passes the model's context (less one token for the answer) as ``max_len``,
    never a training length minus the answer's room, so a prompt that fits is kept whole. One that
    does not is cut to ``cut_to`` tokens (default ``max_len``; callers leave room there for the
    answer, see ``answer_room``): the oldest earlier turns go first (few-shot examples, earlier chat
    turns; the system prompt and the question stay), then tokens of the last user message (its
    middle by default, or its start or end: ``side``), then, if that is still not enough, the start
    of the conversation.
    """
    ids = _prompt_ids(tokenizer, messages, source)
    if len(ids) <= max_len:
        return ids, None
    max_len = min(max_len, cut_to) if cut_to else max_len
    total, where = len(ids), []
    system = [m for m in messages[:1] if m["role"] == "system"]
    rest, dropped = messages[len(system):], 0
    while len(ids) > max_len and _earlier_turns(rest):
        rest = rest[_earlier_turns(rest):]
        dropped += 1
        ids = _prompt_ids(tokenizer, system + rest, source)
    if dropped:
        where.append(f"the {dropped} oldest earlier turn{'s' if dropped > 1 else ''} (examples or chat history) left out")
    if len(ids) > max_len:
        ids, how = _cut_question(tokenizer, system + rest, ids, max_len, side, source)
        where.append(how)
    return ids, PromptCut(total, len(ids), "; ".join(where))


def answer_room(context: int, max_tokens: int) -> int:
    """Tokens a prompt that must be cut leaves for the answer: what was asked for, at most a quarter
    of the context (a prompt that fits whole leaves whatever remains, down to one token)."""
    return max(1, min(max_tokens, context // 4))


def _earlier_turns(messages: list[dict[str, str]]) -> int:
    """How many messages the oldest exchange before the last user turn spans (0: nothing earlier)."""
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    if last_user <= 0:
        return 0
    nxt = next((i for i in range(1, last_user + 1) if messages[i]["role"] == "user"), last_user)
    return nxt


def _prompt_ids(tokenizer: Any, messages: list[dict[str, str]], source: str) -> list[int]:
    text = render(tokenizer, messages, add_generation_prompt=True, source=source)
    fmt = chat_format(tokenizer)
    msgs = messages if fmt.system_role else fold_system(messages)
    return _tokenize(tokenizer, text, _protected_spans(tokenizer, msgs, text))[0]


def _cut_question(tokenizer: Any, messages: list[dict[str, str]], ids: list[int], max_len: int, side: str,
                  source: str) -> tuple[list[int], str]:
    """``ids`` (the prompt of ``messages``) cut to ``max_len``: inside the last user message by
    ``side`` when it can absorb the excess, else the start of the conversation. Returns the ids
    and where the cut was."""
    text = render(tokenizer, messages, add_generation_prompt=True, source=source)
    fmt = chat_format(tokenizer)
    msgs = messages if fmt.system_role else fold_system(messages)
    _, offsets = _tokenize(tokenizer, text, _protected_spans(tokenizer, msgs, text))
    users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
    span = _content_spans(tokenizer, msgs, text)[users[-1]] if users else None
    inside = [k for k, (a, b) in enumerate(offsets) if span and b > a and span[0] <= a and b <= span[1]]
    excess = len(ids) - max_len
    if len(inside) > excess:
        a, b = _cut_range(inside[0], inside[-1] + 1, excess, side)
        part = {"left": "start", "right": "end"}.get(side, "middle")
        return ids[:a] + ids[b:], f"the {part} of the last user message"
    return ids[-max_len:], "the start of the conversation, the system prompt included"


def encode_all(tokenizer: Any, examples: list[Example], max_seq_len: int, last_turn_only: bool = False,
               side: str = "middle") -> tuple[list[Encoded], dict[str, int]]:
    """Encode examples; drop those left with no target token after truncation.

    A raw text longer than ``max_seq_len`` becomes several windows (``encode_text``), each an encoding.
    Returns the encodings and counts: ``examples``, ``kept``, ``truncated`` (all cut examples),
    ``truncated_prompt`` (the answer kept whole), ``truncated_answer`` (the answer cut too),
    ``dropped_no_target``, ``special_text`` (examples whose text held special-token strings,
    tokenized as text), ``tokens``, ``target_tokens``.
    """
    out, dropped, special, windowed = [], 0, 0, 0
    cut = {"prompt": 0, "answer": 0, "window": 0}
    for ex in examples:
        if ex.text is not None:  # raw text: every window is an example of its own
            windows = [w for w in encode_text(tokenizer, ex, max_seq_len) if w.n_targets]
            windowed += len(windows) > 1
            dropped += not windows
            out += windows
            continue
        e = encode(tokenizer, ex, max_seq_len, last_turn_only, side)
        special += e.special_text
        if e.n_targets == 0:
            dropped += 1
            continue
        if e.truncated:
            cut[e.truncated] += 1
        out.append(e)
    stats = {
        "examples": len(examples),
        "kept": len(out),
        "truncated": cut["prompt"] + cut["answer"],
        "truncated_prompt": cut["prompt"],
        "truncated_answer": cut["answer"],
        "texts_in_windows": windowed,  # raw texts longer than max_seq_len, trained on whole in several windows
        "dropped_no_target": dropped,
        "special_text": special,
        "tokens": sum(len(e.input_ids) for e in out),
        "target_tokens": sum(e.n_targets for e in out),
    }
    return out, stats


def encode_for_head(tokenizer: Any, example: Example, label_index: dict[str, int], max_seq_len: int,
                    side: str = "middle") -> Encoded:
    """The example's text for a classification head: the last user turn (or raw text), no chat
    template, with the model's own special tokens ([CLS] ... [SEP] for BERT), and the label's index.
    A text too long is cut by ``side`` (its middle by default), the special tokens kept."""
    users = [m["content"] for m in example.messages if m["role"] == "user"]
    text = example.text if example.text is not None else (users[-1] if users else "")
    if example.label not in label_index:
        raise DataError(f"{example.source or 'an example'}: label {example.label!r} is not one of {sorted(label_index)}")
    special = has_special_text(tokenizer, text)
    ids = encode_plain(tokenizer, text, add_special_tokens=True)
    if len(ids) <= max_seq_len:
        return Encoded(ids, [], None, example.source, class_label=label_index[example.label], special_text=special)
    inner = encode_plain(tokenizer, text)
    extra = len(ids) - len(inner)
    a, b = _cut_range(0, len(inner), len(ids) - max_seq_len, side)
    kept = inner[:a] + inner[b:]
    full = tokenizer.build_inputs_with_special_tokens(kept) if extra else kept
    part = {"left": "start", "right": "end"}.get(side, "middle")
    return Encoded(full, [], "prompt", example.source, class_label=label_index[example.label], special_text=special,
                   cut=PromptCut(len(ids), len(full), f"the {part} of the text"))


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


def encode_examples(cfg: Config, tokenizer: Any, examples: list[Example], head: bool) -> tuple[list[Any], dict[str, int]]:
    """Token ids and targets: chat-rendered for a generative model, plain text + label for a head."""
    side = cfg.data.truncation_side
    if not head:
        return encode_all(tokenizer, examples, cfg.train.max_seq_len, side=side)
    index = {k: i for i, k in enumerate(cfg.data.labels)}
    out = [encode_for_head(tokenizer, ex, index, cfg.train.max_seq_len, side) for ex in examples]
    cut = sum(bool(e.truncated) for e in out)
    return out, {"examples": len(examples), "kept": len(out), "truncated": cut, "truncated_prompt": cut,
                 "truncated_answer": 0, "dropped_no_target": 0, "special_text": sum(e.special_text for e in out),
                 "tokens": sum(len(e.input_ids) for e in out), "target_tokens": len(out)}
