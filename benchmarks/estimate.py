"""How close `tunesmith estimate` comes: predicted vs measured training time and peak memory.

For each case: `tunesmith estimate` (calibration run on this machine), then `tunesmith train` of
the same config, each in its own process as a user runs them; the run's train_result.json holds
predicted against actual (``estimate``). The issue's target: time and peak memory within 25%.

  demo   examples/sst2.yaml as shipped (LoRA, 75 steps)
  full   the same with method=full (30 steps)

Evaluation after training is kept small (it is not part of what is predicted).

    python benchmarks/estimate.py                  # writes benchmarks/results/estimate.{json,md}
    python benchmarks/estimate.py --cases full
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

SMALL_EVAL = ["data.max_test_examples=64", "eval.general=none", "eval.latency_examples=0"]
CASES: dict[str, list[str]] = {
    "demo": [],
    "full": ["method=full", "train.max_steps=30", "train.eval_every=15"],
}


def run_case(name: str, overrides: list[str], out: Path) -> dict[str, object]:
    sets = [a for o in overrides + SMALL_EVAL + [f"output_dir={out}", f"name=estimate-{name}"] for a in ("--set", o)]
    exe = str(Path(sys.executable).with_name("tunesmith"))
    config = str(ROOT / "examples" / "sst2.yaml")
    t0 = time.perf_counter()
    subprocess.run([exe, "estimate", config, *sets], check=True, stdout=subprocess.DEVNULL)
    estimate_seconds = time.perf_counter() - t0
    subprocess.run([exe, "train", config, *sets], check=True, stdout=subprocess.DEVNULL)
    run = out / f"estimate-{name}"
    predicted = json.loads((run / "estimate.json").read_text())
    result = json.loads((run / "train_result.json").read_text())
    return {"case": name, "overrides": overrides, "estimate_seconds": estimate_seconds,
            "steps": result["steps"], "planned_steps": predicted["steps"], **result["estimate"],
            "activation_factor": predicted["memory_mib"].get("activation_factor"),
            "tokens_per_s_calibrated": predicted["time"]["tokens_per_s"]}


def markdown(rows: list[dict[str, object]], machine: dict[str, object]) -> str:
    lines = ["# `tunesmith estimate`: predicted vs measured", "",
             f"Machine: {machine.get('cpu')}, {machine.get('cores')} cores; torch {machine.get('versions', {}).get('torch')}. "
             "Each case: `tunesmith estimate` (its ~20 s calibration run), then `tunesmith train` of the same config, "
             "separate processes, nothing else running. Error = (predicted - actual) / actual. Target: within 25%.", "",
             "| case | steps | time predicted | time actual | error | training-steps error | peak MiB predicted | peak MiB actual | error | estimate took |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['steps']}/{r['planned_steps']} | {r['predicted_seconds']:.0f} s | {r['actual_seconds']:.0f} s | "
                     f"{r['error_seconds']:+.0%} | {r['error_train_seconds']:+.0%} | {r['predicted_peak_mib']:,.0f} | "
                     f"{r['actual_peak_mib']:,.0f} | {r['error_peak_mib']:+.0%} | {r['estimate_seconds']:.0f} s |")
    lines += ["", "Time is the training phase (steps and validations, from the first step to the saved model, without the "
              "final test evaluation); training-steps error compares the steps alone. Peak memory is the process's peak "
              "RSS from the first step on (`VmHWM`, reset when training starts)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args()
    from train_throughput import machine

    rows = []
    with tempfile.TemporaryDirectory(prefix="tunesmith-estimate-") as tmp:
        for name in args.cases.split(","):
            rows.append(run_case(name, CASES[name], Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    results = ROOT / "benchmarks" / "results"
    m = machine()
    (results / "estimate.json").write_text(json.dumps({"machine": m, "rows": rows}, indent=1) + "\n")
    (results / "estimate.md").write_text(markdown(rows, m))
    print(markdown(rows, m))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
