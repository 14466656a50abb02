"""The prompt method, free-answer classification, and `tunesmith compare` end to end on a tiny model."""

import json

import pytest
import yaml

from tunesmith.cli import main
from tunesmith.data.formats import Example
from tunesmith.evaluation.evaluate import INVALID, evaluate_model, parse_label
from tunesmith.methods import prompt

from test_cli import write_config

LABELS = {"0": "negative", "1": "positive"}


def ex(user, answer=None, system="Classify."):
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    return Example(msgs + ([{"role": "assistant", "content": answer}] if answer else []), label=answer)


TRAIN = [ex("the plot of this film was dreadful and boring", "negative"), ex("a wonderful warm charming story", "positive"),
         ex("cats sit on mats all day", "positive"), ex("an utterly dull mess", "negative")]


def test_random_shots_are_the_same_for_every_question_and_seeded():
    qs = [ex("q one"), ex("q two")]
    shots = prompt.choose_shots(TRAIN, qs, 2, "random", seed=0)
    assert shots[0] == shots[1] and len(shots[0]) == 2
    assert prompt.choose_shots(TRAIN, qs, 2, "random", seed=0) == shots
    assert prompt.choose_shots(TRAIN, qs, 0, "random", seed=0) == [[], []]
    assert len(prompt.choose_shots(TRAIN, qs, 10, "random", seed=0)[0]) == len(TRAIN)  # k capped by the pool


def test_similar_shots_are_nearest_by_tfidf_most_similar_last():
    q = ex("a boring dreadful plot")
    shots = prompt.choose_shots(TRAIN, [q, ex("my cats like mats")], 2, "similar", seed=0)
    assert shots[0][-1] is TRAIN[0]  # shares "plot", "dreadful", "boring"
    assert shots[1][-1] is TRAIN[2]


def test_with_shots_puts_shots_between_system_prompt_and_question():
    q = ex("the question", "positive")
    out = prompt.with_shots(q, TRAIN[:2])
    roles = [m["role"] for m in out.messages]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    assert out.messages[1]["content"] == TRAIN[0].messages[1]["content"] and out.messages[-2]["content"] == "the question"
    assert out.label == "positive"


@pytest.mark.parametrize("answer,label", [("Positive.", "1"), ("I think it is negative", "0"), ("negative!", "0"),
                                          ("positive or negative", INVALID), ("no idea", INVALID), ("", INVALID),
                                          ("nonnegative", INVALID)])
def test_parse_label(answer, label):
    assert parse_label(answer, LABELS) == label


def test_free_answer_classification_reports_invalid_rate(tiny_model, tokenizer):
    questions = [ex("good film", "positive"), ex("bad film", "negative"), ex("fine film", "positive")]
    for q in questions:
        q.label = "1" if q.label == "positive" else "0"
    result = evaluate_model(tiny_model, tokenizer, questions, "classification", LABELS, 64, 2, 4, False,
                            classify_by="generation", resamples=200)
    m = result.metrics
    assert 0 <= m["invalid_rate"] <= 1 and m["accuracy"] <= 1 - m["invalid_rate"] + 1e-9
    assert set(m["ci"]) == {"accuracy", "f1", "loss", "perplexity"} and all(lo <= hi for lo, hi in m["ci"].values())
    assert len(result.predictions) == 3 and set(result.predictions) <= {"0", "1", INVALID}


def test_compare_three_methods_end_to_end(tmp_path, tiny_model_dir, sst_files, capsys):
    path = write_config(tmp_path, tiny_model_dir, sst_files)
    cfg = yaml.safe_load(path.read_text())
    cfg["prompt"] = {"shots": 2, "selection": "similar"}
    cfg["full"] = {"lr": 1e-5}
    path.write_text(yaml.safe_dump(cfg))
    assert main(["compare", str(path), "--methods", "prompt,lora,full", "--set", "eval.bootstrap_resamples=200",
                 "--data-sizes", "3,8,10000"]) == 0
    out = capsys.readouterr().out
    assert "| method | accuracy [95% CI] |" in out and "| prompt |" in out and "| full |" in out
    assert "latency ms (p95)" in out and "data needs" in out and "by training-set size" in out
    assert out.count("reusing the prepared data") == 2 + 6  # lora and full, then six runs on subsets: prepared once
    folder = tmp_path / "runs" / "tiny-compare"
    doc = json.loads((folder / "compare.json").read_text())
    rows = {r["method"]: r for r in doc["methods"]}
    assert set(rows) == {"prompt", "lora", "full"}
    assert rows["prompt"]["trainable_parameters"] == 0 and rows["prompt"]["tokens_per_s"] is None
    assert 0 < rows["lora"]["trainable_parameters"] < rows["full"]["trainable_parameters"]
    assert rows["full"]["artifact_mib"] > rows["lora"]["artifact_mib"] > 0
    for r in rows.values():
        assert r["low"] <= r["value"] <= r["high"] and r["examples_per_s"] > 0
        assert (r["p_vs_best"] is None) == (r["method"] == doc["best"])
        assert 0 < r["latency_ms"] <= r["latency_p95_ms"] and r["inference_tokens_per_s"] > 0
    # the base model is evaluated once, by the first run; the others reuse its results
    evals = {m: json.loads((tmp_path / "runs" / f"tiny-{m}" / "eval.json").read_text()) for m in rows}
    assert "reused_from" not in evals["prompt"]["base"]
    assert evals["lora"]["base"]["reused_from"].endswith("tiny-prompt") and evals["full"]["base"] == evals["lora"]["base"]
    assert evals["lora"]["tuned_vs_base"]["accuracy"]["p_value"] >= 0
    # data needs: every method again on 3 and 8 of the training examples (10,000 is more than there are)
    total = rows["lora"]["train_examples"]
    curve = doc["learning_curve"]
    assert set(curve) == {"prompt", "lora", "full"}
    for method, points in curve.items():
        assert [p["train_examples"] for p in points] == [3, 8, total]
        assert all(0 <= p["p_vs_all_data"] <= 1 for p in points[:-1]) and points[-1]["p_vs_all_data"] is None
        assert rows[method]["data_needs"] in (3, 8, total)
        small = [json.loads(x) for x in (tmp_path / "runs" / f"tiny-{method}-n3" / "data" / "train.jsonl").read_text().splitlines()]
        assert len(small) == total  # the prepared split is shared; the cap is applied when loading
    assert json.loads((tmp_path / "runs" / "tiny-lora-n3" / "data_report.json").read_text())["encoded"]["train"]["kept"] == 3
    assert set(doc["learning_fit"]) == {"prompt", "lora", "full"} and len(doc["learning_fit_words"]) == 3
    for words in doc["learning_fit_words"]:  # three sizes: a saturating curve, in words (or why not)
        assert "doubling the training data" in words or "no learning-curve fit" in words
        assert words in out
    assert rows["lora"]["peak_rss_mib"] > 0 and rows["lora"]["gap"] is not None
    assert doc["verdict"].startswith(f"{doc['best']} scores best")
    def max_lr(method):
        lines = (tmp_path / "runs" / f"tiny-{method}" / "metrics.jsonl").read_text().splitlines()
        return max(json.loads(x).get("lr", 0) for x in lines)
    assert max_lr("full") <= 1e-5 < max_lr("lora")  # full.lr replaces train.lr for full fine-tuning only
    # the same splits for every method
    tests = {m: (tmp_path / "runs" / f"tiny-{m}" / "data" / "test.jsonl").read_text() for m in rows}
    assert len(set(tests.values())) == 1
    html = (folder / "compare.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and "Cost and quality" in html and "Data needs" in html
    assert (folder / "compare.md").read_text().startswith("Methods compared on 6 test examples")
    # --reuse: the nine finished runs are measured again, not rerun; a changed setting reruns that run only
    (tmp_path / "runs" / "tiny-full-n8" / "eval.json").unlink()  # as if the comparison had been interrupted there
    args = ["compare", str(path), "--methods", "prompt,lora,full", "--set", "eval.bootstrap_resamples=200",
            "--data-sizes", "3,8", "--reuse"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("reusing the finished run") == 8 and "full on 8 training examples" in out
    again = json.loads((folder / "compare.json").read_text())
    assert [r["value"] for r in again["methods"]] == [r["value"] for r in doc["methods"]]
    assert again["learning_curve"]["lora"] == doc["learning_curve"]["lora"]


def test_compare_refuses_unknown_methods(tmp_path, tiny_model_dir, sst_files, capsys):
    path = write_config(tmp_path, tiny_model_dir, sst_files)
    assert main(["compare", str(path), "--methods", "lora,qlora"]) == 2
    assert "unknown method(s) ['qlora']" in capsys.readouterr().err


def test_last_turn_only_scores_just_the_answer_and_keeps_it_when_truncating(tokenizer):
    from tunesmith.data import encode

    shot = prompt.with_shots(ex("the question", "positive"), TRAIN[:2])
    every = encode(tokenizer, shot, 512)
    last = encode(tokenizer, shot, 512, last_turn_only=True)
    assert every.input_ids == last.input_ids and 0 < last.n_targets < every.n_targets
    answer = [t for t, y in zip(last.input_ids, last.labels) if y != -100]
    short = encode(tokenizer, shot, len(answer) + 3, last_turn_only=True)  # far too short for the shots
    assert short.truncated and [t for t, y in zip(short.input_ids, short.labels) if y != -100] == answer
    assert short.input_ids == last.input_ids[-len(short.input_ids):]
