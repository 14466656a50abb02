"""``tunesmith prepare``: read -> clean -> redact -> label -> filter -> de-duplicate -> split -> report.

Each step works on canonical records (role -> value, e.g. {"text", "label"} or
{"instruction", "input", "output"}), counts what it removed or changed and keeps a few
examples of it, so the data report shows at a glance what happened to the data and why.
The prepared splits are written as JSONL in the canonical layout; training reads them back
with the same readers as any other file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.config import Config
from tunesmith.data.formats import DataError, Example, read_table
from tunesmith.data.layouts import REQUIRED, detect_layout, rows_to_examples
from tunesmith.io import atomic_write_json, atomic_write_jsonl

SPLITS = ("train", "validation", "test")
REPORT = "data_report.json"


@dataclass
class Splits:
    """Examples of each split, ready to render, and the preparation report they came from."""

    train: list[Example]
    validation: list[Example]
    test: list[Example]
    notes: list[str]
    report: dict[str, Any] = field(default_factory=dict)
    reused: bool = False


def load_splits(cfg: Config, out_dir: Path, tokenizer: Any | None = None) -> Splits:
    """The prepared splits of ``cfg``: reused from ``out_dir`` when the input files and data
    settings are unchanged (same content hash), prepared anew otherwise.

    Without a test split the validation split is also the test split. The ``max_*_examples``
    caps are applied here, after preparation, so they never change the prepared files.
    """
    out_dir = Path(out_dir)
    report_path = out_dir / REPORT
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    reused = report.get("content_hash") == content_hash(cfg) and (out_dir / "train.jsonl").is_file()
    if not reused:
        report = prepare(cfg, out_dir, tokenizer).report
    d = cfg.data
    labels = d.labels if cfg.task == "classification" else None
    loaded: dict[str, list[Example]] = {}
    for split in SPLITS:
        path = out_dir / f"{split}.jsonl"
        if path.is_file() and path.stat().st_size:
            table = read_table(path, "jsonl")
            loaded[split] = rows_to_examples(table, detect_layout(table, report["layout"]), labels, d.system_prompt)
    if not loaded.get("validation"):
        raise DataError(f"{d.train}: no validation rows after preparation; set data.validation or data.validation_size")
    test = loaded.get("test") or loaded["validation"]
    notes = list(report.get("notes", [])) + (["test: the validation split (no test split)"] if "test" not in loaded else [])
    return Splits(_cap(loaded["train"], d.max_train_examples, cfg.train.seed),
                  _cap(loaded["validation"], d.max_validation_examples, cfg.train.seed),
                  test[: d.max_test_examples] if d.max_test_examples else test, notes, report, reused)


def _cap(examples: list[Example], n: int | None, seed: int) -> list[Example]:
    """A seeded random subset of ``n`` examples (all when ``n`` is None or larger), in file order.

    Subsets are nested: with the same seed, the first 16 are among the first 64 (a learning curve
    then adds data rather than swapping it).
    """
    import random

    if not n or n >= len(examples):
        return examples
    order = list(range(len(examples)))
    random.Random(seed + 1).shuffle(order)
    return [examples[i] for i in sorted(order[:n])]


@dataclass
class Prepared:
    splits: dict[str, list[dict[str, Any]]]
    layout: str
    report: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)


def prepare(cfg: Config, out_dir: Path, tokenizer: Any | None = None) -> Prepared:
    """Run every preparation step the config asks for; write the splits and data_report.json."""
    d, p = cfg.data, cfg.data.prepare
    steps: list[dict[str, Any]] = []
    sources = {name: path for name, path in (("train", d.train), ("validation", d.validation), ("test", d.test)) if path}
    records: dict[str, list[dict[str, Any]]] = {}
    layout_name, notes = "", []
    for split, path in sources.items():
        table = read_table(path, d.format, d.skip_bad_rows)
        layout = detect_layout(table, d.layout, d.columns, cfg.task)
        layout_name = layout.name
        notes.append(f"{split}: {path} ({table.format}, {table.encoding}); {layout.describe()}")
        rows = []
        for row in table.rows:
            rec = {role: row.values.get(col) for role, col in layout.columns.items()}
            rec["_source"] = f"{table.path}:{row.line}"
            if p.group_by:
                if p.group_by not in row.values:
                    raise DataError(f"{rec['_source']}: data.prepare.group_by column {p.group_by!r} is missing "
                                    f"(the row has {', '.join(map(repr, row.values))})")
                rec["_group"] = str(row.values[p.group_by])
            problem = _row_problem(rec, layout, cfg, p.labeling_functions is not None)
            if problem:
                table.skipped.append(f"{rec['_source']}: {problem}")
                continue
            rows.append(rec)
        if table.skipped and not d.skip_bad_rows:
            raise DataError(table.skipped[0])
        steps.append(_step(f"read {split}", len(table.rows) + len(table.skipped), len(rows), {"skipped": table.skipped[:5]}))
        records[split] = rows
    if p.clean:
        _clean(records, p, steps)
    if p.pii:
        _redact(records, p.pii, p.pii_region, steps)
    if tokenizer is not None and (p.min_tokens or p.max_tokens):
        _length_filter(records, tokenizer, p.min_tokens, p.max_tokens, steps)
    dedup = _dedup(records, p, steps) if p.dedup != "none" else {}
    _split(records, cfg, steps)
    if p.labeling_functions:
        _weak_label(records, cfg, steps)
    report = {
        "task": cfg.task, "layout": layout_name, "notes": notes, "steps": steps, "dedup": dedup,
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


def _row_problem(rec: dict[str, Any], layout: Any, cfg: Config, weak_labels: bool) -> str | None:
    """Why a record cannot be used (an empty required field, an unknown label), or None."""
    for role in REQUIRED[layout.name]:
        if not _filled(rec.get(role)) and not (role == "label" and weak_labels):
            return f"field {layout.columns[role]!r} is empty or missing"
    label = rec.get("label")
    if cfg.task == "classification" and cfg.data.labels and _filled(label):
        rec["label"] = label = str(label)
        if label not in cfg.data.labels:
            known = ", ".join(repr(k) for k in cfg.data.labels)
            return f"field {layout.columns['label']!r}: unknown label {label!r}; expected one of {known}"
    return None


def content_hash(cfg: Config) -> str:
    """A hash of the input files' bytes and the data settings: equal hashes, equal prepared data.

    The ``max_*_examples`` caps are left out: they are applied when loading, not when preparing.
    """
    settings = {k: v for k, v in dataclasses.asdict(cfg.data).items() if not (k.startswith("max_") and k.endswith("_examples"))}
    h = hashlib.sha256(json.dumps({"data": settings, "task": cfg.task, "model": cfg.model,
                                   "seed": cfg.train.seed}, sort_keys=True).encode())
    for path in (cfg.data.train, cfg.data.validation, cfg.data.test, cfg.data.prepare.labeling_functions):
        if path and Path(path).is_file():
            h.update(Path(path).read_bytes())
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


def _map_texts(records: dict[str, list[dict[str, Any]]], fn: Any) -> None:
    """Apply ``fn(list_of_texts) -> list_of_texts`` to every text field, message contents included."""
    refs: list[tuple[dict[str, Any], str]] = []
    for rows in records.values():
        for rec in rows:
            refs += [(rec, k) for k in _text_roles(rec)]
            if isinstance(rec.get("messages"), list):
                refs += [(m, "content") for m in rec["messages"] if isinstance(m, dict) and isinstance(m.get("content"), str)]
    new = fn([holder[k] for holder, k in refs])
    for (holder, k), value in zip(refs, new):
        holder[k] = value


def _clean(records, p, steps) -> None:
    from tunesmith.data.clean import clean_texts

    holder: dict[str, Any] = {}

    def fn(texts):
        out, holder["stats"] = clean_texts(texts, fix_unicode=True, strip_html=p.strip_html, junk_markers=p.junk_markers)
        return out

    _map_texts(records, fn)
    stats = holder["stats"]
    before = sum(len(r) for r in records.values())
    for split, rows in records.items():
        records[split] = [r for r in rows if all(_filled(r.get(k)) for k in _text_roles(r))]
    after = sum(len(r) for r in records.values())
    steps.append(_step("clean", before, after, {"texts_changed": stats.changed, "by_operation": dict(stats.by_operation),
                                                "examples": {k: v[:3] for k, v in stats.examples.items()},
                                                "removed_empty": before - after}))


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


def _length_filter(records, tokenizer, lo, hi, steps) -> None:
    before = sum(len(r) for r in records.values())
    dropped: Counter[str] = Counter()
    for split, rows in records.items():
        kept = []
        for r in rows:
            n = len(tokenizer(_key(r), add_special_tokens=False)["input_ids"])
            if n < lo:
                dropped["too_short"] += 1
            elif hi and n > hi:
                dropped["too_long"] += 1
            else:
                kept.append(r)
        records[split] = kept
    steps.append(_step("length filter (tokens)", before, before - sum(dropped.values()), dict(dropped)))


def _dedup(records, p, steps) -> dict[str, Any]:
    from tunesmith.data.dedup import find_duplicates, find_leakage

    out: dict[str, Any] = {}
    for split, rows in records.items():
        result = find_duplicates([_key(r) for r in rows], near=p.dedup == "near", threshold=p.dedup_threshold)
        records[split] = [rows[i] for i in result.keep]
        out[split] = {"exact_removed": result.removed_exact, "near_removed": result.removed_near,
                      "exact_clusters": len(result.exact), "near_clusters": len(result.near)}
        examples = {kind: [(pair.kept[:200], pair.removed[:200]) for pair in pairs[:3]]
                    for kind, pairs in (("exact", result.exact_examples), ("near", result.near_examples)) if pairs}
        steps.append(_step(f"de-duplicate {split}", len(rows), len(result.keep),
                           {"exact_removed": result.removed_exact, "near_removed": result.removed_near, "examples": examples}))
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
    rows = records["train"]
    labels = [str(r.get("label")) for r in rows] if cfg.task == "classification" and p.stratify else None
    groups = [r["_group"] for r in rows] if p.group_by else None
    try:
        parts = split_indices(len(rows), validation=d.validation_size if make_val else 0,
                              test=p.test_size if make_test else 0, labels=labels, groups=groups, seed=cfg.train.seed)
    except ValueError as e:  # too few rows left for the splits asked for: say which file and why
        raise DataError(f"{d.train}: after preparation ({len(rows)} rows left): {e}") from None
    for name, idx in parts.items():
        if idx or name == "train":
            records[name] = [rows[i] for i in idx]
    steps.append(_step("split", len(rows), len(rows), {k: len(v) for k, v in parts.items()}
                       | {"stratified": labels is not None, "grouped_by": p.group_by}))


def _split_stats(rows: list[dict[str, Any]], tokenizer: Any | None) -> dict[str, Any]:
    stats: dict[str, Any] = {"rows": len(rows)}
    if rows and "label" in rows[0]:
        stats["labels"] = dict(sorted(Counter(str(r.get("label")) for r in rows).items()))
    if tokenizer is not None and rows:
        stats["token_lengths"] = [len(tokenizer(_key(r), add_special_tokens=False)["input_ids"]) for r in rows]
    return stats


def _step(name: str, rows_in: int, rows_out: int, details: dict[str, Any]) -> dict[str, Any]:
    return {"step": name, "rows_in": rows_in, "rows_out": rows_out, "removed": rows_in - rows_out, **details}
