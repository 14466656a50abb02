"""Preference data as people have it, read into one canonical record per row.

Layouts (detected from the column names; ``data.columns`` maps other names onto these roles):

* ``preference`` (TRL's explicit-prompt layout): ``prompt`` (a string, or a list of messages), ``chosen`` and
  ``rejected`` (strings, or lists holding one assistant message). ``tunesmith study export`` writes this.
* ``preference`` without a prompt column (TRL's implicit-prompt layout): ``chosen`` and ``rejected`` are whole
  conversations (lists of messages, or raw transcripts with ``\\n\\nHuman:`` / ``\\n\\nAssistant:`` markers, as
  Anthropic's HH-RLHF): the shared prompt is the turns both sides have in common; the answers are what follows.
* ``unpaired`` (KTO's layout): ``prompt``, ``completion`` and a boolean ``label`` (true: a good answer).

Canonical record: ``{"prompt": [messages], "chosen": str | None, "rejected": str | None, "_source": "file:line"}``;
an unpaired row has only one of ``chosen`` (label true) or ``rejected`` (label false).

Handled and counted, never silently: rows whose two answers are the same (``identical_answers``: no preference to
learn), rows whose sides differ before their last answer (``sides_differ_before_answer``: the prompt is not shared),
exact duplicate rows. A row with an empty side, a missing field, or a label that is not a boolean is a bad row:
DataError naming file, line and field, or skipped and counted under ``data.skip_bad_rows``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.data.formats import DataError, Row, Table, read_table

LAYOUTS = ("preference", "unpaired")
ROLES = ("prompt", "chosen", "rejected", "completion", "label")
SYNONYMS = {"prompt": ("prompt", "question", "instruction", "query"), "chosen": ("chosen", "response_j", "preferred"),
            "rejected": ("rejected", "response_k", "dispreferred"), "completion": ("completion", "response", "answer"),
            "label": ("label", "desirable")}  # column names read as each role (StackExchange pairs: response_j/_k)
TRANSCRIPT = re.compile(r"\n\n(Human|Assistant): ?")  # HH-RLHF's turn markers
SPEAKERS = {"Human": "user", "Assistant": "assistant"}


@dataclass
class PreferenceExample:
    """One preference row: the prompt (messages ending with a user turn), and its chosen and/or rejected answer."""

    prompt: list[dict[str, str]]
    chosen: str | None
    rejected: str | None
    source: str = ""

    @property
    def paired(self) -> bool:
        return self.chosen is not None and self.rejected is not None

    def record(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected, "_source": self.source}

    @classmethod
    def of(cls, rec: dict[str, Any]) -> PreferenceExample:
        return cls(rec["prompt"], rec.get("chosen"), rec.get("rejected"), rec.get("_source", ""))


@dataclass
class ReadResult:
    """What ``read_preferences`` found: the rows, the layout, and what it set aside (counted)."""

    rows: list[PreferenceExample]
    layout: str
    counts: dict[str, int] = field(default_factory=dict)
    bad: list[str] = field(default_factory=list)
    table: Table | None = None


def detect(columns: list[str], mapping: dict[str, str] | None = None) -> tuple[str, dict[str, str]]:
    """The layout of a table with ``columns`` and the column of each role (``mapping``: role -> column, from
    ``data.columns``). Raises DataError naming the columns found and the layouts that would fit."""
    mapping = dict(mapping or {})
    lower = {c.lower(): c for c in columns}
    cols = {role: mapping.get(role) or next((lower[s] for s in SYNONYMS[role] if s in lower), role) for role in ROLES}
    has = {role for role, c in cols.items() if c in columns}
    if {"chosen", "rejected"} <= has:
        return "preference", {r: cols[r] for r in ("prompt", "chosen", "rejected") if r in has}
    if {"prompt", "completion", "label"} <= has:
        return "unpaired", {r: cols[r] for r in ("prompt", "completion", "label")}
    raise DataError(f"no preference layout fits the columns {', '.join(map(repr, columns)) or '(none)'}: expected "
                    "prompt/chosen/rejected (or chosen/rejected holding whole conversations), or prompt/completion/label "
                    "for unpaired thumbs up/down; map other names with data.columns, e.g. {chosen: good, rejected: bad}")


def read_preferences(path: str | Path, mapping: dict[str, str] | None = None, system_prompt: str | None = None,
                     fmt: str = "auto", skip_bad: bool = False, unpaired: bool = False) -> ReadResult:
    """Every row of a preference file (JSONL/JSON/CSV/TSV/Parquet) as ``PreferenceExample``s.

    Raises DataError for the first bad row (file:line, field and what is wrong) unless ``skip_bad``, which skips and
    counts bad rows instead (``bad`` keeps their messages). ``path`` may be a rating study's folder: its export
    (``preferences.jsonl``, or with ``unpaired`` the scored answers' ``unpaired.jsonl``, written by ``tunesmith study
    export`` and by ``tunesmith train`` before it trains) is read."""
    path = study_export(path, unpaired)
    table = read_table(path, fmt, skip_bad=True)
    try:
        layout, cols = detect(table.columns, mapping)
    except DataError as e:
        raise DataError(f"{path}: {e}") from None
    out = ReadResult([], layout, {"rows": len(table.rows) + len(table.skipped), "identical_answers": 0,
                                  "sides_differ_before_answer": 0}, list(table.skipped), table)
    for row in table.rows:
        where = table.where(row.line)
        try:
            ex = _row(row, layout, cols, where, system_prompt)
        except DataError as e:
            out.bad.append(str(e))
            continue
        if ex is None:
            out.counts["sides_differ_before_answer"] += 1
        elif ex.paired and ex.chosen == ex.rejected:
            out.counts["identical_answers"] += 1
        else:
            out.rows.append(ex)
    if out.bad and not skip_bad:
        n = len(out.bad) - 1
        raise DataError(out.bad[0] + (f" (and {n} more bad row{'s' if n > 1 else ''}; " if n else " (")
                        + "--skip-bad-rows, or data.skip_bad_rows: true, skips and counts such rows)")
    out.counts["bad_rows_skipped"] = len(out.bad)
    return out


def study_export(path: str | Path, unpaired: bool = False) -> str | Path:
    """The file to read for ``path``: a rating study's folder (it holds study.json) stands for the people's decided
    pairs it exported, ``STUDY/preferences.jsonl`` (``unpaired``: their scored answers, ``STUDY/unpaired.jsonl``); any
    other path is itself. Raises DataError for a study that has not been exported."""
    if not Path(path, "study.json").is_file():
        return path
    export = Path(path, "unpaired.jsonl" if unpaired else "preferences.jsonl")
    if not export.is_file():
        how = " --format unpaired" if unpaired else ""
        raise DataError(f"{path}: a rating study with no exported {'scores' if unpaired else 'preferences'} yet: run "
                        f"`tunesmith study export {path}{how}` (or train with `tunesmith train`, which exports a study "
                        "named in data: first)")
    return export


def _row(row: Row, layout: str, cols: dict[str, str], where: str, system_prompt: str | None) -> PreferenceExample | None:
    v = row.values
    for role, col in cols.items():
        if col not in v or v[col] is None:
            raise DataError(f"{where}: field {col!r} ({role}) is missing")
    if layout == "unpaired":
        prompt = _prompt(v[cols["prompt"]], cols["prompt"], where)
        answer = _answer(v[cols["completion"]], cols["completion"], where)
        good = _boolean(v[cols["label"]], cols["label"], where)
        return PreferenceExample(_with_system(prompt, system_prompt), answer if good else None,
                                 None if good else answer, where)
    if "prompt" in cols:
        prompt = _prompt(v[cols["prompt"]], cols["prompt"], where)
        chosen = _answer(v[cols["chosen"]], cols["chosen"], where)
        rejected = _answer(v[cols["rejected"]], cols["rejected"], where)
        return PreferenceExample(_with_system(prompt, system_prompt), chosen, rejected, where)
    c = _conversation(v[cols["chosen"]], cols["chosen"], where)
    r = _conversation(v[cols["rejected"]], cols["rejected"], where)
    k = 0
    while k < min(len(c), len(r)) and c[k] == r[k]:
        k += 1
    if c == r:  # the same conversation on both sides: counted as identical answers
        last = _last_answer(c, cols["chosen"], where)
        return PreferenceExample(_with_system(c[:-1], system_prompt), last, last, where)
    if not (len(c) == len(r) == k + 1 and c[k]["role"] == r[k]["role"] == "assistant"):
        return None
    if not any(m["role"] == "user" for m in c[:k]):
        raise DataError(f"{where}: fields {cols['chosen']!r}/{cols['rejected']!r}: the shared start has no user turn "
                        "to answer (give a prompt column, or whole conversations)")
    for role in ("chosen", "rejected"):
        if not (c if role == "chosen" else r)[k]["content"].strip():
            raise DataError(f"{where}: field {cols[role]!r} ({role}): the answer is empty")
    return PreferenceExample(_with_system(c[:k], system_prompt), c[k]["content"], r[k]["content"], where)


def _prompt(value: Any, name: str, where: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field {name!r} (prompt) is empty")
        return [{"role": "user", "content": value}]
    messages = _messages(value, name, where)
    if not messages or messages[-1]["role"] != "user":
        raise DataError(f"{where}: field {name!r} (prompt): the messages must end with a user turn "
                        f"(they end with {messages[-1]['role'] if messages else 'nothing'})")
    return messages


def _answer(value: Any, name: str, where: str) -> str:
    if isinstance(value, list):  # TRL's conversational layout: one assistant message
        messages = _messages(value, name, where)
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            raise DataError(f"{where}: field {name!r}: expected one assistant message, got "
                            f"{', '.join(m['role'] for m in messages) or 'no messages'}")
        value = messages[0]["content"]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r}: expected text or one assistant message, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field {name!r} is empty: a preference needs both answers")
    return value


def _conversation(value: Any, name: str, where: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        parts = TRANSCRIPT.split(value)
        if len(parts) < 3 or parts[0].strip():
            raise DataError(f"{where}: field {name!r}: a whole conversation was expected (a list of messages, or a "
                            "transcript of '\\n\\nHuman: ' / '\\n\\nAssistant: ' turns), since there is no prompt column; "
                            "give the prompt in its own column (data.columns.prompt)")
        return [{"role": SPEAKERS[parts[i]], "content": parts[i + 1]} for i in range(1, len(parts), 2)]
    return _messages(value, name, where)


def _last_answer(messages: list[dict[str, str]], name: str, where: str) -> str:
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: field {name!r}: the conversation does not end with an assistant answer")
    return messages[-1]["content"]


def _messages(value: Any, name: str, where: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        try:
            value = json.loads(value)  # a CSV cell holding JSON messages
        except json.JSONDecodeError:
            raise DataError(f"{where}: field {name!r}: expected a list of messages or text") from None
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise DataError(f"{where}: field {name!r}: expected a list of {{role, content}} messages")
    out = []
    for i, m in enumerate(value):
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise DataError(f"{where}: field {name!r}, message {i + 1}: expected role system/user/assistant and text "
                            f"content, got role {role!r}")
        out.append({"role": role, "content": content})
    return out


GOOD, BAD = ("true", "1", "yes", "good", "up"), ("false", "0", "no", "bad", "down")  # KTO labels, as people write them


def _boolean(value: Any, name: str, where: str) -> bool:
    """KTO's label: true (a good answer) or false. JSON booleans, 1/0, and the words in ``GOOD``/``BAD`` (any case)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in GOOD + BAD:
        return value.strip().lower() in GOOD
    raise DataError(f"{where}: field {name!r} (label): expected a boolean (true: a good answer, false: a bad one; also "
                    f"read: {'/'.join(GOOD[1:])} and {'/'.join(BAD[1:])}), got {value!r}")


def _with_system(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    if system_prompt and not (messages and messages[0]["role"] == "system"):
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def dedup(rows: list[PreferenceExample]) -> tuple[list[PreferenceExample], int]:
    """Rows with exact duplicates left out (the first kept); how many were dropped."""
    seen: set[str] = set()
    out = []
    for ex in rows:
        key = json.dumps([ex.prompt, ex.chosen, ex.rejected], sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(ex)
    return out, len(rows) - len(out)


def prompt_key(ex: PreferenceExample) -> str:
    """The prompt as text: rows of one prompt stay in one split (no answer to a test prompt is trained on)."""
    return json.dumps(ex.prompt, sort_keys=True)


SET_ASIDE = {"identical_answers": "rows whose two answers are the same",
             "sides_differ_before_answer": "rows whose sides differ before their last answer",
             "bad_rows_skipped": "bad rows (data.skip_bad_rows)", "exact_duplicates": "exact duplicates"}


@dataclass
class PreferenceSplits:
    """The prepared preference rows of each split, and the preparation report."""

    train: list[PreferenceExample]
    validation: list[PreferenceExample]
    test: list[PreferenceExample]
    notes: list[str]
    report: dict[str, Any]
    reused: bool = False


def load_preference_splits(cfg: Any, out_dir: Path, say: Any = None) -> PreferenceSplits:
    """Read, check, de-duplicate and split the preference data of ``cfg`` (``task: preference``) into ``out_dir``
    (train/validation/test.jsonl and data_report.json), reused while the files and settings are unchanged.

    Splits not given as files are drawn from train (``data.validation_size``, ``data.prepare.test_size``; rows of one
    prompt stay together; ``data.prepare.split: ordered`` takes the last rows). Raises DataError for bad rows (see
    ``read_preferences``) and for too few rows to split."""
    from tunesmith.data.prepare import content_hash
    from tunesmith.data.split import split_indices
    from tunesmith.io import atomic_write_json, atomic_write_jsonl

    d, p = cfg.data, cfg.data.prepare
    out_dir = Path(out_dir)
    report_path = out_dir / "data_report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    reused = report.get("content_hash") == content_hash(cfg) and (out_dir / "train.jsonl").is_file()
    if not reused:
        splits: dict[str, list[PreferenceExample]] = {}
        steps, notes, layouts = [], [], set()
        for split, path in (("train", d.train), ("validation", d.validation), ("test", d.test)):
            if not path:
                continue
            columns = d.columns | (getattr(d, f"{split}_columns", None) or {})
            read = read_preferences(path, columns, d.system_prompt, d.format, d.skip_bad_rows,
                                    unpaired=cfg.preference.objective == "kto")
            layouts.add(read.layout)
            kept, dups = dedup(read.rows)
            splits[split] = kept
            steps.append({"step": f"read {split}", "rows_in": read.counts["rows"], "rows_out": len(kept),
                          "removed": read.counts["rows"] - len(kept), "exact_duplicates": dups, "skipped": read.bad[:5],
                          **{k: v for k, v in read.counts.items() if k != "rows"}})
            notes.append(f"{split}: {path} ({read.layout}: {len(kept):,} rows"
                         + "".join(f"; {n:,} {SET_ASIDE[k]} left out" for k, n in
                                   (read.counts | {"exact_duplicates": dups}).items() if k in SET_ASIDE and n) + ")")
            if say:
                say(f"  read {split}: {len(kept):,} of {read.counts['rows']:,} rows kept")
        rows = splits["train"]
        make_val, make_test = "validation" not in splits, "test" not in splits and p.test_size > 0
        if make_val or make_test:
            try:
                parts = split_indices(len(rows), validation=d.validation_size if make_val else 0,
                                      test=p.test_size if make_test else 0, seed=cfg.train.seed,
                                      groups=None if p.split == "ordered" else [prompt_key(r) for r in rows],
                                      ordered=p.split == "ordered")
            except ValueError as e:
                raise DataError(f"{d.train}: {len(rows)} preference rows: {e}") from None
            for name, idx in parts.items():
                if idx or name == "train":
                    splits[name] = [rows[i] for i in idx]
            steps.append({"step": "split", "rows_in": len(rows), "rows_out": len(rows), "removed": 0,
                          "grouped_by": "prompt" if p.split != "ordered" else None,
                          **{k: len(v) for k, v in parts.items()}})
        report = {"task": "preference", "layout": "/".join(sorted(layouts)), "notes": notes, "warnings": [],
                  "steps": steps, "splits": {s: _stats(v) for s, v in splits.items()}, "content_hash": content_hash(cfg)}
        out_dir.mkdir(parents=True, exist_ok=True)
        for split, exs in splits.items():
            atomic_write_jsonl(out_dir / f"{split}.jsonl", [e.record() for e in exs])
        atomic_write_json(report_path, report)
    loaded: dict[str, list[PreferenceExample]] = {}
    for split in ("train", "validation", "test"):
        path = out_dir / f"{split}.jsonl"
        if path.is_file() and path.stat().st_size:
            loaded[split] = [PreferenceExample.of(r.values) for r in read_table(path, "jsonl").rows]
    if not loaded.get("validation"):
        raise DataError(f"{d.train}: no validation rows after preparation; set data.validation or data.validation_size")
    from tunesmith.data.prepare import cap_examples, cap_test

    ordered = p.split == "ordered"
    notes = list(report.get("notes", [])) + ([] if "test" in loaded else ["test: the validation split (no test split)"])
    return PreferenceSplits(cap_examples(loaded["train"], d.max_train_examples, cfg.train.seed, ordered),
                            cap_examples(loaded["validation"], d.max_validation_examples, cfg.train.seed, ordered),
                            cap_test(loaded.get("test") or loaded["validation"], d.max_test_examples, ordered),
                            notes, report, reused)


def _stats(rows: list[PreferenceExample]) -> dict[str, Any]:
    paired = sum(r.paired for r in rows)
    return {"rows": len(rows), "pairs": paired, "desirable": sum(r.chosen is not None and not r.paired for r in rows),
            "undesirable": sum(r.rejected is not None and not r.paired for r in rows)}
