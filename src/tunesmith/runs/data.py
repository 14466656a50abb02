"""A run's data: prepared (or read back) from its config, encoded, and described to the user.

``prepare_data`` runs ``data.prepare`` for a config and prints what it did; ``multitask_data``
builds the mixed training list and one validation set per task for ``tasks:`` runs.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from tunesmith.config import Config, save_config, task_config
from tunesmith.data.mix import mix
from tunesmith.data.prepare import load_splits
from tunesmith.data.render import encode_examples
from tunesmith.io import atomic_write_json
from tunesmith.models import load_tokenizer, ready_tokenizer, uses_head
from tunesmith.report.html import write_report
from tunesmith.runs.errors import RunError


def multitask_data(cfg: Config, tokenizer: Any, console: Console) -> tuple[list[Any], dict[str, list[Any]], dict[str, Any]]:
    """A multi-task run's data: each task prepared into ``data/<name>/`` by the single-task pipeline
    (its own task type, labels, system prompt) and encoded with rows tagged by task; the training
    rows mixed by ``mixing`` (seeded by train.seed). Returns the mixed training rows, the validation
    rows per task (name -> rows) and the data report (per task, plus the mixing's achieved shares).
    Raises RunError for a task with no rows left, or one that would need a classification head.
    """
    train_rows, val_rows, reports = {}, {}, {}
    for t in cfg.tasks:
        c = task_config(cfg, t)
        if uses_head(c):
            raise RunError(f"task {t.name}: {cfg.model} would classify with a head; multi-task runs need a generative "
                           "model (set classifier: lm)")
        ready_tokenizer(tokenizer, c)
        out = cfg.run_dir / "data" / t.name
        splits = load_splits(c, out, tokenizer)
        console.print(f"[bold]{t.name}[/bold]: " + ("reusing the prepared data in " if splits.reused
                                                    else "prepared the data into ") + str(out), highlight=False)
        for note in splits.notes:  # each file's format, encoding and layout, as a single-task run says
            console.print(f"  {note}", highlight=False)
        rows, train_stats = encode_examples(c, tokenizer, splits.train, False)
        val, val_stats = encode_examples(c, tokenizer, splits.validation, False)
        for e in rows + val:
            e.task = t.name
        if not rows or not val:
            raise RunError(f"task {t.name}: no training or validation example has a target token left; "
                           "check max_seq_len and the data")
        train_rows[t.name], val_rows[t.name] = rows, val
        reports[t.name] = splits.report | {"notes": splits.notes, "encoded": {"train": train_stats, "validation": val_stats}}
        print_data_summary(reports[t.name], c, console, len(splits.test))
    mixed, mixing = mix(train_rows, {t.name: t.weight for t in cfg.tasks}, cfg.mixing.by, cfg.mixing.temperature,
                        cfg.train.seed)
    console.print("mixing (" + cfg.mixing.by + "): " + ", ".join(
        f"{n} {m['share']:.1%} ({m['drawn']:,} rows drawn from its {m['rows']:,}, each x{m['repeats']:.2f} on average)"
        for n, m in mixing["tasks"].items()), highlight=False)
    return mixed, val_rows, {"tasks": reports, "mixing": mixing}


def print_data_summary(report: dict[str, Any], cfg: Config, console: Console, test_examples: int) -> None:
    """Split sizes, warnings, and the true truncation and drop counts after rendering."""
    sizes = {s: st["rows"] for s, st in (report.get("splits") or {}).items()}
    if sizes:
        console.print("  split sizes: " + ", ".join(f"{s} {n:,}" for s, n in sizes.items())
                      + (f" (test examples used: {test_examples:,})" if test_examples != sizes.get("test", -1) else ""),
                      highlight=False)
    for w in report.get("warnings") or []:
        console.print(f"[yellow]warning: {w}[/yellow]", highlight=False)
    for split, st in (report.get("encoded") or {}).items():
        parts = []
        longer = st.get("truncated_prompt", 0) + st.get("truncated_answer", 0)
        if st.get("truncated_prompt"):
            parts.append(f"{st['truncated_prompt']:,} had their prompt shortened ({cfg.data.truncation_side}), the answer kept")
        if st.get("truncated_answer"):
            parts.append(f"{st['truncated_answer']:,} had their answer cut too")
        if longer:
            parts = [f"{longer:,} longer than max_seq_len={cfg.train.max_seq_len}: " + ", ".join(parts)]
        if st.get("dropped_no_target"):
            parts.append(f"{st['dropped_no_target']:,} dropped (no answer token left within max_seq_len)")
        if parts:
            console.print(f"[yellow]{split} ({st['examples']:,} examples): {'; '.join(parts)}[/yellow]", highlight=False)
        if st.get("texts_in_windows"):
            console.print(f"  {split}: {st['texts_in_windows']} texts longer than max_seq_len={cfg.train.max_seq_len} "
                          f"are trained on whole, in windows ({st['kept']:,} windows from {st['examples']:,} texts)",
                          highlight=False)
        if st.get("special_text"):
            console.print(f"  {split}: {st['special_text']} examples contain special-token strings (e.g. "
                          "'<|im_end|>') in their text; they are trained as text, never as control tokens", highlight=False)


def prepare_data(cfg: Config, console: Console | None = None) -> Any:
    """Prepare the config's data into ``runs/<name>/data/`` (splits as JSONL + data_report.json).

    A multi-task config (``tasks:``) prepares each task into ``data/<task>/`` as training would;
    the result is then a dict (task name -> that task's prepared data) and data_report.json holds
    ``{"tasks": {name: report}}``."""
    from tunesmith.data.prepare import prepare

    console = console or Console()
    say = (lambda line: console.print(line, highlight=False)) if not console.is_terminal else None  # a log: each step
    if cfg.task == "preference":  # pairs: read, checked, counted and split (data.preference)
        from types import SimpleNamespace

        from tunesmith.data.preference import load_preference_splits

        splits = load_preference_splits(cfg, cfg.run_dir / "data", say)
        atomic_write_json(cfg.run_dir / "data_report.json", splits.report)
        save_config(cfg, cfg.run_dir / "config.yaml")
        write_report(cfg.run_dir)
        out = cfg.run_dir / "data"
        prepared = SimpleNamespace(layout=splits.report["layout"], report=splits.report,
                                   files={s: out / f"{s}.jsonl" for s in ("train", "validation", "test")
                                          if (out / f"{s}.jsonl").is_file()})
        print_prepared(prepared, console)
        return prepared
    tokenizer = load_tokenizer(cfg.model)  # the tokenizer only: the model is not loaded
    if cfg.tasks:
        done = {}
        for t in cfg.tasks:
            c = task_config(cfg, t)
            done[t.name] = prepare(c, cfg.run_dir / "data" / t.name, ready_tokenizer(tokenizer, c), say)
            print_prepared(done[t.name], console, f"task {t.name}: ")
        atomic_write_json(cfg.run_dir / "data_report.json", {"tasks": {n: p.report for n, p in done.items()}})
        save_config(cfg, cfg.run_dir / "config.yaml")
        write_report(cfg.run_dir)
        return done
    prepared = prepare(cfg, cfg.run_dir / "data", ready_tokenizer(tokenizer, cfg), say)
    atomic_write_json(cfg.run_dir / "data_report.json", prepared.report)
    save_config(cfg, cfg.run_dir / "config.yaml")
    write_report(cfg.run_dir)
    print_prepared(prepared, console)
    return prepared


def print_prepared(prepared: Any, console: Console, title: str = "") -> None:
    table = Table(title=f"{title}data preparation ({prepared.layout})")
    for col in ("step", "rows in", "rows out", "removed"):
        table.add_column(col, justify="left" if col == "step" else "right")
    for s in prepared.report["steps"]:
        table.add_row(s["step"], str(s["rows_in"]), str(s["rows_out"]), str(s["removed"]))
    for split, st in prepared.report["splits"].items():
        table.add_row(f"[bold]{split} split[/bold]", "", str(st["rows"]), "")
    console.print(table)
    for note in prepared.report["notes"]:
        console.print(note, highlight=False)
    for w in prepared.report.get("warnings") or []:
        console.print(f"[yellow]warning: {w}[/yellow]", highlight=False)


def preference_data(cfg: Config, tokenizer: Any, console: Console) -> tuple[list[Any], list[Any], Any, dict[str, Any]]:
    """A ``task: preference`` run's data: read, checked, split (``data.preference.load_preference_splits``) and
    encoded as pairs. Returns the training and validation pairs, the splits and the data report."""
    from tunesmith.data.pairs import encode_pairs
    from tunesmith.data.preference import load_preference_splits
    from tunesmith.training.preference import mismatched

    out = cfg.run_dir / "data"
    splits = load_preference_splits(cfg, out, say=lambda line: console.print(line, highlight=False))
    console.print(("reusing the prepared data in " if splits.reused else "prepared the data into ") + str(out))
    for note in splits.notes:
        console.print(f"  {note}", highlight=False)
    kto = cfg.preference.objective == "kto"
    paired = [r for r in splits.train + splits.validation if r.paired]
    if not kto and len(paired) < len(splits.train) + len(splits.validation):
        raise RunError(f"{cfg.data.train}: preference.objective {cfg.preference.objective} learns from pairs, but "
                       f"{len(splits.train) + len(splits.validation) - len(paired)} rows have one answer and a label "
                       "(unpaired thumbs up/down): use preference.objective: kto")
    stats = {}
    sets = []
    for name, rows in (("train", splits.train), ("validation", splits.validation)):
        encoded, stats[name] = encode_pairs(tokenizer, rows, cfg.train.max_seq_len, cfg.preference.max_prompt_len,
                                            unpaired=kto)
        if kto:
            mismatched(encoded)
        sets.append(encoded)
    for name, s in stats.items():
        if s["prompt_cut"] or s["answer_cut"]:
            console.print(f"  {name}: {s['prompt_cut']} rows had their prompt's start cut and {s['answer_cut']} their "
                          f"answers' ends too, to fit train.max_seq_len={cfg.train.max_seq_len}", highlight=False)
    report = splits.report | {"notes": splits.notes, "encoded": stats}
    return sets[0], sets[1], splits, report
