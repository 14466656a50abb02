"""task: preference: the data layouts people have, their faults, pair encoding, a run end to end with an exact
resume, and the loop SFT run -> study -> ratings -> preference run -> second study on new prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tunesmith.config import ConfigError, load_config
from tunesmith.data.formats import DataError
from tunesmith.data.pairs import encode_pair, encode_pairs
from tunesmith.data.preference import PreferenceExample, read_preferences
from tunesmith.data.render import IGNORE, encode_plain

HH = ("\n\nHuman: what is the capital of france ?\n\nAssistant: paris .\n\nHuman: and of italy ?\n\nAssistant: ")


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- layouts


def test_every_layout_people_have_reads_to_the_same_pair(tmp_path):
    prompt = [{"role": "user", "content": "what is the capital of france ?"}]
    files = {
        "trl strings": [{"prompt": "what is the capital of france ?", "chosen": "paris .", "rejected": "rome ."}],
        "trl messages (study export)": [{"prompt": prompt, "chosen": [{"role": "assistant", "content": "paris ."}],
                                         "rejected": [{"role": "assistant", "content": "rome ."}], "votes": {"chosen": 2}}],
        "implicit prompt": [{"chosen": prompt + [{"role": "assistant", "content": "paris ."}],
                             "rejected": prompt + [{"role": "assistant", "content": "rome ."}]}],
        "hh-rlhf transcript": [{"chosen": "\n\nHuman: what is the capital of france ?\n\nAssistant: paris .",
                                "rejected": "\n\nHuman: what is the capital of france ?\n\nAssistant: rome ."}],
        "stackexchange names": [{"question": "what is the capital of france ?", "response_j": "paris .",
                                 "response_k": "rome ."}],
    }
    for name, rows in files.items():
        read = read_preferences(_jsonl(tmp_path / "p.jsonl", rows))
        assert read.layout == "preference", name
        [ex] = read.rows
        assert (ex.prompt, ex.chosen, ex.rejected) == (prompt, "paris .", "rome ."), name
    csv = tmp_path / "p.csv"
    csv.write_text("prompt,chosen,rejected\nwhat is the capital of france ?,paris .,rome .\n")
    assert read_preferences(csv).rows[0].rejected == "rome ."


def test_hh_transcripts_share_their_start_as_the_prompt_and_odd_rows_are_counted(tmp_path):
    rows = [{"chosen": HH + "rome .", "rejected": HH + "milan ."},
            {"chosen": HH + "rome .", "rejected": HH + "rome ."},  # no preference to learn
            {"chosen": HH + "rome .", "rejected": HH.replace("paris", "lyon") + "rome ."}]  # differ before the answer
    read = read_preferences(_jsonl(tmp_path / "hh.jsonl", rows))
    assert [m["role"] for m in read.rows[0].prompt] == ["user", "assistant", "user"]
    assert read.rows[0].prompt[1]["content"] == "paris ." and read.rows[0].chosen == "rome ."
    assert len(read.rows) == 1
    assert read.counts["identical_answers"] == 1 and read.counts["sides_differ_before_answer"] == 1


def test_unpaired_thumbs_read_with_boolean_labels_only(tmp_path):
    rows = [{"prompt": "q1", "completion": "good", "label": True}, {"prompt": "q2", "completion": "bad", "label": "false"},
            {"prompt": "q3", "completion": "ok", "label": 1}, {"prompt": "q4", "completion": "meh", "label": "No"}]
    read = read_preferences(_jsonl(tmp_path / "kto.jsonl", rows))
    assert read.layout == "unpaired"
    assert [(r.chosen, r.rejected) for r in read.rows] == [("good", None), (None, "bad"), ("ok", None), (None, "meh")]
    bad = _jsonl(tmp_path / "bad.jsonl", rows + [{"prompt": "q4", "completion": "meh", "label": "maybe"}])
    with pytest.raises(DataError, match=r"bad.jsonl:5: field 'label' \(label\): expected a boolean.*yes.*'maybe'"):
        read_preferences(bad)


@pytest.mark.parametrize("row, message", [
    ({"prompt": "q", "chosen": "a", "rejected": "  "}, r"p.jsonl:2: field 'rejected' is empty: a preference needs both"),
    ({"prompt": "q", "chosen": "a"}, r"p.jsonl:2: field 'rejected' \(rejected\) is missing"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, r"p.jsonl:2: field 'prompt' \(prompt\) is empty"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
     r"p.jsonl:2: field 'chosen': expected one assistant message, got user"),
    ({"chosen": "just text", "rejected": "other text"}, r"p.jsonl:2: field 'chosen': a whole conversation was expected"),
])
def test_bad_rows_name_file_line_and_field_and_can_be_skipped_and_counted(tmp_path, row, message):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    if "prompt" not in row:
        good = {"chosen": HH + "a", "rejected": HH + "b"}
    path = _jsonl(tmp_path / "p.jsonl", [good, row])
    with pytest.raises(DataError, match=message + r".*skip"):
        read_preferences(path)
    read = read_preferences(path, skip_bad=True)
    assert len(read.rows) == 1 and read.counts["bad_rows_skipped"] == 1


def test_no_preference_layout_lists_the_columns_found(tmp_path):
    with pytest.raises(DataError, match=r"t.jsonl: no preference layout fits the columns 'text', 'label'.*data.columns"):
        read_preferences(_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": 1}]))


# ---------------------------------------------------------------- encoding


def test_long_pairs_keep_the_prompt_end_and_both_answers_starts_alike(tokenizer):
    long_prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * 12) + " what is the capital of france ?"
    ex = PreferenceExample([{"role": "user", "content": long_prompt}], "paris . " * 30, "the lazy dog . " * 5)
    whole = encode_pair(tokenizer, ex, 10**6)
    cut = encode_pair(tokenizer, ex, 128)
    assert cut.truncated == "answer" and cut.prompt_len == 64  # the prompt keeps half, the answers the rest
    c, r = cut.sides()
    assert len(c.input_ids) == 128 and len(r.input_ids) <= 128
    assert c.input_ids[:64] == r.input_ids[:64] == whole.input_ids[whole.prompt_len - 64 : whole.prompt_len]
    assert c.input_ids[64:] == whole.input_ids[whole.prompt_len : whole.prompt_len + 64]  # the answer's start
    assert all(x == IGNORE for x in c.labels[:64]) and all(x != IGNORE for x in c.labels[64:])
    question = encode_plain(tokenizer, " what is the capital of france ?")
    assert question[-3:] == [t for t in c.input_ids[:64] if t in question][-3:]  # the question itself survives


def test_unpaired_rows_and_paired_rows_for_kto(tokenizer):
    rows = [PreferenceExample([{"role": "user", "content": "q"}], "yes", "no")]
    pairs, stats = encode_pairs(tokenizer, rows, 64, unpaired=True)
    assert [p.desirable for p in pairs] == [True, False] and all(p.rejected is None for p in pairs)
    assert stats["rows"] == 2


# ---------------------------------------------------------------- config


def test_preference_settings_are_checked_all_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(data={"task": "preference", "method": "full", "data": {"train": "x"},
                          "preference": {"objective": "dpoo", "beta": 0, "reference": "adapter"},
                          "train": {"packing": True}})
    problems = "\n".join(err.value.problems)
    assert "preference.objective: 'dpoo' is not one of dpo, ipo, simpo, orpo, kto; did you mean 'dpo'?" in problems
    assert "preference.beta: must be > 0" in problems
    assert "preference.reference: adapter needs method: lora" in problems
    assert "train.packing: preference pairs are trained side by side" in problems


# ---------------------------------------------------------------- runs


def _pairs_file(root: Path, n: int = 40) -> Path:
    return _jsonl(root / "pairs.jsonl", [{"prompt": f"what is the capital of france ? {i}", "chosen": "paris .",
                                          "rejected": "the quick brown fox"} for i in range(n)])


def _config(root: Path, model: Path, name: str, **over) -> Path:
    cfg = {"name": name, "model": str(model), "task": "preference", "method": "lora", "output_dir": str(root / "runs"),
           "data": {"train": str(_pairs_file(root)), "validation_size": 6, "prepare": {"test_size": 6}},
           "lora": {"r": 4, "alpha": 8}, "preference": {"objective": "dpo", "length_examples": 2},
           "train": {"max_steps": 6, "batch_size": 4, "lr": 5e-2, "precision": "fp32", "eval_every": 3},
           "eval": {"max_new_tokens": 4, "latency_examples": 0, "general": "none", "bootstrap_resamples": 200}}
    for k, v in over.items():
        cfg[k] = cfg.get(k, {}) | v if isinstance(v, dict) else v
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def test_a_dpo_run_trains_evaluates_and_resumes_exactly(tmp_path, tiny_model_dir):
    from tunesmith import finetune

    straight = finetune(load_config(_config(tmp_path, tiny_model_dir, "straight")))
    history = [json.loads(line) for line in (straight.dir / "metrics.jsonl").read_text().splitlines()]
    evals = [h for h in history if h["type"] == "eval"]
    assert evals[-1]["val_reward_margin"] > evals[0]["val_reward_margin"] > -1  # the margin grows on held-out pairs
    assert {"val_logps_chosen", "val_logps_rejected", "val_reward_accuracy"} <= set(evals[0]) and "val_ppl" not in evals[0]
    assert {"rewards_chosen", "reward_accuracy", "logps_rejected"} <= set(history[0])
    e = straight.eval
    assert e["task"] == "preference" and e["test_examples"] == 6
    assert e["tuned"]["margin_gain"] > 0 and "margin_gain" in e["tuned"]["ci"] and "mcnemar" in e
    assert {"pairwise_accuracy", "logps_chosen", "ci"} <= set(e["base"]) and e["answer_length"]["prompts"] == 2
    assert (straight.dir / "report.html").read_text().count("reward") >= 2
    assert (straight.dir / "reference_logps.json").is_file()

    cfg = load_config(_config(tmp_path, tiny_model_dir, "stopped"))
    first = finetune(cfg, until_step=4)
    assert first.train["interrupted"] and first.train["steps"] == 4
    resumed = finetune(cfg, resume=True)
    assert resumed.train["steps"] == 6
    for k, v in _adapter(straight.dir).items():  # the same weights as the run that never stopped
        torch.testing.assert_close(_adapter(resumed.dir)[k], v, rtol=0, atol=1e-6)


def test_adapter_reference_equals_the_precomputed_one_and_full_fine_tuning_runs(tmp_path, tiny_model_dir):
    from tunesmith import finetune

    pre = finetune(load_config(_config(tmp_path, tiny_model_dir, "pre")), evaluate=False)
    on_the_fly = finetune(load_config(_config(tmp_path, tiny_model_dir, "fly", preference={"reference": "adapter"})),
                          evaluate=False)
    for k, v in _adapter(pre.dir).items():
        torch.testing.assert_close(_adapter(on_the_fly.dir)[k], v, rtol=1e-5, atol=1e-6)
    full = finetune(load_config(_config(tmp_path, tiny_model_dir, "full", method="full",
                                        train={"lr": 5e-3}, preference={"objective": "ipo"})))
    assert full.eval["tuned"]["margin_gain"] > 0


def test_unpaired_data_needs_kto_and_kto_trains_on_it(tmp_path, tiny_model_dir):
    from tunesmith import finetune
    from tunesmith.runs import RunError

    rows = [{"prompt": f"q {i}", "completion": "paris ." if i % 2 else "the quick brown fox", "label": bool(i % 2)}
            for i in range(40)]
    data = {"train": str(_jsonl(tmp_path / "kto.jsonl", rows))}
    with pytest.raises(RunError, match="use preference.objective: kto"):
        finetune(load_config(_config(tmp_path, tiny_model_dir, "k1", data=data)))
    run = finetune(load_config(_config(tmp_path, tiny_model_dir, "k2", data=data,
                                       preference={"objective": "kto"})))
    metrics = [json.loads(line) for line in (run.dir / "metrics.jsonl").read_text().splitlines()]
    assert "kl" in metrics[0] and metrics[-1]["type"] == "eval" and "val_ppl" not in metrics[-1]
    e = run.eval  # a test split of single answers: how tuning's change tells the good from the bad
    assert e["metric"] == "reward_auc" and e["unpaired"]["desirable"] + e["unpaired"]["undesirable"] == 6
    assert 0 <= e["tuned"]["reward_auc"] <= 1 and len(e["tuned"]["ci"]["reward_auc"]) == 2
    assert "reward_auc" in (run.dir / "report.html").read_text()
    # the reference scored each step with the adapters off, frozen weights in bf16 (KTO's KL pass included)
    bf16 = finetune(load_config(_config(tmp_path, tiny_model_dir, "k3", data=data, train={"precision": "bf16"},
                                        preference={"objective": "kto", "reference": "adapter"})), evaluate=False)
    assert bf16.train["steps"] == 6


def test_the_loop_study_ratings_preference_run_and_a_second_study_on_new_prompts(tmp_path, gen_runs):
    """SFT run -> study (base vs SFT) -> ratings -> `tunesmith train` naming the study -> study of SFT vs the
    preference run on prompts the first study did not use."""
    from test_studies import CRITERIA, rate_all
    from tunesmith import studies
    from tunesmith.cli import main
    from tunesmith.studies.create import Criterion

    sft = gen_runs["one"]
    first = studies.create_study([sft], tmp_path / "first", base=True, examples=5, ratings_per_pair=1, raters=["ann"],
                                 criteria=[Criterion(c, c) for c in CRITERIA])
    items = [json.loads(line) for line in (first / "items.jsonl").read_text().splitlines()]
    for it in items:  # the tiny base model says nothing; a pair with an empty answer is not exported (tested below)
        it["outputs"]["base"] = f"no idea {it['id']}" if it["id"] else ""
    (first / "items.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
    good, bad = {c: 5 for c in CRITERIA}, {c: 1 for c in CRITERIA}
    rate_all(first, ["ann"], lambda rater, item, left, right: (good, bad, "left") if left == sft.name else
             (bad, good, "right"))
    cfg = {"name": "sft-dpo", "model": str(sft), "task": "preference", "method": "lora",
           "output_dir": str(tmp_path / "runs"),
           "data": {"train": str(first), "validation_size": 1, "prepare": {"test_size": 1}},
           "lora": {"r": 4, "alpha": 8}, "preference": {"length_examples": 1},
           "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-2, "precision": "fp32"},
           "eval": {"max_new_tokens": 4, "latency_examples": 0, "general": "none", "bootstrap_resamples": 100}}
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(cfg))
    assert not main(["train", str(tmp_path / "dpo.yaml")])
    exported = [json.loads(line) for line in (first / "preferences.jsonl").read_text().splitlines()]
    assert len(exported) == 4 and all(r["chosen_system"] == sft.name for r in exported)  # item 0's base said nothing
    run = tmp_path / "runs" / "sft-dpo"
    assert not main(["study", "export", str(first), "--format", "unpaired"])  # single scores, for KTO
    scored = [json.loads(line) for line in (first / "unpaired.jsonl").read_text().splitlines()]
    assert {(r["system"], r["label"]) for r in scored} == {(sft.name, True), ("base", False)} and len(scored) == 9
    assert json.loads((run / "eval.json").read_text())["test_examples"] == 1

    second = studies.create_study([sft, run], tmp_path / "second", examples=8, exclude=[first],
                                  criteria=[Criterion(c, c) for c in CRITERIA])
    made, items = studies.load_study(second)
    used = {it["test_index"] for it in studies.load_study(first)[1]}
    assert set(made["systems"]) == {sft.name, "sft-dpo"} and made["systems"]["sft-dpo"]["answered"]
    assert len(items) == 3 and not used & {it["test_index"] for it in items}  # 8 test prompts, 5 rated before
    assert all(isinstance(it["outputs"]["sft-dpo"], str) for it in items)


def test_prepare_and_estimate_take_a_preference_config(tmp_path, tiny_model_dir):
    from tunesmith.cli import main
    from tunesmith.runs.estimate import estimate

    path = _config(tmp_path, tiny_model_dir, "planned")
    assert not main(["prepare", str(path)])
    report = json.loads((tmp_path / "runs" / "planned" / "data_report.json").read_text())
    assert report["layout"] == "preference" and report["splits"]["test"]["pairs"] == 6
    est = estimate(load_config(path), calibrate_seconds=1)
    assert est["time"]["source"] == "calibration" and est["time"]["tokens_per_s"] > 0
    assert est["tokens_per_epoch"] > 28 * 2 * 20 and est["max_micro"][0] == 8  # both sides of every pair count
