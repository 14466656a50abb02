"""Inference cost (tokens, latency), base-model reuse between runs, data needs and the verdict's words."""

import json
import math

import pytest
import torch

from tunesmith.runs.compare import MethodResult, summarize, verdict
from tunesmith.config import load_config
from tunesmith.data import encode
from tunesmith.data.formats import Example
from tunesmith.data.render import collate, encode_prompt, render
from tunesmith.evaluation.evaluate import evaluate_model, latency
from tunesmith.runs import finetune

from test_cli import write_config

LABELS = {"0": "negative", "1": "positive"}


def ex(user, label):
    msgs = [{"role": "system", "content": "Classify."}, {"role": "user", "content": user},
            {"role": "assistant", "content": LABELS[label]}]
    return Example(msgs, label=label)


QUESTIONS = [ex("a funny film", "1"), ex("one long string of cliches", "0"), ex("lazy dog", "0")]


def test_label_scoring_reads_each_prompt_once_and_every_label(tiny_model, tokenizer):
    result = evaluate_model(tiny_model, tokenizer, QUESTIONS, "classification", LABELS, 64, 2, 4, False, resamples=100)
    prompts = [len(encode_prompt(tokenizer, q.messages[:2], 64)) for q in QUESTIONS]
    whole = [[len(encode(tokenizer, Example(q.messages[:2] + [{"role": "assistant", "content": w}]), 64).input_ids)
              for w in LABELS.values()] for q in QUESTIONS]
    # each prompt read once, then each label's own tokens after it
    assert result.tokens == sum(p + sum(n - p for n in ns) for p, ns in zip(prompts, whole))


def test_generation_counts_prompt_reply_and_loss_tokens(tiny_model, tokenizer):
    result = evaluate_model(tiny_model, tokenizer, QUESTIONS, "classification", LABELS, 64, 2, 3, False,
                            classify_by="generation", resamples=100)
    prompts = sum(len(tokenizer(render(tokenizer, q.messages[:2], add_generation_prompt=True), add_special_tokens=False)
                      ["input_ids"]) for q in QUESTIONS)
    losses = sum(len(encode(tokenizer, q, 64).input_ids) for q in QUESTIONS)
    assert prompts + losses + len(QUESTIONS) <= result.tokens <= prompts + losses + 3 * len(QUESTIONS)


def test_latency_times_each_example_alone(tiny_model, tokenizer):
    out = latency(tiny_model, tokenizer, QUESTIONS, "classification", LABELS, 64, 4, False)
    assert out["examples"] == 3 and 0 < out["median_ms"] <= out["p95_ms"]
    assert latency(tiny_model, tokenizer, [], "classification", LABELS, 64, 4, False) == {}


def test_base_results_are_reused_only_under_the_same_settings(tmp_path, tiny_model_dir, sst_files):
    path = write_config(tmp_path, tiny_model_dir, sst_files)
    cfg = load_config(path, ["eval.bootstrap_resamples=200"])
    first = finetune(cfg)
    same = finetune(load_config(path, ["eval.bootstrap_resamples=200", "name=again", "train.lr=1e-3"]), base_from=first.dir)
    assert same.eval["base"]["reused_from"] == str(first.dir)
    fresh = {k: v for k, v in first.eval["base"].items() if k not in ("seconds", "examples_per_s", "tokens_per_s")}
    assert {k: v for k, v in same.eval["base"].items() if k in fresh} == fresh
    assert same.eval["tuned_vs_base"].keys() == first.eval["tuned_vs_base"].keys()
    other = finetune(load_config(path, ["eval.bootstrap_resamples=200", "name=other", "eval.label_scoring=mean"]),
                     base_from=first.dir)
    assert "reused_from" not in other.eval["base"]  # scored differently: the base is evaluated again
    fewer = finetune(load_config(path, ["eval.bootstrap_resamples=200", "name=fewer", "data.max_test_examples=4"]),
                     base_from=first.dir)
    assert "reused_from" not in fewer.eval["base"] and fewer.eval["test_examples"] == 4


def result(tmp_path, name, correct, n=200, train_examples=1000, **kw):
    """A run folder whose predictions are right on the first ``correct`` of ``n`` test examples."""
    folder = tmp_path / name
    folder.mkdir()
    rows = [{"reference": "1", "tuned": "1" if i < correct else "0"} for i in range(n)]
    (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fields = dict(method="lora", run_dir=str(folder), metric="accuracy", value=correct / n, low=0.0, high=1.0,
                  base_value=0.5, trainable_parameters=1, total_parameters=2, train_seconds=200.0, tokens_per_s=1.0,
                  peak_rss_mib=1.0, peak_gpu_mib=None, eval_seconds=1.0, examples_per_s=1.0, inference_tokens_per_s=1.0,
                  latency_ms=40.0, latency_p95_ms=50.0, train_examples=train_examples, artifact_mib=20.0,
                  final_train_loss=0.3, final_val_loss=0.35, gap=0.05)
    return MethodResult(**(fields | kw))


def test_data_needs_is_the_smallest_size_not_significantly_below_all_data(tmp_path):
    full = result(tmp_path, "all", 180)
    curve = [result(tmp_path, "n10", 100, train_examples=10), result(tmp_path, "n100", 176, train_examples=100),
             result(tmp_path, "n300", 179, train_examples=300)]
    doc = summarize([full], "classification", 500, {"lora": curve})
    points = doc["learning_curve"]["lora"]
    assert [p["train_examples"] for p in points] == [10, 100, 300, 1000]
    assert points[0]["p_vs_all_data"] < 0.01 and points[1]["p_vs_all_data"] >= 0.05
    assert doc["methods"][0]["data_needs"] == 100
    assert "Data needs (fewest training examples not significantly below all the data): lora 100." in doc["verdict"]

    worse = [result(tmp_path, "w10", 100, train_examples=10)]
    doc = summarize([result(tmp_path, "all2", 180)], "classification", 500, {"lora": worse})
    assert doc["methods"][0]["data_needs"] == 1000 and "lora 1,000 (all of them)" in doc["verdict"]


@pytest.mark.parametrize("mib,words", [(0.0009, "944 bytes"), (0.02, "20 kB"), (22.1, "22 MB"), (2048.0, "2.0 GB")])
def test_verdict_states_costs_in_plain_units(tmp_path, mib, words):
    best = result(tmp_path, "best", 190, method="lora")
    other = result(tmp_path, "other", 150, method="prompt", train_seconds=0.0, artifact_mib=mib, latency_ms=90.0)
    other.p_vs_best = 0.0001
    text = verdict([best, other], best)
    assert f"prompt: 0.750, significantly lower (paired bootstrap p<0.001); training none vs 3.3 min, {words} vs 20 MB on disk, 90 vs 40 ms per answer." in text
    assert "e-0" not in text


def test_the_same_config_gives_the_same_run_twice_in_one_process(tmp_path, tiny_model_dir, sst_files):
    """LoRA's A matrices start random: they must come from the run's seed, not from whatever the
    process drew before (a compare runs several methods in one process)."""
    from safetensors.torch import load_file

    path = write_config(tmp_path, tiny_model_dir, sst_files)
    runs = [finetune(load_config(path, [f"name={name}", "eval.latency_examples=0", "eval.bootstrap_resamples=100"]))
            for name in ("a", "b")]
    torch.rand(7)  # whatever happens in between
    a, b = (load_file(r.dir / "adapter" / "adapter_model.safetensors") for r in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = [(r.dir / "metrics.jsonl").read_text() for r in runs]
    strip = [[{k: v for k, v in json.loads(x).items() if "second" not in k and "per_s" not in k and k != "mfu"}
              for x in text.splitlines()] for text in lines]
    assert strip[0] == strip[1]


def test_compare_ranks_by_eval_metric_and_lower_perplexity_is_better(tmp_path):
    """With eval.metric: perplexity the best method is the one with the lowest perplexity, and its
    p-values come from the per-example losses recorded in predictions.jsonl."""
    def run(name, nll):
        loss = sum(nll) / (10 * len(nll))
        r = result(tmp_path, name, 0, n=len(nll), method=name, metric="perplexity", value=math.exp(loss), base_value=50.0)
        rows = [{"reference": "t", "tuned": "", "tuned_nll": [x, 10]} for x in nll]
        (tmp_path / name / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return r

    good = run("lora", [20.0 + (i % 3) for i in range(200)])
    worse = run("full", [26.0 + (i % 3) for i in range(200)])
    doc = summarize([worse, good], "text", 300)
    assert doc["best"] == "lora" and doc["metric"] == "perplexity"
    rows = {r["method"]: r for r in doc["methods"]}
    assert rows["full"]["p_vs_best"] < 0.01
    assert "lora scores best on perplexity" in doc["verdict"] and "down from 50.000" in doc["verdict"]
    assert "full: " in doc["verdict"] and "significantly higher" in doc["verdict"]


@pytest.mark.parametrize("lora", [False, True])
def test_scoring_each_prompt_once_equals_scoring_every_whole_candidate(tokenizer, lora):
    """Golden: prompt-once label scoring (evaluation.scoring) gives the summed target log-probability
    and target count of scoring each (prompt, label) sequence whole, for prompts of different
    lengths, labels of different token lengths and more labels than rows, on a plain model and
    with a LoRA adapter (non-zero B) active."""
    from conftest import make_model
    from tunesmith.evaluation.scoring import score_candidates
    from tunesmith.training.losses import target_logprob_per_row

    torch.manual_seed(0)
    model = make_model(len(tokenizer))
    if lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.eval()
    words = {"a": "funny", "b": "one long string of cliches", "c": "lazy dog", "d": "the quick brown fox is funny"}
    prompts = [[{"role": "user", "content": t}] for t in ("a", "one long string of cliches and a lazy dog", "funny film",
                                                           "the quick brown fox " * 5)]
    cands = [[encode(tokenizer, Example(p + [{"role": "assistant", "content": w}]), 256, last_turn_only=True)
              for w in words.values()] for p in prompts]
    scores, counts, tokens = score_candidates(model, cands, tokenizer.pad_token_id, 3, False)
    flat = [c for cs in cands for c in cs]
    with torch.no_grad():
        want, n = target_logprob_per_row(model, collate(flat, tokenizer.pad_token_id))
    assert torch.equal(counts.reshape(-1), n)
    assert torch.allclose(scores.reshape(-1), want, atol=1e-4), (scores.reshape(-1), want)
    assert tokens < sum(len(c.input_ids) for c in flat)  # prompts read once
