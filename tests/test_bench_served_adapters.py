"""The served-adapters check runs end to end on two tiny finished runs, so the script cannot rot."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

import served_adapters  # noqa: E402


def test_two_served_adapters_answer_as_alone_and_as_evaluated(tmp_path, finished_runs):
    out = tmp_path / "served"
    code = served_adapters.main([str(finished_runs["alpha-lora"]), str(finished_runs["beta-lora"]),
                                 "--examples", "2", "--out", str(out)])
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["requests"] == 2 + 2 + 2  # two per run, two more to the base
    assert {a["model"] for a in result["answers"]} == {"alpha-lora", "beta-lora"} | {result["served"][0]}
    assert result["evaluated_checked"] == 4  # instruction runs: their predictions are generated text
    assert code == 0 and result["mixed_equal_alone"] == 6 and result["served_equal_evaluated"] == 4, result["answers"]
    assert "| alpha-lora |" in out.with_suffix(".md").read_text()
