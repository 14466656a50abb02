"""Benchmark: torch threads when other work shares the CPUs (tunesmith.runtime.choose_threads).

A LoRA training step of the embedded SmolLM2-135M (8 rows of 96 tokens, bf16 autocast) timed with
every thread count from 1 to the CPUs this process may use, on a quiet machine and with 1x and 3x
as many busy processes (``while True: pass``) as CPUs; and the thread count tunesmith chooses in
each case. Writes ``results/threads.{json,md}`` with the machine described.

    .venv/bin/python benchmarks/threads_under_load.py
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from tunesmith import methods, runtime
from tunesmith.config import load_config
from tunesmith.models import load_model

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def main() -> None:
    cfg = load_config(ROOT / "examples" / "sst2.yaml")
    model, _ = load_model("default")
    model = methods.prepare(model, cfg).train()
    x = torch.randint(100, 1000, (8, 96))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=x, labels=x).loss.backward()
        model.zero_grad(set_to_none=True)

    cpus = runtime.cpus_available()
    rows = []
    step()
    for busy in (0, cpus, 3 * cpus):
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
        try:
            time.sleep(3)
            chosen, why = runtime.choose_threads()
            row = {"busy_processes": busy, "chosen_threads": chosen, "why": why, "seconds_per_step": {}}
            for n in range(cpus, 0, -1):
                torch.set_num_threads(n)
                step()
                t0 = time.perf_counter()
                for _ in range(3):
                    step()
                row["seconds_per_step"][n] = (time.perf_counter() - t0) / 3
            rows.append(row)
            print(row, flush=True)
        finally:
            for h in hogs:
                h.kill()
    machine = {"cpu": _cpu(), "cpus": cpus, "python": platform.python_version(), "torch": torch.__version__,
               "date": dt.date.today().isoformat(), "load_before": os.getloadavg()[0]}
    out = {"machine": machine, "rows": rows}
    (HERE / "results" / "threads.json").write_text(json.dumps(out, indent=1))
    lines = [f"# torch threads under load ({machine['cpu']}, {cpus} CPUs, {machine['date']})", "",
             "A LoRA step of SmolLM2-135M (8 x 96 tokens, bf16 autocast), seconds per step by thread count, "
             "with other busy processes on the machine; `chosen` is `runtime.choose_threads()` at that moment.", "",
             "| busy processes | " + " | ".join(f"{n} thread{'s' if n > 1 else ''}" for n in range(cpus, 0, -1))
             + " | chosen |", "|---" * (cpus + 2) + "|"]
    for r in rows:
        lines.append(f"| {r['busy_processes']} | " + " | ".join(f"{r['seconds_per_step'][n]:.2f}" for n in range(cpus, 0, -1))
                     + f" | {r['chosen_threads']} |")
    (HERE / "results" / "threads.md").write_text("\n".join(lines) + "\n")


def _cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
