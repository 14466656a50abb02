"""Every shipped example config loads, validates, and prepares its real data set as published."""

from pathlib import Path

import pytest

from tunesmith.config import load_config
from tunesmith.data.prepare import load_splits
from tunesmith.models import ready_tokenizer

EXAMPLES = Path(__file__).parents[1] / "examples"
CONFIGS = sorted(EXAMPLES.glob("*.yaml"))


def test_the_examples_are_all_here():
    assert {p.stem for p in CONFIGS} >= {"sst2", "sst2_minilm", "sms_spam", "sms_spam_weak", "trec", "alpaca", "samsum",
                                         "bitext_intents", "wiki_text", "hh_rlhf_dpo"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_example_config_prepares_its_data(path, tmp_path, tiny_model_dir, tokenizer):
    cfg = load_config(path, [f"output_dir={tmp_path}"])
    if cfg.tasks:  # multi-task: each task's data comes from a single-task example checked on its own
        assert cfg.tasks and all(Path(t.data.train).is_file() for t in cfg.tasks)
        return
    assert Path(cfg.data.train).exists()  # paths resolve from any working folder (a file, or a folder of files)
    cfg.model = str(tiny_model_dir)  # the tiny tokenizer stands in for the real one: this checks the data, fast
    if cfg.task == "preference":  # pairs: their own reading and splitting (data.preference), the same fields
        from tunesmith.data.preference import load_preference_splits

        splits = load_preference_splits(cfg, tmp_path / "data")
    else:
        splits = load_splits(cfg, tmp_path / "data", ready_tokenizer(tokenizer, cfg))
    assert splits.train and splits.validation and splits.test
    read = [s for s in splits.report["steps"] if s["step"].startswith("read ")]
    skipped = 4 if path.stem == "hh_rlhf_dpo" else 0  # 4 HH-RLHF rows have an empty reply (skip_bad_rows: true)
    assert all(s["bad_rows_skipped"] == skipped for s in read), read
    if cfg.task == "classification":
        assert not splits.report["warnings"], splits.report["warnings"]  # every declared label is trained on
        assert {ex.label for ex in splits.train} == set(cfg.data.labels)
    if path.stem == "alpaca":
        assert sum(s["rows_in"] for s in read) == 999 and not any(
            s["step"] == "drop empty rows" and s["removed"] for s in splits.report["steps"])
