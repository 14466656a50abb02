"""The DPO speed benchmark (ours with either reference vs TRL's DPOTrainer + PEFT) runs end to end on a tiny model,
so the script cannot rot; its numbers on the real model are in benchmarks/results/preference.md."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_the_dpo_benchmark_runs_every_side_on_a_tiny_model(tmp_path, tiny_model_dir):
    pairs = tmp_path / "pairs.jsonl"  # short pairs: the tiny model reads 256 positions
    pairs.write_text("".join(json.dumps({"prompt": f"what is the capital of france ? {i}", "chosen": "paris .",
                                         "rejected": "the quick brown fox"}) + "\n" for i in range(8)))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "preference.py"), "--model", str(tiny_model_dir),
                          "--data", str(pairs),
                          "--steps", "3", "--warmup", "1", "--batch", "2", "--pairs", "8", "--max-len", "64",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads((tmp_path / "preference_speed.json").read_text())
    sides = {r["side"]: r for r in doc["results"]}
    assert set(sides) == {"ours_adapter", "ours_precomputed", "trl"}
    for r in sides.values():
        assert r["steps"] == 3 and r["real_tokens"] > 0 and r["peak_rss_mib"] > 0
    assert sides["ours_precomputed"]["reference_seconds"] > 0 and "speed_vs_trl" in sides["ours_adapter"]
    # the same objective, the same pairs: both references give the same first-step loss (log 2: policy = reference)
    assert abs(sides["ours_adapter"]["losses"][0] - 0.6931) < 1e-3 and abs(sides["trl"]["losses"][0] - 0.6931) < 1e-3
