"""The throughput benchmark runs end to end on a tiny model, so the script cannot rot."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

import train_throughput  # noqa: E402


def test_benchmark_runs_on_a_tiny_model(tmp_path, tiny_model_dir):
    rows = [{"instruction": f"say hello {i}", "input": "world" if i % 2 else "", "output": "hello " * (i % 5 + 1)}
            for i in range(train_throughput.EVAL_EXAMPLES + 24)]
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(rows))
    out = tmp_path / "results"
    code = train_throughput.main(["--model", str(tiny_model_dir), "--data", str(data), "--steps", "3", "--warmup", "1",
                                  "--batch", "4", "--repeats", "1", "--sides", "ours_bf16,ours_bf16_packed,ours_bf16_budget,trl_bf16,trl_bf16_same",
                                  "--out", str(out), "--force"])
    assert code == 0
    results = json.loads((out / "train_throughput.json").read_text())
    for side in ("ours_bf16", "ours_bf16_packed", "ours_bf16_budget", "trl_bf16", "trl_bf16_same"):
        r = results["summary"][side]
        assert r["real_tokens_per_s"] > 0 and r["peak_rss_mib"] > 0 and r["eval_loss"] > 0
    assert "speed_vs_trl_bf16" in results["summary"]["ours_bf16"]
    assert "| trl_bf16 |" in (out / "train_throughput.md").read_text()
