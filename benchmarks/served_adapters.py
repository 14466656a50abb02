"""Finished LoRA runs served together: does one mixed batch answer as each request alone, and as
the runs' own evaluations did?

One ``tunesmith serve RUN...`` process (127.0.0.1, a free port) serves the runs' adapters on their
shared base and the base itself. From each run's test split, ``--examples`` prompts go to that
run's adapter (and the first two of the first run to the base), greedy, at most the run's
``eval.max_new_tokens`` tokens: first one request at a time, then all at once from as many client
threads (the engine batches them, adapters mixed). Reported: how many concurrent answers equal the
lone ones, and, for runs evaluated by free generation (``predictions.jsonl`` holding the tuned
model's text), how many served answers equal the evaluated ones (the run's system prompt is sent
by the server, as in training).

    python benchmarks/served_adapters.py runs/sst2-gemma3-lora runs/samsum-gemma3-lora
        # writes benchmarks/results/served_adapters.{json,md}; --out PATH to write elsewhere

Uses the ``openai`` client and the ``tunesmith`` on this interpreter's PATH (the venv's).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
OUT = ROOT / "benchmarks" / "results" / "served_adapters"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _prompt(row: dict[str, Any]) -> str:
    """The user message of a prepared test row (prompt/completion, instruction, text or messages)."""
    if row.get("messages"):
        return next(m["content"] for m in reversed(row["messages"]) if m["role"] == "user")
    for key in ("prompt", "instruction", "text"):
        if row.get(key):
            return str(row[key]) + (f"\n\n{row['input']}" if key == "instruction" and row.get("input") else "")
    raise ValueError(f"no prompt in test row {sorted(row)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="finished LoRA run folders on one base model")
    ap.add_argument("--examples", type=int, default=4, help="test prompts per run")
    ap.add_argument("--out", type=Path, default=OUT, help="results path, without suffix")
    ap.add_argument("--startup-seconds", type=float, default=600)
    args = ap.parse_args(argv)
    from openai import OpenAI
    from train_throughput import machine

    load = os.getloadavg()[0]
    port = _free_port()
    exe = Path(sys.executable).with_name("tunesmith")
    log = Path(tempfile.gettempdir()) / f"served_adapters.{port}.log"  # the server's output, not a result
    args.out.parent.mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen([str(exe), "serve", *map(str, args.runs), "--port", str(port)],
                              stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + args.startup_seconds
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"the server did not start: see {log}") from None
                time.sleep(0.5)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=1800)
        served = [m.id for m in client.models.list().data]
        requests: list[dict[str, Any]] = []
        for run in args.runs:
            cfg = yaml.safe_load((run / "config.yaml").read_text())
            name, max_tokens = cfg["name"], int(cfg.get("eval", {}).get("max_new_tokens", 64))
            if name not in served:
                raise SystemExit(f"{run}: served as none of {served}")
            rows = [json.loads(x) for x in (run / "data" / "test.jsonl").read_text().splitlines()][: args.examples]
            evaluated = [json.loads(x) for x in (run / "predictions.jsonl").read_text().splitlines()][: args.examples]
            generated = bool(evaluated) and isinstance(evaluated[0].get("tuned"), str) and "tuned_nll" in evaluated[0] \
                and cfg.get("task") != "classification"
            for row, ev in zip(rows, evaluated):
                requests.append({"model": name, "prompt": _prompt(row), "max_tokens": max_tokens,
                                 "evaluated": ev["tuned"] if generated else None})
        base = next((m for m in served if m not in {r["model"] for r in requests}), None)
        if base:
            requests += [dict(r, model=base, evaluated=None) for r in requests[:2]]

        def ask(r: dict[str, Any]) -> tuple[str, float]:
            t = time.perf_counter()
            out = client.chat.completions.create(model=r["model"], temperature=0, max_tokens=r["max_tokens"],
                                                 messages=[{"role": "user", "content": r["prompt"]}])
            return out.choices[0].message.content or "", time.perf_counter() - t

        t0 = time.perf_counter()
        alone = [ask(r) for r in requests]
        sequential = time.perf_counter() - t0
        t0 = time.perf_counter()
        with ThreadPoolExecutor(len(requests)) as pool:
            mixed = list(pool.map(ask, requests))
        concurrent = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(60)
    rows_out = [{"model": r["model"], "alone": a[0], "mixed": m[0], "equal": a[0] == m[0],
                 **({"evaluated": r["evaluated"], "equal_to_evaluated": a[0].strip() == r["evaluated"].strip()}
                    if r["evaluated"] is not None else {})} for r, a, m in zip(requests, alone, mixed)]
    checked = [x for x in rows_out if "equal_to_evaluated" in x]
    result = {"machine": machine() | {"load_at_start": load}, "runs": [str(r) for r in args.runs],
              "served": served, "requests": len(rows_out), "mixed_equal_alone": sum(x["equal"] for x in rows_out),
              "served_equal_evaluated": sum(x["equal_to_evaluated"] for x in checked), "evaluated_checked": len(checked),
              "sequential_s": round(sequential, 2), "concurrent_s": round(concurrent, 2), "answers": rows_out}
    from tunesmith.io import atomic_write_json, atomic_write_text

    atomic_write_json(args.out.with_suffix(".json"), result)
    m = result["machine"]
    lines = ["# Finished runs served together: mixed batch vs alone", "",
             f"- Machine: {m.get('cpu', '')}; load average at start {load:.2f}",
             f"- Runs: {', '.join(result['runs'])}; served: {', '.join(served)}",
             f"- Concurrent answers equal to the same request alone: **{result['mixed_equal_alone']} of {len(rows_out)}**",
             f"- Served answers equal to the run's evaluated answers (free-generation runs): "
             f"**{result['served_equal_evaluated']} of {len(checked)}**",
             f"- One at a time {sequential:.1f} s, all at once {concurrent:.1f} s", "",
             "| model | alone | mixed | equal |", "|---|---|---|---|"]
    for x in rows_out:
        cell = [x["model"], x["alone"][:60].replace("\n", " ").replace("|", "/"),
                x["mixed"][:60].replace("\n", " ").replace("|", "/"), "yes" if x["equal"] else "**no**"]
        lines.append("| " + " | ".join(cell) + " |")
    atomic_write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("answers", "machine")}, indent=1))
    return 0 if result["mixed_equal_alone"] == len(rows_out) and result["served_equal_evaluated"] == len(checked) else 1


if __name__ == "__main__":
    raise SystemExit(main())
