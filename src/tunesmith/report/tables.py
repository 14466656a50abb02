"""The method comparison as tables: column names and formatted cells (Markdown and HTML share them).

Takes the plain ``compare.json`` document (``runs.compare.summarize`` makes it); imports nothing
above ``report``.
"""

from __future__ import annotations

from typing import Any

from tunesmith.evaluation.metrics import p_is, p_text


def or_dash(v: float | None, spec: str) -> str:
    """``v`` formatted with ``spec``, or "-" when there is no value."""
    return "-" if v is None else format(v, spec)


def seconds_text(s: float) -> str:
    """A duration for people: ``none``, ``4.2 s``, ``87 s``, ``3.5 min``."""
    return "none" if s == 0 else f"{s:.1f} s" if s < 10 else f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def size_text(mib: float) -> str:
    """A size in MiB for people: bytes, kB, MB or GB as it reads best."""
    b = mib * 2**20
    return (f"{b:.0f} bytes" if b < 1024 else f"{b / 1024:.0f} kB" if b < 2**20 else f"{mib:.0f} MB" if mib < 1024
            else f"{mib / 1024:.1f} GB")


def table(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The comparison's column names and one row of formatted cells per method (Markdown and HTML)."""
    needs = any(r.get("data_needs") is not None for r in doc["methods"])
    header = ["method", f"{doc['metric']} [95% CI]", "p vs best", "base", "trainable params", "train time",
              "train tok/s", "peak RSS MiB", "latency ms (p95)", "batched ex/s", "batched tok/s", "artifact MiB",
              "train loss", "val loss", "gap", "general ppl change", "general KL"] + (["data needs"] if needs else [])
    rows = [[r["method"], f"{r['value']:.4f} [{r['low']:.4f}, {r['high']:.4f}]", _pval(r["p_vs_best"], doc.get("p_floor")),
             or_dash(r["base_value"], ".4f"), f"{r['trainable_parameters']:,}", f"{r['train_seconds']:.0f} s",
             or_dash(r["tokens_per_s"], ".0f"), or_dash(r["peak_rss_mib"], ".0f"),
             "-" if r.get("latency_ms") is None else f"{r['latency_ms']:.0f} ({r['latency_p95_ms']:.0f})",
             or_dash(r["examples_per_s"], ".2f"), or_dash(r.get("inference_tokens_per_s"), ".0f"),
             f"{r['artifact_mib']:.2f}", or_dash(r["final_train_loss"], ".3f"), or_dash(r["final_val_loss"], ".3f"),
             or_dash(r["gap"], "+.3f"), or_dash(r.get("forgetting"), "+.1%"), or_dash(r.get("general_kl"), ".3f")]
            + ([_needs(r)] if needs else []) for r in doc["methods"]]
    return header, rows


def learning_table(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """The learning curve as a table: one row per method, one column per training-set size."""
    curves = doc.get("learning_curve") or {}
    if not curves:
        return None
    sizes = sorted({p["train_examples"] for points in curves.values() for p in points})
    header = ["method"] + [f"{n:,} examples" for n in sizes]
    rows = []
    for method, points in curves.items():
        at = {p["train_examples"]: p for p in points}
        rows.append([method] + [f"{at[n]['value']:.4f} [{at[n]['low']:.4f}, {at[n]['high']:.4f}]"
                                + ("" if at[n]["p_vs_all_data"] is None else f" {p_is(at[n]['p_vs_all_data'], doc.get('p_floor'))}")
                                if n in at else "-" for n in sizes])
    return header, rows


def markdown(doc: dict[str, Any]) -> str:
    """The comparison as a Markdown table, the learning curve when measured, then the verdict."""
    header, rows = table(doc)
    lines = [f"Methods compared on {doc['test_examples']} test examples", "", *_md(header, rows)]
    learning = learning_table(doc)
    if learning:
        lines += ["", f"Test {doc['metric']} by training-set size (p: against the same method on all the data)", "",
                  *_md(*learning), "", *doc.get("learning_fit_words", [])]
    return "\n".join(lines + ["", doc["verdict"]])


def _md(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _needs(r: dict[str, Any]) -> str:
    if r.get("data_needs") is None:
        return "-"
    return f"{r['data_needs']:,}" + (" (all)" if r["data_needs"] == r.get("train_examples") else "")


def _pval(p: float | None, floor: float | None = None) -> str:
    return "best" if p is None else p_text(p, floor)

