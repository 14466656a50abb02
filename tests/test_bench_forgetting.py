"""Keeps benchmarks/forgetting.py honest: its verdicts (share of each measure's damage removed, accuracy
cost, target) computed by hand on made-up rows, and its Markdown written from them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "forgetting.py"


def load_benchmark():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("forgetting_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(accuracy: float, ppl_change: float, agreement: float, kl: float) -> dict:
    return {"overrides": ["method=full"], "accuracy": accuracy, "accuracy_ci": [accuracy - 0.02, accuracy + 0.02],
            "base_accuracy": 0.57, "general_ppl_base": 10.0, "general_ppl_tuned": 10.0 * (1 + ppl_change),
            "general_ppl_change": ppl_change, "general_ppl_p": 0.01, "agreement_rougeL": agreement, "kl": kl,
            "forgetting_seconds": 9.0, "eval_seconds": 90.0, "train_seconds": 300.0, "steps": 75, "wall_seconds": 400.0,
            "mitigations": None}


def test_verdicts_by_hand_and_the_table(tmp_path):
    bench = load_benchmark()
    results = {"full": row(0.90, 0.10, 0.20, 0.40), "full+replay": row(0.89, 0.04, 0.60, 0.30),
               "full+l2sp": row(0.86, -0.01, 0.95, 0.05)}
    v = bench.verdicts(results)
    assert v["full+replay"]["damage_removed"]["perplexity"] == pytest.approx(0.6)  # 1 - 0.04 / 0.10
    assert v["full+replay"]["damage_removed"]["agreement"] == pytest.approx(0.5)  # 1 - 0.40 / 0.80
    assert v["full+replay"]["damage_removed"]["kl"] == pytest.approx(0.25)
    assert v["full+replay"]["accuracy_points_lost"] == pytest.approx(1.0)
    assert v["full+replay"]["target_met"] and v["full+replay"]["target_met_on"] == ["perplexity", "agreement"]
    assert v["full+l2sp"]["damage_removed"]["perplexity"] == pytest.approx(1.1)
    assert not v["full+l2sp"]["target_met"]  # 4 points of accuracy lost
    bench.write(tmp_path, "f", {"machine": {"date": "d", "load_average_at_start": 0.1, "cpu": "c", "cores": 2, "flags": [],
                                            "versions": {"torch": "x"}},
                                "settings": {}, "variants": results, "verdicts": v})
    md = (tmp_path / "f.md").read_text()
    assert "| full+replay | 60% | 50% | 25% | +1.0 | met (perplexity, agreement) |" in md
    assert "| full+l2sp | 110% | 94% | 88% | +4.0 | missed |" in md
