"""The GPU benchmark runs end to end on a tiny preset (on the CPU here), so the script cannot rot."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

import gpu_throughput  # noqa: E402


def test_gpu_benchmark_runs_on_a_tiny_preset(tmp_path):
    code = gpu_throughput.main(["--preset", "tiny", "--steps", "4", "--warmup", "1", "--micro-batch", "2",
                                "--seq-len", "64", "--out", str(tmp_path)])
    assert code == 0
    doc = json.loads((tmp_path / "gpu_throughput.json").read_text())
    by_method = {r["method"]: r for r in doc["results"]}
    assert set(by_method) == {"lora", "full"}
    assert by_method["lora"]["trainable_params"] < by_method["full"]["trainable_params"]
    for r in by_method.values():
        assert r["steps"] == 4 and r["tokens_per_s"] > 0 and 0 < r["mfu_vs_measured"] < 1
        assert r["final_loss"] < r["first_loss"] + 0.5  # it trains, it does not blow up
    assert "| full |" in (tmp_path / "gpu_throughput.md").read_text()


def test_random_data_masks_the_first_40_percent():
    data = gpu_throughput.random_data(5, 100, vocab=50, seed=1)
    for e in data:
        assert 50 <= len(e.input_ids) <= 100
        cut = int(len(e.input_ids) * 0.4)
        assert all(x == -100 for x in e.labels[:cut]) and e.labels[cut:] == e.input_ids[cut:]
