"""Integration tests on the real embedded model (SmolLM2-135M-Instruct). Slow: about a minute each."""

from pathlib import Path

import pytest
import torch

from tunesmith.config import load_config
from tunesmith.data import encode_all, load_splits
from tunesmith.methods import prepare
from tunesmith.models import load_model
from tunesmith.runs import finetune
from tunesmith.training.loop import train
from tunesmith.training.losses import evaluate_loss

pytestmark = pytest.mark.slow
SST2 = "examples/sst2.yaml"
ROOT = Path(__file__).parents[1]


def test_a_few_lora_steps_on_sst2_lower_the_loss(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config(SST2, ["data.max_train_examples=64", "data.max_validation_examples=32", "train.batch_size=8",
                             "train.max_steps=6", "train.warmup_steps=1", "train.eval_every=100"])
    model, tok = load_model(cfg.model)
    splits = load_splits(cfg, tmp_path / "data", tok)
    train_set, _ = encode_all(tok, splits.train, cfg.train.max_seq_len)
    val_set, _ = encode_all(tok, splits.validation, cfg.train.max_seq_len)
    model = prepare(model, cfg)
    before = evaluate_loss(model, val_set, 16, tok.pad_token_id, bf16=True)
    result = train(model, train_set, val_set, cfg.train, tmp_path, tok.pad_token_id, show_progress=False)
    after = evaluate_loss(model, val_set, 16, tok.pad_token_id, bf16=True)
    assert result.steps == 6
    assert after < before * 0.5, (before, after)  # the label words are learnt within a few steps
    losses = [r["loss"] for r in result.history if r["type"] == "train"]
    assert losses[-1] < losses[0]


def test_finetune_end_to_end_beats_base_on_a_dev_slice(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config(SST2, [f"output_dir={tmp_path}", "data.max_train_examples=256", "data.validation_size=32",
                             "data.max_test_examples=96", "train.max_steps=30", "train.batch_size=8",
                             "train.eval_every=15", "train.warmup_steps=3"])
    run = finetune(cfg)
    base, tuned = run.eval["base"], run.eval["tuned"]
    assert tuned["loss"] < base["loss"]
    assert tuned["accuracy"] > base["accuracy"], (base["accuracy"], tuned["accuracy"])
    assert (run.dir / "adapter" / "adapter_model.safetensors").is_file()
    assert torch.isfinite(torch.tensor(tuned["perplexity"]))


def test_compare_prompt_vs_lora_on_sst2(tmp_path, monkeypatch):
    """`compare` on the real model: 4-shot prompting (TF-IDF nearest shots) scores below LoRA."""
    from tunesmith.runs.compare import compare_methods

    monkeypatch.chdir(ROOT)
    cfg = load_config(SST2, [f"output_dir={tmp_path}", "data.max_train_examples=512", "data.validation_size=32",
                             "data.max_test_examples=200", "train.max_steps=40", "train.batch_size=16",
                             "train.eval_every=20", "train.warmup_steps=4", "prompt.shots=4", "prompt.selection=similar",
                             "eval.bootstrap_resamples=500",
                             # the forgetting and latency columns are checked on a tiny model (test_compare);
                             # here they cost ~2 of the test's 5 minutes
                             "eval.general=none", "eval.latency_examples=0"])
    doc = compare_methods(cfg, ["prompt", "lora"])
    rows = {r["method"]: r for r in doc["methods"]}
    assert rows["prompt"]["value"] < rows["lora"]["value"], (rows["prompt"]["value"], rows["lora"]["value"])
    assert doc["best"] == "lora" and rows["prompt"]["p_vs_best"] < 0.05
    assert rows["lora"]["low"] > rows["lora"]["base_value"]  # tuned beats the base beyond its interval
    assert (tmp_path / "sst2-lora-compare" / "compare.html").is_file()


def test_minilm_encoder_with_a_head_learns_sst2(tmp_path, monkeypatch):
    """The shipped MiniLM (BERT family) with a classification head, fully fine-tuned for a few steps."""
    monkeypatch.chdir(ROOT)
    cfg = load_config("examples/sst2_minilm.yaml", [f"output_dir={tmp_path}", "data.max_train_examples=2048",
                                                     "data.validation_size=64", "data.max_test_examples=200",
                                                     "train.max_steps=60", "train.eval_every=30", "eval.bootstrap_resamples=300"])
    run = finetune(cfg)
    base, tuned = run.eval["base"], run.eval["tuned"]
    assert tuned["accuracy"] > 0.7 and tuned["ci"]["accuracy"][0] > base["accuracy"], (base["accuracy"], tuned["accuracy"])
    assert run.eval["tuned_vs_base"]["accuracy"]["p_value"] < 0.01


def test_generation_stops_at_the_end_of_turn_even_when_eos_differs():
    """With eos <|endoftext|> (as many tokenizers ship) the reply still ends at <|im_end|>: the
    real model answers and stops instead of inventing further turns."""
    from tunesmith.data.formats import Example
    from tunesmith.data.render import chat_format
    from tunesmith.generation.generate import generate

    model, tok = load_model("default")
    tok.eos_token = "<|endoftext|>"
    question = Example([{"role": "user", "content": "What is the capital of France? Answer in one word."},
                        {"role": "assistant", "content": "Paris"}])
    (answer,), tokens = generate(model, tok, [question], max_new_tokens=40, batch_size=1, bf16=False)
    assert tok.convert_tokens_to_ids("<|im_end|>") in chat_format(tok).stop_ids
    assert "Paris" in answer and "user" not in answer.lower() and len(tok(answer)["input_ids"]) < 30, answer


def test_prepare_of_the_demo_config_loads_no_model(tmp_path, monkeypatch):
    """`tunesmith prepare` on the demo config reads the GGUF's tokenizer only: no dequantized copy."""
    from tunesmith.cli import main

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path / "home"))
    assert main(["prepare", SST2, "--set", f"output_dir={tmp_path}", "--set", "data.prepare.dedup=exact"]) == 0
    assert not (tmp_path / "home" / "models").exists()
    assert (tmp_path / "sst2-lora" / "data" / "train.jsonl").is_file()


def test_evaluation_generate_and_serve_answer_alike_on_the_real_model(tmp_path, monkeypatch):
    """The scored answers are the served ones: a LoRA run on alpaca evaluated (eval.json,
    predictions.jsonl), answered by `generate`, and served; greedy, 40 tokens, the same 6 prompts.
    (Before, evaluation generated in bf16 autocast while serve ran fp32: 6 of 10 answers agreed.)"""
    import json

    from openai import OpenAI

    from test_serve import running
    from tunesmith.generation.engine import SamplingParams
    from tunesmith.deploy.generate import generate_file
    from tunesmith.deploy.loading import load_for_serving
    from tunesmith.deploy.server import ServeSettings, create_app

    monkeypatch.chdir(ROOT)
    cfg = load_config("examples/alpaca.yaml", [f"output_dir={tmp_path}", "name=parity", "data.max_train_examples=32",
                                               "data.validation_size=8", "data.max_test_examples=6", "train.max_steps=2",
                                               "train.batch_size=4", "train.eval_every=100", "train.precision=auto",
                                               "eval.max_new_tokens=40", "eval.general=none", "eval.latency_examples=0",
                                               "eval.compare_with_base=false"])
    run = finetune(cfg)
    assert json.loads((run.dir / "eval.json").read_text())["precision"] == "fp32"
    predicted = [json.loads(x)["tuned"] for x in (run.dir / "predictions.jsonl").read_text().splitlines()]
    group = load_for_serving([run.dir])[0]
    test = load_splits(cfg, run.dir / "data", group.tokenizer).test  # the 6 evaluated (max_test_examples)
    asked = [ex.messages[:-1] for ex in test]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in asked))
    out = tmp_path / "out.jsonl"
    generate_file(run.dir, tmp_path / "in.jsonl", out, SamplingParams(max_tokens=40))
    assert [json.loads(x)["response"].strip() for x in out.read_text().splitlines()] == predicted
    with running(create_app([group], ServeSettings())) as srv:
        client = OpenAI(base_url=f"{srv.url}/v1", api_key="unused")
        served = [client.chat.completions.create(model="parity", max_tokens=40, temperature=0, messages=m)
                  .choices[0].message.content.strip() for m in asked]
    assert served == predicted
