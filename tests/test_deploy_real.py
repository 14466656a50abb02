"""Deploying a run of the real embedded model (SmolLM2-135M-Instruct): exports verified in their
consumers, and batch generation that stops at the end of the assistant's turn. Slow: one short
LoRA run (a few steps) shared by the tests of this module."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunesmith.config import load_config
from tunesmith.generation.engine import SamplingParams
from tunesmith.deploy.export import TOLERANCE, export
from tunesmith.deploy.generate import generate_file
from tunesmith.runs import finetune

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def alpaca_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("deploy-real")
    cfg = load_config(ROOT / "examples" / "alpaca.yaml", [
        f"output_dir={out}", "name=alpaca-deploy", "data.max_train_examples=48", "data.validation_size=8",
        "data.prepare.test_size=6", "train.max_steps=4", "train.batch_size=4", "train.eval_every=100",
        "train.warmup_steps=1", "train.max_seq_len=256", "eval.max_new_tokens=16", "eval.latency_examples=0",
        "eval.compare_with_base=false"])
    return finetune(cfg).dir


@pytest.mark.parametrize("fmt,dtype", [("adapter", "f32"), ("hf", "f32"), ("hf", "bf16")])
def test_exports_of_a_real_run_agree_with_the_tuned_model(alpaca_run, tmp_path, fmt, dtype):
    result = export(alpaca_run, fmt, dtype, out=tmp_path / f"{fmt}-{dtype}", verify=True)
    v = result.verify
    assert v["relative_diff"] <= TOLERANCE[dtype] and v["argmax_agree"] == v["prompts"] >= 3, v
    print(fmt, dtype, json.dumps(v))  # the measured difference, for the README's tolerance table


def test_batch_generation_stops_at_the_end_of_turn(alpaca_run, tmp_path):
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"instruction": q}) + "\n" for q in
                                               ("Name a primary colour.", "What is 2 + 2?", "Say hi in French.")))
    out = tmp_path / "out.jsonl"
    done = generate_file(alpaca_run, tmp_path / "in.jsonl", out, SamplingParams(max_tokens=96))
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert done["generated"] == 3 and all(r["response"].strip() for r in rows)
    assert sum(r["finish_reason"] == "stop" for r in rows) >= 2, rows  # short questions end on <|im_end|>
    assert not any("<|im_end|>" in r["response"] or "<|im_start|>" in r["response"] for r in rows)
