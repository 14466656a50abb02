"""Layouts: which columns of a row play which role, detected from the column names.

| layout | roles (optional in brackets) | becomes |
|---|---|---|
| text_label | text, label | user: text; assistant: the label's words |
| instruction | instruction, [input], output | user: instruction + input; assistant: output |
| prompt_completion | prompt, completion | user: prompt; assistant: completion |
| chat | messages | the conversation as given ({role, content} or ShareGPT {from, value}) |
| text | text | raw text; every token is a target |

Detection is by column name (case-insensitive, with common synonyms), among the layouts that
can serve the task; ``data.layout`` and ``data.columns`` override it. A role's source in
``data.columns`` is one of (see ``Source``):

- a column name: ``output: summary``;
- a template of columns: ``text: "{title}\\n{description}"`` (``{{``/``}}`` for literal braces);
- constant text, the same for every row: ``instruction: "Summarize the dialogue."`` (a value that
  is neither a column nor a template, and holds a space).

Rows become canonical records (role -> value, the prepared files' format), then examples. A
record is *empty* when its prompt or its target is empty (optional roles never decide), and
*bad* when it cannot be used at all (a missing field, an unknown label, a chat turn that is not
text); ``check_record`` tells which, with a message naming the file, line and field.
"""

from __future__ import annotations

import difflib
import math
import string
from dataclasses import dataclass, field
from typing import Any

from tunesmith.data.extract import read_data
from tunesmith.data.formats import DataError, Example, Row, Table

ROLES = ("system", "user", "assistant")
LAYOUTS = ("text_label", "instruction", "prompt_completion", "chat", "text")
# the layouts each task can train on, in the order detection tries them
TASK_LAYOUTS = {
    "classification": ("text_label",),
    "instruction": ("instruction", "prompt_completion", "chat"),
    "chat": ("chat", "instruction", "prompt_completion"),
    "text": ("text",),
}
# role -> column names that play it, most specific first
SYNONYMS: dict[str, tuple[str, ...]] = {
    "messages": ("messages", "conversations", "conversation", "dialog"),
    "instruction": ("instruction", "question", "query"),
    "input": ("input",),
    "output": ("output", "response", "answer", "summary"),
    "prompt": ("prompt",),
    "completion": ("completion",),
    "text": ("text", "sentence", "sms", "review", "content", "document", "message", "body"),
    "label": ("label", "labels", "class", "sentiment", "target", "category", "intent"),
    "chosen": ("chosen",),  # task: preference (data/preference.py reads those layouts)
    "rejected": ("rejected",),
}
REQUIRED = {"text_label": ("text", "label"), "instruction": ("instruction", "output"),
            "prompt_completion": ("prompt", "completion"), "chat": ("messages",), "text": ("text",)}
OPTIONAL = {"instruction": ("input",)}
# what the model reads (prompt) and what it learns to write (target), per layout: a record with
# either side empty is an empty row; optional roles (an empty "input") never make it empty
PROMPT_ROLES = {"text_label": ("text",), "instruction": ("instruction", "input"), "prompt_completion": ("prompt",),
                "chat": (), "text": ("text",)}
TARGET_ROLES = {"text_label": ("label",), "instruction": ("output",), "prompt_completion": ("completion",),
                "chat": ("messages",), "text": ()}
# ShareGPT and other common speaker names -> chat roles
SPEAKERS = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
             "bot": "assistant", "model": "assistant", "chatgpt": "assistant"}


@dataclass(frozen=True)
class Source:
    """Where a role's value comes from: a ``column``, a ``template`` of columns, or ``constant`` text."""

    kind: str
    spec: str
    fields: tuple[str, ...] = ()

    def value(self, values: dict[str, Any]) -> Any:
        """This source's value in a row (``values``: column -> value as read)."""
        if self.kind == "column":
            return values.get(self.spec)
        if self.kind == "constant":
            return self.spec
        return self.spec.format_map({f: _as_text(values.get(f)) for f in self.fields})

    def describe(self) -> str:
        return repr(self.spec) if self.kind == "column" else f"{self.spec!r} ({self.kind})"


def parse_source(spec: str, columns: list[str], where: str) -> Source:
    """Read a ``data.columns`` value against the columns present; DataError naming a missing column.

    ``where`` names the setting and file in messages, e.g. "data.columns.output (train.csv)".
    """
    if spec in columns:
        return Source("column", spec)
    lower = {c.lower(): c for c in columns}
    if "{" in spec or "}" in spec:
        try:
            fields = tuple(dict.fromkeys(f for _, f, _, _ in string.Formatter().parse(spec) if f is not None))
        except ValueError as e:
            raise DataError(f"{where}: {spec!r} is not a valid template ({e}); write {{column}} for a column "
                            "and {{{{ or }}}} for a literal brace") from None
        if "" in fields:
            raise DataError(f"{where}: {spec!r}: a template placeholder needs a column name, e.g. {{title}}")
        missing = [f for f in fields if f not in columns]
        if missing:
            raise DataError(f"{where}: the template {spec!r} uses column {missing[0]!r}, which the file does not have"
                            f"{_closest(missing[0], columns)}; columns: {', '.join(map(repr, columns))}")
        return Source("template", spec, fields)
    if spec.lower() in lower:
        return Source("column", lower[spec.lower()])
    if any(ch.isspace() for ch in spec.strip()):
        return Source("constant", spec)
    raise DataError(f"{where}: no column {spec!r}{_closest(spec, columns)}; columns: {', '.join(map(repr, columns))}. "
                    "(Constant text for every row is written as a phrase with a space, e.g. \"Summarize the dialogue.\")")


def _closest(name: str, columns: list[str]) -> str:
    close = difflib.get_close_matches(name, columns, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass
class Layout:
    name: str
    sources: dict[str, Source]  # role -> where its value comes from
    detected: bool
    references: list[Source] = field(default_factory=list)  # extra gold answers (generation metrics)

    @property
    def columns(self) -> dict[str, str]:
        """role -> column name (templates and constants shown as written)."""
        return {role: s.spec for role, s in self.sources.items()}

    def describe(self) -> str:
        how = "detected" if self.detected else "configured"
        cols = ", ".join(f"{role}<-{s.describe()}" for role, s in self.sources.items())
        refs = f"; references<-[{', '.join(s.describe() for s in self.references)}]" if self.references else ""
        return f"layout {self.name} ({how}; {cols}{refs})"

    def missing(self, row: Row) -> str | None:
        """The first required column absent from ``row`` (a structural fault, unlike an empty value)."""
        for role in REQUIRED[self.name]:
            s = self.sources[role]
            if s.kind == "column" and s.spec not in row.values:
                return s.spec
        return None

    def record(self, row: Row) -> dict[str, Any]:
        """The row as a canonical record: role -> value (and ``references`` when configured)."""
        rec = {role: s.value(row.values) for role, s in self.sources.items()}
        if self.references:
            rec["references"] = [_as_text(s.value(row.values)).strip() for s in self.references]
        return rec


def detect_layout(table: Table, layout: str | None = None, columns: dict[str, str] | None = None,
                  task: str | None = None, references: list[str] | None = None, split: str = "train") -> Layout:
    """The layout of ``table`` and where each role's value comes from; DataError when none fits.

    Only layouts that can serve ``task`` are tried (all of them when ``task`` is None). The error
    says which layouts were tried and which role each one lacks, and shows the columns found with
    a sample value; and which fields ``data.extract`` found in no row, where it looked for them.
    """
    try:
        return _detect_layout(table, layout, columns, task, references, split)
    except DataError as e:
        absent = [f for f in table.expected if f not in table.columns]
        if not absent:
            raise
        looked = "; ".join(f"{f!r}: {table.expected[f]}" for f in absent)
        raise DataError(f"{e}. data.extract found these fields in no row, looking for {looked}") from None


def _detect_layout(table: Table, layout: str | None, columns: dict[str, str] | None, task: str | None,
                   references: list[str] | None, split: str) -> Layout:
    names = table.columns
    lower = {c.lower(): c for c in names}
    overrides = dict(columns or {})
    unknown = sorted(set(overrides) - set(SYNONYMS))
    if unknown:
        raise DataError(f"data.columns: unknown role {unknown[0]!r}; roles are {', '.join(sorted(SYNONYMS))}")
    allowed = TASK_LAYOUTS.get(task or "", LAYOUTS)
    if layout and layout not in allowed:
        raise DataError(f"data.layout: {layout!r} cannot serve task {task!r} (it has no "
                        f"{' or '.join(REQUIRED[allowed[0]])}); layouts for {task}: {', '.join(allowed)}")
    setting = "columns" if split == "train" else f"columns (or data.{split}_columns, for this {split} file)"
    sources = {role: parse_source(spec, names, f"data.{setting}.{role} ({table.path})") for role, spec in overrides.items()}

    def find(role: str) -> Source | None:
        if role in sources:
            return sources[role]
        col = next((lower[s] for s in SYNONYMS[role] if s in lower), None)
        return Source("column", col) if col is not None else None

    lacking: dict[str, list[str]] = {}
    for name in [layout] if layout else allowed:
        found = {role: find(role) for role in REQUIRED[name] + OPTIONAL.get(name, ())}
        headerless = len(names) == 2 and all(n.startswith("column_") for n in names)
        if name == "text_label" and (found["text"] is None or found["label"] is None) and headerless:
            found = _two_columns(table, names)  # headerless "label<TAB>text" files
        lacking[name] = [r for r in REQUIRED[name] if found[r] is None]
        if not lacking[name]:
            refs = [parse_source(spec, names, f"data.references ({table.path})") for spec in references or []]
            return Layout(name, {r: s for r, s in found.items() if s is not None}, layout is None, refs)
    raise DataError(_no_layout(table, lacking, task))


_MAPPING_EXAMPLE = {"classification": "{text: review_body, label: stars}",
                    "instruction": "{instruction: question, output: best_answer}",
                    "chat": "{messages: dialog_turns}", "text": "{text: article}"}


def _no_layout(table: Table, lacking: dict[str, list[str]], task: str | None) -> str:
    tried = "; ".join(f"{name} needs {' and '.join(REQUIRED[name])}, no column for "
                      + " or ".join(f"{r} (looked for {', '.join(SYNONYMS[r])})" for r in missing)
                      for name, missing in lacking.items())
    first = table.rows[0].values if table.rows else {}
    found = ", ".join(f"{c!r} (e.g. {_sample(first.get(c))})" for c in table.columns)
    for_task = f" for task {task!r}" if task else ""
    return (f"{table.path}: no layout{for_task} fits the columns. Tried: {tried}. Columns found: {found}. "
            f"Map the columns with data.columns (e.g. data.columns: {_MAPPING_EXAMPLE.get(task or '', _MAPPING_EXAMPLE['classification'])}), "
            "or set data.layout")


def _sample(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _two_columns(table: Table, names: list[str]) -> dict[str, Source | None]:
    """Of two unnamed columns, the one with few distinct short values is the label."""
    a, b = names
    distinct = {c: len({str(r.values.get(c)) for r in table.rows}) for c in names}
    label = a if distinct[a] <= distinct[b] else b
    return {"label": Source("column", label), "text": Source("column", b if label == a else a)}


# ---------------------------------------------------------------- records -> examples


def label_key(value: Any, declared: dict[str, str]) -> str | None:
    """The declared label ``value`` means, or None: exact text first, then by meaning
    (JSON ``true`` is ``"true"``, ``1.0`` is ``"1"``, ``" 1 "`` is ``"1"``)."""
    if isinstance(value, str) and value in declared:
        return value
    canon = _canonical(value)
    return next((k for k in declared if _canonical(k) == canon), None) if canon is not None else None


def _canonical(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    if not isinstance(value, str):
        return None
    text = value.strip()
    if text.lower() in ("true", "false"):
        return text.lower()
    try:
        return _canonical(float(text)) if text else ""
    except ValueError:
        return text


def _kind(value: Any) -> str:
    """How a value reads to a person: its type in words (for 'unknown label 2.5 (a number)')."""
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text"
    return "null" if value is None else f"a {type(value).__name__}"


def check_record(rec: dict[str, Any], layout: str, columns: dict[str, str], labels: dict[str, str] | None,
                 where: str, allow_unlabeled: bool = False) -> str | None:
    """None when the record can be used; "empty" when its prompt or target is empty (dropped and
    counted, not an error); raises DataError for a bad record. Normalises it in place: the label
    becomes the declared key it means, values become text, messages become {role, content}."""
    for role in list(rec):
        if role in ("messages", "references") or role.startswith("_"):
            continue
        if role == "label" and labels is not None:
            continue
        rec[role] = _field_text(rec[role], columns.get(role, role), where)
    if layout == "chat":
        rec["messages"] = _messages(rec.get("messages"), columns.get("messages", "messages"), where)
        return None
    if layout == "text_label" and labels is not None:
        raw = rec.get("label")
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            return None if allow_unlabeled else "empty"
        key = label_key(raw, labels)
        if key is None:
            known = ", ".join(repr(k) for k in labels)
            raise DataError(f"{where}: field {columns.get('label', 'label')!r}: unknown label {raw!r} ({_kind(raw)}); "
                            f"expected one of {known}")
        rec["label"] = key
    prompt = any(rec.get(r, "").strip() for r in PROMPT_ROLES[layout])
    target = all(str(rec.get(r) or "").strip() for r in TARGET_ROLES[layout])
    return None if prompt and (target or (allow_unlabeled and layout == "text_label")) else "empty"


def to_example(rec: dict[str, Any], layout: str, labels: dict[str, str] | None, system_prompt: str | None,
               where: str) -> Example:
    """The conversation (or raw text) a checked canonical record becomes."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    refs = [r for r in rec.get("references") or [] if r]
    if layout == "text":
        return Example([], source=where, text=rec["text"].strip())
    if layout == "chat":
        messages = rec["messages"]
        if system and messages[0]["role"] != "system":
            messages = system + messages
        return Example(messages, source=where, references=refs)
    if layout == "text_label":
        raw = rec["label"]
        words = labels[raw] if labels else raw
        return Example(system + [{"role": "user", "content": rec["text"].strip()},
                                 {"role": "assistant", "content": words}], label=raw, source=where)
    user_roles = PROMPT_ROLES[layout]
    user = "\n\n".join(rec[r].strip() for r in user_roles if rec.get(r, "").strip())
    reply = rec[TARGET_ROLES[layout][0]].strip()
    return Example(system + [{"role": "user", "content": user}, {"role": "assistant", "content": reply}],
                   source=where, references=refs)


def rows_to_examples(table: Table, layout: Layout, labels: dict[str, str] | None = None,
                     system_prompt: str | None = None, skip_bad: bool = False) -> list[Example]:
    """Map rows onto conversations (or raw text) by ``layout``; bad and empty rows raise DataError
    or, with ``skip_bad``, are skipped and listed in ``table.skipped``."""
    out = []
    for row in table.rows:
        where = row.values.get("_source") or table.where(row.line)  # prepared rows keep their origin
        try:
            missing_field(row, layout, where, table.expected)
            rec = layout.record(row)
            if check_record(rec, layout.name, layout.columns, labels, where) == "empty":
                empty = [layout.columns[r] for r in PROMPT_ROLES[layout.name] + TARGET_ROLES[layout.name]
                         if r in layout.sources and not str(rec.get(r) or "").strip()]
                raise DataError(f"{where}: field {(empty or ['?'])[0]!r} is empty")
            out.append(to_example(rec, layout.name, labels, system_prompt, where))
        except DataError as e:
            if not skip_bad:
                raise
            table.skipped.append(str(e))
    return out


def missing_field(row: Row, layout: Layout, where: str, expected: dict[str, str] | None = None) -> None:
    """DataError when a required column is absent from the row (e.g. a JSONL record without it).
    ``expected``: field -> where data.extract looks for it (``Table.expected``), said in the message."""
    name = layout.missing(row)
    if name is None:
        return
    if expected and name in expected:
        raise DataError(f"{where}: missing field {name!r}: expected {expected[name]} (data.extract)")
    have = ", ".join(repr(k) for k in row.values)
    raise DataError(f"{where}: missing field {name!r} (the row has {have}); map it with data.columns")


def load_examples(path: str, data: Any, task: str) -> list[Example]:
    """Read one file as a run would: format, fields (``data.extract``) and layout detected (or as
    ``data`` sets them)."""
    table = read_data(path, data, skip_bad=data.skip_bad_rows)
    refs = [r for r in data.references if r in table.columns]
    layout = detect_layout(table, data.layout, data.columns, task, refs if len(refs) == len(data.references) else [])
    labels = data.labels if task == "classification" else None
    return rows_to_examples(table, layout, labels, data.system_prompt, data.skip_bad_rows)


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return value if isinstance(value, str) else str(value)


def _field_text(value: Any, name: str, where: str) -> str:
    """A role's value as text: numbers and booleans as written, null as empty; anything else is bad."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return _as_text(value)
    raise DataError(f"{where}: field {name!r}: expected text, got {_kind(value)}")


def _messages(value: Any, name: str, where: str) -> list[dict[str, str]]:
    """Validated {role, content} turns; ShareGPT {from, value} and text-part lists are accepted."""
    if value is None:
        raise DataError(f"{where}: missing field {name!r}; map it with data.columns")
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {name!r}: expected a non-empty list of messages")
    out = []
    for j, m in enumerate(value):
        at = f"{where}: field {name}[{j}]"
        if not isinstance(m, dict):
            raise DataError(f"{at}: expected {{role, content}}, got {_kind(m)}")
        who = "role" if "role" in m or "from" not in m else "from"
        speaker = m.get(who)
        role = SPEAKERS.get(str(speaker).lower()) if isinstance(speaker, str) else None
        if role is None:
            raise DataError(f"{at}.{who}: {speaker!r} is not one of {', '.join(ROLES)}"
                            + (" (tool and function turns cannot be trained as text)" if speaker in ("tool", "function", "ipython") else ""))
        key = "content" if "content" in m or "value" not in m else "value"  # ShareGPT writes "value"
        content = m.get(key)
        if isinstance(content, list):  # OpenAI-style content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise DataError(f"{at}.{key}: only text parts can be trained (found {[p.get('type') for p in content if isinstance(p, dict)]})")
            content = "".join(p["text"] for p in content)
        if content is None:
            calls = " (a tool call?)" if m.get("tool_calls") or m.get("function_call") else ""
            raise DataError(f"{at}.{key} is null{calls}: only text turns can be trained")
        if not isinstance(content, str):
            raise DataError(f"{at}.{key}: expected text, got {_kind(content)}")
        if role == "assistant" and not content.strip():
            raise DataError(f"{at}.{key}: the assistant reply is empty")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: field {name!r}: no assistant message to train on")
    return out
