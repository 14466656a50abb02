"""Benchmark: torch threads when other work shares the CPUs (tunesmith.runtime.threads).

A LoRA training step of the embedded SmolLM2-135M (8 rows of 96 tokens, bf16 autocast), each
setting in a fresh process (OpenMP reads its wait policy when it starts): threads spinning
between operations (OpenMP's default) or sleeping (``OMP_WAIT_POLICY=PASSIVE``), with one
thread per CPU and with one thread; on a quiet machine and with 1x and 3x as many busy processes
(``while True: pass``) as CPUs, after a minute of that load (so the load average shows it). Also
what ``tunesmith.runtime.threads.choose_wait_policy`` picks in each case. Writes ``results/threads.{json,md}``.

    .venv/bin/python benchmarks/threads_under_load.py              # quiet, 1x and 3x busy processes
    .venv/bin/python benchmarks/threads_under_load.py --loads 0    # measure one row again (the rest kept)
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

from tunesmith.runtime.threads import cpus_available

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
STEP = r"""
import sys, time
from tunesmith import methods  # before torch: the wait policy is read when OpenMP starts
from tunesmith.runtime import threads
import torch
from tunesmith.config import load_config
from tunesmith.models import load_model
model, _ = load_model("default")
model = methods.prepare(model, load_config(sys.argv[1])).train()
torch.set_num_threads(int(sys.argv[2]))
x = torch.randint(100, 1000, (8, 96))
def step():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=x, labels=x).loss.backward()
    model.zero_grad(set_to_none=True)
step(); step()
t0 = time.perf_counter()
for _ in range(3):
    step()
print(json.dumps({"seconds": (time.perf_counter() - t0) / 3, "policy": threads.choose_wait_policy()}))
""".replace("import sys,", "import json, sys,", 1)


def measure(threads: int, policy: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | ({"OMP_WAIT_POLICY": policy} if policy else {})
    out = subprocess.run([sys.executable, "-c", STEP, str(ROOT / "examples" / "sst2.yaml"), str(threads)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    import argparse

    cpus = cpus_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loads", default=f"0,{cpus},{3 * cpus}", help="busy processes per row (comma-separated); "
                        "rows already in results/threads.json for other loads are kept")
    loads = [int(x) for x in parser.parse_args().loads.split(",")]
    old = HERE / "results" / "threads.json"
    rows = [r for r in (json.loads(old.read_text())["rows"] if old.is_file() else []) if r["busy_processes"] not in loads]
    for busy in loads:
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
        try:
            time.sleep(60 if busy else 0)  # the load average shows a minute of it
            row = {"busy_processes": busy, "load_average": os.getloadavg()[0],
                   "spin": measure(cpus, "ACTIVE")["seconds"], "sleep": measure(cpus, "PASSIVE")["seconds"],
                   "spin_one_thread": measure(1, "ACTIVE")["seconds"], "chosen": measure(cpus, None)}
            rows.append(row)
            print(row, flush=True)
        finally:
            for h in hogs:
                h.kill()
    rows.sort(key=lambda r: r["busy_processes"])
    machine = {"cpu": _cpu(), "cpus": cpus, "python": platform.python_version(), "date": dt.date.today().isoformat()}
    (HERE / "results" / "threads.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    lines = [f"# torch threads under load ({machine['cpu']}, {cpus} CPUs, {machine['date']})", "",
             f"A LoRA step of SmolLM2-135M (8 x 96 tokens, bf16 autocast), seconds per step, each setting in a fresh "
             f"process, with other busy processes on the machine for a minute first. {cpus} threads spinning "
             "(OpenMP's default) or sleeping (OMP_WAIT_POLICY=PASSIVE) between operations, or 1 thread; "
             "`chosen` is what tunesmith picks by itself (tunesmith.runtime.threads), and its time.", "",
             f"| busy processes | load average | {cpus} threads, spin | {cpus} threads, sleep | 1 thread, spin | chosen |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        chosen = "sleep" if "sleep" in r["chosen"]["policy"] else "spin"
        lines.append(f"| {r['busy_processes']} | {r['load_average']:.1f} | {r['spin']:.2f} | {r['sleep']:.2f} | "
                     f"{r['spin_one_thread']:.2f} | {chosen}: {r['chosen']['seconds']:.2f} |")
    (HERE / "results" / "threads.md").write_text("\n".join(lines) + "\n")


def _cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
