"""``tunesmith prepare``: read -> order (split: ordered) -> clean -> redact -> drop empty -> filter -> de-duplicate -> split -> label -> report.

Each step works on canonical records (role -> value, e.g. {"text", "label"} or
{"instruction", "input", "output"}), counts what it removed or changed and keeps a few
examples of it, so the data report shows at a glance what happened to the data and why.
Counts add up: a file of 10 rows with 1 bad row reads 10 and keeps 9.

The test split is what the user gave: de-duplication and length filters report its duplicates
and outliers but keep them (``data.prepare.filter_test`` drops them too); train rows that leak
into validation or test are removed from train. Rows whose prompt or target is empty (in the
file, or after cleaning) are dropped and counted; an empty optional field (an Alpaca ``input``)
is simply left out of the prompt.

The prepared splits are written as JSONL in the canonical layout; training reads them back as
examples with ``to_example``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import difflib
import hashlib
import json
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.config import Config, DataConfig
from tunesmith.data.extract import read_data
from tunesmith.data.formats import DataError, Example, Table, read_table
from tunesmith.data.layouts import PROMPT_ROLES, TARGET_ROLES, check_record, detect_layout, missing_field, to_example
from tunesmith.data.order import order_key, overlap_warnings, sort_by_time, time_ranges
from tunesmith.data.render import encode_plain
from tunesmith.io import atomic_write_json, atomic_write_jsonl

SPLITS = ("train", "validation", "test")
REPORT = "data_report.json"
NEAR_DUP_WARN_SHARE = 0.10  # near-duplicate removal above this share of a split gets a warning


@dataclass
class Splits:
    """Examples of each split, ready to render, and the preparation report they came from."""

    train: list[Example]
    validation: list[Example]
    test: list[Example]
    notes: list[str]
    report: dict[str, Any] = field(default_factory=dict)
    reused: bool = False


def load_splits(cfg: Config, out_dir: Path, tokenizer: Any | None = None,
                say: Callable[[str], None] | None = None) -> Splits:
    """The prepared splits of ``cfg``: reused from ``out_dir`` when the input files and data
    settings are unchanged (same content hash), prepared anew otherwise.

    Without a test split the validation split is also the test split. The ``max_*_examples``
    caps are applied here, after preparation, so they never change the prepared files; under
    ``data.prepare.split: ordered`` each keeps its split's newest (last) rows. ``say``: told of
    each preparation step as it ends (see ``prepare``).
    """
    out_dir = Path(out_dir)
    report_path = out_dir / REPORT
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    reused = report.get("content_hash") == content_hash(cfg) and (out_dir / "train.jsonl").is_file()
    if not reused:
        report = prepare(cfg, out_dir, tokenizer, say).report
    d = cfg.data
    labels = d.labels if cfg.task == "classification" else None
    loaded: dict[str, list[Example]] = {}
    for split in SPLITS:
        path = out_dir / f"{split}.jsonl"
        if path.is_file() and path.stat().st_size:
            rows = read_table(path, "jsonl").rows
            loaded[split] = [to_example(r.values, report["layout"], labels, d.system_prompt,
                                        r.values.get("_source") or f"{path}:{r.line}") for r in rows]
    if not loaded.get("validation"):
        raise DataError(f"{d.train}: no validation rows after preparation; set data.validation or data.validation_size")
    test = loaded.get("test") or loaded["validation"]
    notes = list(report.get("notes", [])) + (["test: the validation split (no test split)"] if "test" not in loaded else [])
    ordered = d.prepare.split == "ordered"
    return Splits(cap_examples(loaded["train"], d.max_train_examples, cfg.train.seed, ordered),
                  cap_examples(loaded["validation"], d.max_validation_examples, cfg.train.seed, ordered),
                  cap_test(test, d.max_test_examples, ordered), notes, report, reused)


def cap_examples(examples: list[Example], n: int | None, seed: int, ordered: bool = False) -> list[Example]:
    """A seeded random subset of ``n`` examples (all when ``n`` is None or larger), in file order;
    ``ordered`` (time-ordered rows): the newest ``n``, the last ones.

    Subsets are nested: with the same seed, the first 16 are among the first 64 (a learning curve
    then adds data rather than swapping it); the newest 16 are among the newest 64.
    """
    import random

    if not n or n >= len(examples):
        return examples
    if ordered:
        return examples[-n:]
    order = list(range(len(examples)))
    random.Random(seed + 1).shuffle(order)
    return [examples[i] for i in sorted(order[:n])]


def cap_test(examples: list[Any], n: int | None, ordered: bool) -> list[Any]:
    """The test examples ``data.max_test_examples`` keeps: the first ``n``, or for an ordered split
    (``data.prepare.split: ordered``) the newest ``n``, the last ones; all when ``n`` is None."""
    if not n:
        return examples
    return examples[-n:] if ordered else examples[:n]


@dataclass
class Prepared:
    splits: dict[str, list[dict[str, Any]]]
    layout: str
    report: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)


def split_columns(d: DataConfig, split: str) -> dict[str, str]:
    """``data.columns`` with the split's own overrides (``data.test_columns``...) on top."""
    return d.columns | (getattr(d, f"{split}_columns", None) or {})


def eval_source(cfg: Config) -> str:
    """The split whose file the test examples come from: test, else validation, else train."""
    d = cfg.data
    if d.test:
        return "test"
    return "validation" if d.validation and not d.prepare.test_size else "train"


def prepare(cfg: Config, out_dir: Path, tokenizer: Any | None = None,
            say: Callable[[str], None] | None = None) -> Prepared:
    """Run every preparation step the config asks for; write the splits and data_report.json.

    ``say`` (e.g. the console's print) is told of each step as it ends, with its rows and seconds,
    so a long preparation (a large file, near-duplicate search) shows where it is, in a log too.
    Raises DataError for a bad row (naming file, line and field) unless ``data.skip_bad_rows``,
    which skips and counts every bad row instead.
    """
    d, p = cfg.data, cfg.data.prepare
    steps: list[dict[str, Any]] = _Steps(say)
    sources = {name: path for name, path in (("train", d.train), ("validation", d.validation), ("test", d.test)) if path}
    records: dict[str, list[dict[str, Any]]] = {}
    layout_name, notes, warnings = "", [], []
    empty_in_files = 0
    for split, path in sources.items():
        rows, layout_name, note, empty = _read_split(cfg, split, path, tokenizer, steps)
        records[split] = rows
        notes.append(note)
        empty_in_files += empty
    if p.order_by:  # oldest first before de-duplication, so that it keeps the first time a text was seen
        n = sum(len(r) for r in records.values())
        steps.append(_step(f"order by {p.order_by}", n, n, {"ranges": sort_by_time(records, p.order_by)}))
    if p.clean:
        _clean(records, p, steps)
    if p.pii:
        _redact(records, p.pii, p.pii_region, steps)
    _drop_empty(records, cfg, layout_name, empty_in_files, steps)
    protected = {"test"} if "test" in records else {"validation"} if eval_source(cfg) == "validation" else set()
    if p.filter_test:
        protected = set()
    if tokenizer is not None and (p.min_tokens or p.max_tokens):
        _length_filter(records, tokenizer, p.min_tokens, p.max_tokens, steps, protected)
    dedup = _dedup(records, p, steps, layout_name, protected, warnings) if p.dedup != "none" else {}
    _split(records, cfg, steps)
    if p.split == "ordered":
        notes.append(_ordered_note(records, p, set(sources)))
    if p.order_by:
        warnings += overlap_warnings(records, p.order_by)
    if p.labeling_functions:
        _weak_label(records, cfg, steps)
    warnings += _label_warnings(records, cfg)
    report = {
        "task": cfg.task, "layout": layout_name, "notes": notes, "warnings": warnings, "steps": steps, "dedup": dedup,
        "label_words": dict(cfg.data.labels) if cfg.task == "classification" else {},
        "splits": {s: _split_stats(rows, tokenizer) for s, rows in records.items()},
        "content_hash": content_hash(cfg),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, rows in records.items():
        files[split] = out_dir / f"{split}.jsonl"
        atomic_write_jsonl(files[split], rows)
    atomic_write_json(out_dir / "data_report.json", report)
    return Prepared(records, layout_name, report, files)


def _read_split(cfg: Config, split: str, path: str, tokenizer: Any | None,
                steps: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str, str, int]:
    """Read one file into canonical records: bad rows raise (or are skipped and counted), empty
    rows are kept for the "drop empty rows" step. Returns the records, the layout, a note saying
    how the file was read, and how many rows were empty."""
    d, p = cfg.data, cfg.data.prepare
    if not path.startswith("hf:") and not Path(path).exists():
        raise DataError(f"data.{split}: {path}: file not found (a relative path in a config file is looked up "
                        "next to the config file, then in the working folder; on the command line, the other way round)")
    table = read_data(path, d, skip_bad=True, split=split)
    refs = d.references if split == eval_source(cfg) or all(
        r in table.columns for r in d.references) else []  # the evaluation split must have them; others may
    layout = detect_layout(table, d.layout, split_columns(d, split), cfg.task, refs, split)
    labels = d.labels if cfg.task == "classification" else None
    for key in ("group_by", "order_by"):
        _check_column(f"data.prepare.{key}", getattr(p, key), table)
    rows, bad, empty, no_refs = [], list(table.skipped), 0, 0
    for row in table.rows:
        where = table.where(row.line)
        try:
            missing_field(row, layout, where, table.expected)
            rec = layout.record(row)
            no_refs += any(s.kind == "column" and row.values.get(s.spec) in (None, "") for s in layout.references)
            _split_keys(rec, row.values, p, where)
            state = check_record(rec, layout.name, layout.columns, labels, where, p.labeling_functions is not None)
            unlabeled = layout.name == "text_label" and not _filled(rec.get("label"))  # for the labeling functions
            if state is None and not unlabeled and cfg.task != "text" and getattr(tokenizer, "chat_template", None):
                _check_renders(tokenizer, to_example(rec, layout.name, labels, d.system_prompt, where))  # heads need none
        except DataError as e:
            bad.append(str(e))
            continue
        empty += state == "empty"
        rec["_source"] = where
        rows.append(rec)
    bad.sort(key=_line_of)  # reader faults (bad JSON, a CSV row of the wrong width) and row faults, in file order
    if bad and not d.skip_bad_rows:
        n = len(bad) - 1
        more = (f" (and {n} more bad row{'s' if n > 1 else ''}; --skip-bad-rows, or data.skip_bad_rows: true, skips and "
                "counts them)" if n else " (--skip-bad-rows, or data.skip_bad_rows: true, skips and counts such rows)")
        raise DataError(bad[0] + more)
    details = {"bad_rows_skipped": len(bad), "skipped": bad[:5], "empty_rows": empty}
    if layout.references:
        details["rows_missing_a_reference"] = no_refs
    steps.append(_step(f"read {split}", len(table.rows) + len(table.skipped), len(rows), details))
    return rows, layout.name, f"{split}: {path} ({table.describe()}); {layout.describe()}", empty


def _check_column(setting: str, name: str | None, table: Table) -> None:
    """DataError when a setting names a column the file does not have: a typo, not a fault of every row."""
    if name and name not in table.columns:
        close = difflib.get_close_matches(name, table.columns, n=1)
        raise DataError(f"{setting}: no column {name!r} in {table.path}"
                        + (f" (did you mean {close[0]!r}?)" if close else "") + f"; columns: {', '.join(table.columns)}")


def _split_keys(rec: dict[str, Any], values: dict[str, Any], p: Any, where: str) -> None:
    """The row's ``group_by`` value (``_group``) and ``order_by`` value (``_order``, checked to be a
    number or a date) on its record; DataError naming the row when one is missing or unreadable."""
    for key, name in (("group_by", p.group_by), ("order_by", p.order_by)):
        if name and name not in values:
            raise DataError(f"{where}: data.prepare.{key} column {name!r} is missing "
                            f"(the row has {', '.join(map(repr, values))})")
    if p.group_by:
        rec["_group"] = str(values[p.group_by])
    if p.order_by:
        value = values[p.order_by]
        order_key(value, p.order_by, where)  # a value that is neither a number nor a date is a bad row
        rec["_order"] = value.isoformat() if isinstance(value, dt.date) else value


def _line_of(message: str) -> int:
    """The line number in a "file:line: reason" message (0 when it has none)."""
    m = re.search(r":(\d+): ", message)
    return int(m.group(1)) if m else 0


def _check_renders(tokenizer: Any, example: Example) -> None:
    """DataError when the chat template cannot render the example (e.g. it rejects its roles)."""
    from tunesmith.data.render import render

    render(tokenizer, example.messages, source=example.source)


def content_hash(cfg: Config) -> str:
    """A hash of the input files' bytes and the data settings: equal hashes, equal prepared data.
    Of a folder (of text files, or a saved Hugging Face dataset), each file's name, size and
    modification time: an edited, added or removed file prepares the data again.

    The ``max_*_examples`` caps are left out: they are applied when loading, not when preparing.
    """
    settings = {k: v for k, v in dataclasses.asdict(cfg.data).items() if not (k.startswith("max_") and k.endswith("_examples"))}
    h = hashlib.sha256(json.dumps({"data": settings, "task": cfg.task, "model": cfg.model,
                                   "seed": cfg.train.seed}, sort_keys=True).encode())
    for path in (cfg.data.train, cfg.data.validation, cfg.data.test, cfg.data.prepare.labeling_functions):
        if path and Path(path).is_file():
            h.update(Path(path).read_bytes())
        elif path and Path(path).is_dir():
            for f in sorted(f for f in Path(path).rglob("*") if f.is_file()):
                h.update(f"{f.relative_to(path)}\0{f.stat().st_size}\0{f.stat().st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _filled(v: Any) -> bool:
    return v is not None and (not isinstance(v, str) or bool(v.strip())) and v != []


def _text_roles(rec: dict[str, Any]) -> list[str]:
    return [k for k, v in rec.items() if isinstance(v, str) and k not in ("label", "gold_label") and not k.startswith("_")]


def _key(rec: dict[str, Any]) -> str:
    """What a person reads of a record: the text fields joined (used for de-dup and lengths)."""
    if isinstance(rec.get("messages"), list):
        return "\n".join(str(m.get("content", "")) for m in rec["messages"] if isinstance(m, dict))
    return "\n".join(str(rec[k]) for k in _text_roles(rec))


def _target(rec: dict[str, Any], layout: str) -> str:
    """What the model learns to write for a record (its label or answer): rows differing here are not duplicates."""
    if layout == "chat":
        return "\n".join(m["content"] for m in rec["messages"] if m["role"] == "assistant")
    return "\n".join(str(rec.get(r) or "") for r in TARGET_ROLES[layout])


ANSWER_ROLES = ("output", "completion")  # what the model learns to write (with assistant turns and references)


def _map_texts(records: dict[str, list[dict[str, Any]]], fn: Any, answers: bool | None = None) -> None:
    """Apply ``fn(list_of_texts) -> list_of_texts`` to every text field, message contents and references
    included; ``answers`` True/False: only the answers (outputs, assistant turns, references) / only the rest."""
    refs: list[tuple[Any, Any]] = []
    for rows in records.values():
        for rec in rows:
            refs += [(rec, k) for k in _text_roles(rec) if answers is None or (k in ANSWER_ROLES) == answers]
            if isinstance(rec.get("messages"), list):
                refs += [(m, "content") for m in rec["messages"] if isinstance(m, dict) and isinstance(m.get("content"), str)
                         and (answers is None or (m.get("role") == "assistant") == answers)]
            if isinstance(rec.get("references"), list) and answers is not False:
                refs += [(rec["references"], i) for i in range(len(rec["references"]))]
    new = fn([holder[k] for holder, k in refs])
    for (holder, k), value in zip(refs, new):
        holder[k] = value


def _clean(records, p, steps) -> None:
    """Clean every text; HTML is stripped from what the model reads, and from its answers only
    with ``strip_html_answers`` (an answer that is HTML, or explains it, is what it should learn)."""
    from tunesmith.data.clean import CleanStats, clean_texts

    stats = CleanStats()

    def fn(strip_html):
        def clean(texts):
            out, part = clean_texts(texts, fix_unicode=True, strip_html=strip_html, junk_markers=p.junk_markers)
            stats.merge(part)
            return out
        return clean

    _map_texts(records, fn(p.strip_html), answers=False)
    _map_texts(records, fn(p.strip_html and p.strip_html_answers), answers=True)
    n = sum(len(r) for r in records.values())
    steps.append(_step("clean", n, n, {"texts_changed": stats.changed, "by_operation": dict(stats.by_operation),
                                       "html_in_answers": "stripped" if p.strip_html and p.strip_html_answers else "kept",
                                       "examples": {k: v[:3] for k, v in stats.examples.items()}}))


def _drop_empty(records, cfg: Config, layout: str, in_files: int, steps) -> None:
    """Drop rows whose prompt or target is empty (in the file, or left so by cleaning and redaction)."""
    labels = cfg.data.labels if cfg.task == "classification" else None
    weak = cfg.data.prepare.labeling_functions is not None
    before = sum(len(r) for r in records.values())
    for split, rows in records.items():
        kept = []
        for rec in rows:
            try:
                empty = check_record(rec, layout, {}, labels, rec["_source"], weak) == "empty"
            except DataError:  # e.g. an assistant turn that cleaning left empty
                empty = True
            if not empty:
                kept.append(rec)
        records[split] = kept
    removed = before - sum(len(r) for r in records.values())
    steps.append(_step("drop empty rows", before, before - removed, {
        "empty_in_files": in_files, "emptied_by_cleaning": removed - in_files,
        "empty_means": f"no {' / '.join(PROMPT_ROLES[layout]) or 'turn'} or no {' / '.join(TARGET_ROLES[layout]) or 'text'}"}))


def _redact(records, kinds, region, steps) -> None:
    from tunesmith.data.pii import redact_texts

    holder: dict[str, Any] = {}

    def fn(texts):
        out, holder["counts"], holder["examples"] = redact_texts(texts, kinds, region=region)
        return out

    _map_texts(records, fn)
    n = sum(len(r) for r in records.values())
    steps.append(_step("redact PII", n, n, {"counts": dict(holder["counts"]), "examples": holder["examples"]}))


def _weak_label(records, cfg, steps) -> None:
    """Label train/validation rows that have no label (all of them with ``weak_label_all``).

    Rows that do carry a label are the gold slice that measures each function's accuracy and
    the label model against majority vote. The test split keeps its gold labels only: its
    unlabeled rows are dropped, so evaluation never grades against weak labels.
    """
    from tunesmith.data.label import load_labeling_functions, weak_label

    p = cfg.data.prepare
    lfs = load_labeling_functions(p.labeling_functions)
    vocab = list(cfg.data.labels) or None
    for split, rows in records.items():
        before = len(rows)
        if split == "test":
            records[split] = [r for r in rows if _filled(r.get("label"))]
            steps.append(_step("test keeps gold labels only", before, len(records[split]), {}))
            continue
        gold = [str(r["label"]) if _filled(r.get("label")) else None for r in rows]
        targets = [i for i, g in enumerate(gold) if g is None or p.weak_label_all]
        if not targets:
            continue
        result = weak_label([_key(r) for r in rows], lfs, model=p.label_model,
                            gold=gold if any(g is not None for g in gold) else None, labels=vocab)
        for i in targets:
            rows[i]["label"] = result.labels[i]
            if gold[i] is not None:
                rows[i]["gold_label"] = gold[i]  # kept beside the weak label, for reports
        records[split] = [r for r in rows if _filled(r.get("label"))]
        steps.append(_step(f"weak labels ({split})", before, len(records[split]), {
            "weak_labeled": len(targets) - (before - len(records[split])), "uncovered_dropped": before - len(records[split]),
            "label_model": p.label_model, "gold_rows": sum(g is not None for g in gold),
            "gold_eval": result.gold_eval, "functions": result.summary}))


def _length_filter(records, tokenizer, lo, hi, steps, protected: set[str]) -> None:
    """Drop rows outside [lo, hi] tokens; rows of a protected split are counted but kept."""
    before = sum(len(r) for r in records.values())
    counts: Counter[str] = Counter()
    for split, rows in records.items():
        kept = []
        for r in rows:
            n = len(encode_plain(tokenizer, _key(r)))
            why = "too_short" if n < lo else "too_long" if hi and n > hi else None
            if why and split in protected:
                counts[f"{why}_kept_in_{split}"] += 1
            elif why:
                counts[why] += 1
                continue
            kept.append(r)
        records[split] = kept
    steps.append(_step("length filter (tokens)", before, sum(len(r) for r in records.values()), dict(counts)))


def _dedup(records, p, steps, layout: str, protected: set[str], warnings: list[str]) -> dict[str, Any]:
    """De-duplicate each split (a protected split: report only), then remove train rows that leak
    into validation/test. Rows with different targets are never merged."""
    from tunesmith.data.dedup import find_duplicates, find_leakage

    out: dict[str, Any] = {}
    for split, rows in records.items():
        result = find_duplicates([_key(r) for r in rows], near=p.dedup == "near", threshold=p.dedup_threshold,
                                 targets=[_target(r, layout) for r in rows])
        kept = list(range(len(rows))) if split in protected else result.keep
        records[split] = [rows[i] for i in kept]
        out[split] = {"exact_removed": result.removed_exact, "near_removed": result.removed_near,
                      "exact_clusters": len(result.exact), "near_clusters": len(result.near),
                      "kept_as_given": split in protected}
        examples = {kind: [(pair.kept[:200], pair.removed[:200]) for pair in pairs[:3]]
                    for kind, pairs in (("exact", result.exact_examples), ("near", result.near_examples)) if pairs}
        details = {"exact_removed": result.removed_exact, "near_removed": result.removed_near, "examples": examples}
        if split in protected:  # counted, not removed
            details = {"exact_duplicates_kept": result.removed_exact, "near_duplicates_kept": result.removed_near,
                       "examples": examples,
                       "kept": f"the {split} split is kept as given (data.prepare.filter_test: true removes them)"}
        steps.append(_step(f"de-duplicate {split}", len(rows), len(kept), details))
        if split not in protected and rows and result.removed_near > NEAR_DUP_WARN_SHARE * len(rows):
            warnings.append(f"de-duplication removed {result.removed_near} near duplicates from {split} "
                            f"({result.removed_near / len(rows):.0%} of it, more than {NEAR_DUP_WARN_SHARE:.0%}); "
                            f"check the examples in the report, or raise data.prepare.dedup_threshold "
                            f"({p.dedup_threshold}) or set data.prepare.dedup: exact")
    others = {s: [_key(r) for r in records[s]] for s in ("validation", "test") if s in records}
    if "train" in records and others:
        leaks = find_leakage([_key(r) for r in records["train"]], others, threshold=p.dedup_threshold)
        bad = {leak.train_index for leak in leaks}
        before = len(records["train"])
        examples = {f"leaks into {leak.split}": [] for leak in leaks[:5]}
        for leak in leaks[:5]:
            examples[f"leaks into {leak.split}"].append((_key(records["train"][leak.train_index])[:200],
                                                          others[leak.split][leak.other_index][:200]))
        records["train"] = [r for i, r in enumerate(records["train"]) if i not in bad]
        out["leakage_removed"] = len(bad)
        steps.append(_step("remove train rows leaking into validation/test", before, len(records["train"]),
                           {"examples": examples}))
    return out


def _split(records, cfg, steps) -> None:
    from tunesmith.data.split import split_indices

    d, p = cfg.data, cfg.data.prepare
    make_val, make_test = "validation" not in records, "test" not in records and p.test_size > 0
    if not (make_val or make_test):
        return
    rows, ordered = records["train"], p.split == "ordered"
    labels = ([str(r["label"]) if _filled(r.get("label")) else "(no label yet)" for r in rows]  # the functions label those
              if cfg.task == "classification" and p.stratify and not ordered else None)
    groups = [r["_group"] for r in rows] if p.group_by else None
    try:
        parts = split_indices(len(rows), validation=d.validation_size if make_val else 0,
                              test=p.test_size if make_test else 0, labels=labels, groups=groups, seed=cfg.train.seed,
                              ordered=ordered)
    except ValueError as e:  # too few rows left for the splits asked for: say which file and why, in config terms
        why = str(e).replace("or pass labels=None", "or set data.prepare.stratify: false")
        raise DataError(f"{d.train}: after preparation ({len(rows)} row{'' if len(rows) == 1 else 's'} left): {why}") from None
    for name, idx in parts.items():
        if idx or name == "train":
            records[name] = [rows[i] for i in idx]
    details = {k: len(v) for k, v in parts.items()} | {"stratified": labels is not None, "grouped_by": p.group_by}
    if ordered:  # validation and test are the newest rows: say by what, and which times each split covers
        details |= {"ordered_by": p.order_by or "file order (newest last)"}
        details |= {"ranges": time_ranges(records)} if p.order_by else {}
    steps.append(_step("split", len(rows), len(rows), details))


def _ordered_note(records: dict[str, list[dict[str, Any]]], p: Any, given: set[str]) -> str:
    """What an ordered split held out and what the caps keep; with ``order_by``, the span of each split."""
    held = [s for s in ("validation", "test") if s in records and s not in given]
    out = (f"split: ordered {'by ' + p.order_by if p.order_by else 'in file order (newest last)'}: "
           + (f"{' and '.join(held)} held out as the newest rows of train" if held else "nothing held out of train")
           + "; max_*_examples keep each split's newest rows")
    if p.order_by:
        out += " (" + ", ".join(f"{s} {first} .. {last}" for s, (first, last) in time_ranges(records).items()) + ")"
    return out


def _label_warnings(records, cfg) -> list[str]:
    """A warning for each declared label that no training row has (the model cannot learn it)."""
    if cfg.task != "classification" or not cfg.data.labels:
        return []
    seen = Counter(str(r.get("label")) for r in records.get("train", []))
    out = []
    for key, words in cfg.data.labels.items():
        if not seen[key]:
            where = [s for s in ("validation", "test") if any(str(r.get("label")) == key for r in records.get(s, []))]
            out.append(f"label {key!r} ({words}) has no training rows" + (f"; it appears in {' and '.join(where)}" if where else "")
                       + ": the model cannot learn it")
    return out


def _split_stats(rows: list[dict[str, Any]], tokenizer: Any | None) -> dict[str, Any]:
    stats: dict[str, Any] = {"rows": len(rows)}
    if rows and "label" in rows[0]:
        stats["labels"] = dict(sorted(Counter(str(r.get("label")) for r in rows).items()))
    if tokenizer is not None and rows:
        stats["token_lengths"] = [len(encode_plain(tokenizer, _key(r))) for r in rows]
    return stats


class _Steps(list):  # type: ignore[type-arg]
    """The report's list of steps; each appended step is also said (``prepare: clean: 6,920 rows, 1.2 s``)."""

    def __init__(self, say: Callable[[str], None] | None) -> None:
        super().__init__()
        self.say, self.since = say, time.perf_counter()

    def append(self, step: dict[str, Any]) -> None:
        super().append(step)
        now = time.perf_counter()
        if self.say is not None:
            rows = (f"{step['rows_in']:,} rows" if step["rows_in"] == step["rows_out"]
                    else f"{step['rows_in']:,} -> {step['rows_out']:,} rows")
            self.say(f"prepare: {step['step']}: {rows}, {now - self.since:.1f} s")
            for message in step.get("skipped") or []:  # --skip-bad-rows: which rows, and why (5 at most)
                self.say(f"  skipped: {message}")
            if step.get("bad_rows_skipped", 0) > len(step.get("skipped") or []):
                self.say(f"  ... and {step['bad_rows_skipped'] - len(step['skipped'])} more (data_report.json)")
        self.since = now


def _step(name: str, rows_in: int, rows_out: int, details: dict[str, Any]) -> dict[str, Any]:
    return {"step": name, "rows_in": rows_in, "rows_out": rows_out, "removed": rows_in - rows_out, **details}
