"""Layouts: which columns of a row play which role, detected from the column names.

| layout | roles | becomes |
|---|---|---|
| text_label | text, label | user: text; assistant: the label's words |
| instruction | instruction, input (optional), output | user: instruction + input; assistant: output |
| prompt_completion | prompt, completion | user: prompt; assistant: completion |
| chat | messages | the conversation as given |
| text | text | raw text; every token is a target |

Detection is by column name (case-insensitive, with common synonyms); ``data.layout`` and
``data.columns`` override it. Bad rows raise DataError naming file, line and field, or with
``skip_bad`` are skipped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunesmith.data.formats import DataError, Example, Row, Table, read_table

ROLES = ("system", "user", "assistant")
LAYOUTS = ("text_label", "instruction", "prompt_completion", "chat", "text")
# the layouts each task can train on
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
    "output": ("output", "response", "answer"),
    "prompt": ("prompt",),
    "completion": ("completion",),
    "text": ("text", "sentence", "sms", "review", "content", "document", "message", "body"),
    "label": ("label", "labels", "class", "sentiment", "target", "category", "intent"),
}
REQUIRED = {"text_label": ("text", "label"), "instruction": ("instruction", "output"),
            "prompt_completion": ("prompt", "completion"), "chat": ("messages",), "text": ("text",)}
OPTIONAL = {"instruction": ("input",)}


@dataclass
class Layout:
    name: str
    columns: dict[str, str]  # role -> column
    detected: bool

    def describe(self) -> str:
        how = "detected" if self.detected else "configured"
        cols = ", ".join(f"{role}<-{col!r}" for role, col in self.columns.items())
        return f"layout {self.name} ({how}; {cols})"


def detect_layout(table: Table, layout: str | None = None, columns: dict[str, str] | None = None,
                  task: str | None = None) -> Layout:
    """The layout of ``table`` and its role -> column map; DataError when none fits."""
    names = table.columns
    lower = {c.lower(): c for c in names}
    overrides = dict(columns or {})
    unknown = sorted(set(overrides) - set(SYNONYMS))
    if unknown:
        raise DataError(f"data.columns: unknown role {unknown[0]!r}; roles are {', '.join(sorted(SYNONYMS))}")

    def find(role: str) -> str | None:
        if role in overrides:
            return overrides[role]
        return next((lower[s] for s in SYNONYMS[role] if s in lower), None)

    candidates = [layout] if layout else list(TASK_LAYOUTS.get(task or "", LAYOUTS)) + [x for x in LAYOUTS]
    for name in dict.fromkeys(candidates):
        found = {role: find(role) for role in REQUIRED[name] + OPTIONAL.get(name, ())}
        headerless = len(names) == 2 and all(n.startswith("column_") for n in names)
        if name == "text_label" and (found["text"] is None or found["label"] is None) and headerless:
            found = _two_columns(table, names)  # headerless "label<TAB>text" files
        if all(found[r] is not None for r in REQUIRED[name]):
            return Layout(name, {r: c for r, c in found.items() if c is not None}, detected=layout is None)
    wanted = f"layout {layout!r}" if layout else f"any layout for task {task!r}" if task else "any layout"
    raise DataError(f"{table.path}: columns {names} fit {wanted}; set data.layout and map columns with data.columns "
                    f"(roles: {', '.join(sorted(SYNONYMS))})")


def _two_columns(table: Table, names: list[str]) -> dict[str, str | None]:
    """Of two unnamed columns, the one with few distinct short values is the label."""
    a, b = names
    distinct = {c: len({str(r.values.get(c)) for r in table.rows}) for c in names}
    label = a if distinct[a] <= distinct[b] else b
    return {"label": label, "text": b if label == a else a}


def rows_to_examples(table: Table, layout: Layout, labels: dict[str, str] | None = None,
                     system_prompt: str | None = None, skip_bad: bool = False) -> list[Example]:
    """Map rows onto conversations (or raw text) by ``layout``; bad rows raise or are skipped."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    out = []
    for row in table.rows:
        where = row.values.get("_source") or f"{table.path}:{row.line}"  # prepared rows keep their origin
        try:
            out.append(_example(row, layout, labels, system, where))
        except DataError as e:
            if not skip_bad:
                raise
            table.skipped.append(str(e))
    return out


def load_examples(path: str, data: Any, task: str) -> list[Example]:
    """Read one file as a run would: format and layout detected (or as ``data`` sets them)."""
    table = read_table(path, data.format, data.skip_bad_rows)
    layout = detect_layout(table, data.layout, data.columns, task)
    labels = data.labels if task == "classification" else None
    return rows_to_examples(table, layout, labels, data.system_prompt, data.skip_bad_rows)


def _example(row: Row, layout: Layout, labels: dict[str, str] | None, system: list[dict[str, str]], where: str) -> Example:
    cols = layout.columns
    if layout.name == "text_label":
        text, raw = _field(row, cols["text"], where), _field(row, cols["label"], where)
        if labels is not None and raw not in labels:
            known = ", ".join(repr(k) for k in labels)
            raise DataError(f"{where}: field {cols['label']!r}: unknown label {raw!r}; expected one of {known}")
        words = labels[raw] if labels else raw
        return Example(system + [{"role": "user", "content": text}, {"role": "assistant", "content": words}],
                       label=raw, source=where)
    if layout.name in ("instruction", "prompt_completion"):
        user_col, reply_col = ("instruction", "output") if layout.name == "instruction" else ("prompt", "completion")
        user = _field(row, cols[user_col], where)
        extra = row.values.get(cols.get("input", "")) or ""
        if not isinstance(extra, str):
            raise DataError(f"{where}: field {cols['input']!r}: expected text, got {type(extra).__name__}")
        if extra.strip():
            user = f"{user}\n\n{extra.strip()}"
        reply = _field(row, cols[reply_col], where)
        return Example(system + [{"role": "user", "content": user}, {"role": "assistant", "content": reply}], source=where)
    if layout.name == "chat":
        return Example(_messages(row, cols["messages"], where, system), source=where)
    return Example([], source=where, text=_field(row, cols["text"], where))


def _field(row: Row, name: str, where: str) -> str:
    if name not in row.values:
        have = ", ".join(repr(k) for k in row.values)
        raise DataError(f"{where}: missing field {name!r} (the row has {have}); map it with data.columns")
    value = row.values[name]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r}: expected text, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field {name!r} is empty")
    return value.strip()


def _messages(row: Row, name: str, where: str, system: list[dict[str, str]]) -> list[dict[str, str]]:
    value = row.values.get(name)
    if value is None:
        raise DataError(f"{where}: missing field {name!r}; map it with data.columns")
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {name!r}: expected a non-empty list of messages")
    messages = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: field {name}[{j}]: expected {{role, content}} with text content")
        if m.get("role") not in ROLES:
            raise DataError(f"{where}: field {name}[{j}].role: {m.get('role')!r} is not one of {', '.join(ROLES)}")
        messages.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: field {name!r}: no assistant message to train on")
    if system and messages[0]["role"] != "system":
        messages = system + messages
    return messages
