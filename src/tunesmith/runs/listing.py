"""``tunesmith runs``: the run index as a table, and two runs side by side."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich import box
from rich.table import Table

from tunesmith.runtime.commands import command


def _num(x: Any, fmt: str = "{:.3f}") -> str:
    return "" if x is None else fmt.format(x)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def runs_table(rows: list[dict[str, Any]]) -> Table:
    """One line per run: name, date, status, model, method, data, headline metric [95% interval]
    (base), training time, tokens/s, cost (shown when a run's config gives ``estimate.price_per_hour``)."""
    models = {str(r.get("model") or "") for r in rows}
    one_model = len(models) == 1  # then named in the title, not on every row
    t = Table(show_lines=False, box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False, collapse_padding=True,
              title=f"{len(rows)} run{'' if len(rows) == 1 else 's'}" + (f" of model {models.pop()}" if one_model else ""))
    priced = any(r.get("cost") is not None for r in rows)
    cols = ["name", "date (UTC)", "status"] + ([] if one_model else ["model"]) + ["method", "data", "test metric: tuned [95% CI]", "base",
            "train time", "tok/s"] + (["cost"] if priced else [])
    for col in cols:
        t.add_column(col, justify="right" if col in ("test metric: tuned [95% CI]", "base", "train time", "tok/s", "cost") else "left",
                     no_wrap=True, overflow="ellipsis", max_width=18 if col in ("model", "data") else None,
                     min_width=6 if col in ("base", "tok/s", "cost") else None)
    for r in rows:
        interval = f" [{r['low']:.3f}, {r['high']:.3f}]" if r.get("low") is not None and r.get("high") is not None else ""
        data = str(r.get("data") or "")
        cells = [r["name"], (r.get("created") or "")[:16].replace("T", " "), r.get("status") or ""]
        cells += [] if one_model else [str(r.get("model") or "").rstrip("/").rsplit("/", 1)[-1]]
        cells += [r.get("method") or "", data.rsplit("/", 1)[-1],
                 f"{r.get('metric') or ''} {_num(r.get('value'))}{interval}".strip(), _num(r.get("base_value")),
                 _duration(r.get("train_seconds")), _num(r.get("tokens_per_s"), "{:,.0f}")]
        t.add_row(*cells + ([_num(r.get("cost"), "{:.4f}")] if priced else []))
    return t


def print_runs(rows: list[dict[str, Any]], console: Console) -> None:
    if not rows:
        console.print(f"no runs in the index yet ({command('train', 'CONFIG')} adds them; {command('runs', '--rebuild')} "
                      "finds existing folders)", highlight=False)
        return
    console.print(runs_table(rows))
    for r in rows:  # full folder paths below the table: the table cuts long ones
        console.print(f"  {r['name']}: {r['path']}", highlight=False, soft_wrap=True)


def print_diff(a: dict[str, Any], b: dict[str, Any], differences: dict[str, dict[str, tuple[Any, Any]]], console: Console) -> None:
    """The differing config keys and results of two runs, in two tables."""
    for part, title in (("config", "settings"), ("results", "results")):
        rows = differences[part]
        t = Table(title=f"{title} that differ ({len(rows)})")
        t.add_column("key")
        t.add_column(a["name"] + " (A)", overflow="fold")
        t.add_column(b["name"] + " (B)", overflow="fold")
        for key, (x, y) in rows.items():
            t.add_row(key, "" if x is None else _fmt(x), "" if y is None else _fmt(y))
        console.print(t)
    console.print(f"A: {a['path']}\nB: {b['path']}", highlight=False, soft_wrap=True)


def _fmt(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)
