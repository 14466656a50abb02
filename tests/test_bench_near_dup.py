"""Keeps benchmarks/near_dup.py runnable: its main() on 2000 rows into a temporary folder."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "near_dup.py"
DATA = Path(__file__).resolve().parents[1] / "examples" / "data"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("near_dup_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not (DATA / "sms_spam").exists(), reason="examples/data not present")
def test_benchmark_main_small(tmp_path):
    bench = load_benchmark()
    results = bench.main(["--rows", "2000", "--out", str(tmp_path), "--data", str(DATA)])
    saved = json.loads((tmp_path / "near_dup.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["run"]["rows"] == 2000
    assert saved["quality"]["planted_pairs"] == 800
    assert saved["quality"]["recall_at_threshold"] >= 0.85
    assert saved["quality"]["recall_by_edit"]["case_punct"] == 1.0  # exact after normalize()
    assert saved["machine"]["cores"] and saved["machine"]["load_average_1_5_15"]
    report = (tmp_path / "near_dup.md").read_text()
    assert "rows/s" in report and "recall" in report


def test_planted_edits_are_small():
    bench = load_benchmark()
    import random
    rng = random.Random(0)
    for kind in bench.EDITS:
        text, made = bench.edit("one two three four five", kind, ["zebra"], rng)
        assert made == kind and text != "one two three four five"
        assert abs(len(text.split()) - 5) <= 1
