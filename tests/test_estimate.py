"""The cost estimate: counts against hand calculation, the memory model against measured memory,
the calibrated time against the run it predicts, and the CLI."""

import dataclasses
import json

import pytest
import torch

from conftest import make_model
from tunesmith import methods
from tunesmith.training import flops
from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.runs import estimate as E


def test_parameter_and_flop_counts_match_hand_calculation(tokenizer):
    model = make_model(len(tokenizer))
    v, d, f, layers, kv = len(tokenizer), 32, 64, 2, 2 * 8  # 4 heads of 8; 2 key/value heads of 8
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * f + 2 * d  # q, o; k, v; gate, up, down; two RMSNorms
    total = v * d + layers * per_layer + d  # tied embedding/head, final norm
    assert sum(p.numel() for p in model.parameters()) == total
    body = total - v * d
    assert flops.flops_per_token(model, 10.0, 0.5) == pytest.approx(6 * body + 12 * layers * d * 10 + 6 * d * v * 0.5)


def _encoded(tokenizer, n, length, targets):
    from tunesmith.data import Encoded

    ids = list(range(3, 3 + length))
    return [Encoded(input_ids=ids, labels=[-100] * (length - targets) + ids[-targets:]) for _ in range(n)]


def test_the_plan_counts_tokens_steps_and_validations(tokenizer, tmp_path):
    from tunesmith.config import Config

    cfg = Config()
    cfg.train = dataclasses.replace(cfg.train, batch_size=4, grad_accum=2, epochs=2, eval_every=3, max_seq_len=64)
    data = _encoded(tokenizer, 10, 20, 5) + _encoded(tokenizer, 6, 30, 5)
    p = E.plan(cfg, data)
    assert p["steps_per_epoch"] == 2 and p["steps"] == 4  # ceil(ceil(16/4)/2) per epoch, two epochs
    assert p["tokens"] == 2 * (10 * 20 + 6 * 30) and p["target_tokens"] == 2 * 16 * 5
    assert p["padded_tokens"] >= p["tokens"] and p["max_micro"] == [4, 30]
    assert E.evaluations(cfg, 4, 2) == 3  # steps 2 (epoch), 3 (eval_every), 4 (epoch and last)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_memory_model_matches_saved_tensors_and_predicts_a_bigger_batch(tokenizer, method):
    """The activation fit comes from three small forwards; it must predict a forward it never saw
    (4 rows of 96 tokens) within 10%, and checkpointing must keep far less."""
    from tunesmith.config import Config

    torch.manual_seed(0)
    cfg = Config(method=method)
    cfg.lora = dataclasses.replace(cfg.lora, r=4, alpha=8)
    model = methods.prepare(make_model(len(tokenizer)), cfg)
    fit = E.activation_model(model, bf16=False, target_share=0.25, checkpointing=False)
    measured = E.saved_bytes(model, 4, 96, False, 0.25)
    assert E.activations(fit, 4, 96) == pytest.approx(measured, rel=0.10)
    ckpt = E.activation_model(model, bf16=False, target_share=0.25, checkpointing=True)
    assert E.activations(ckpt, 4, 96) < 0.5 * E.activations(fit, 4, 96)
    mem = E.memory(model, cfg, (4, 96), False, 0.25, baseline_mib=100.0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert mem["gradients"] == pytest.approx(trainable * 4 / 2**20) and mem["optimizer"] == pytest.approx(2 * mem["gradients"])
    assert mem["peak"] == pytest.approx(100 + mem["weights"] + mem["gradients"] + mem["optimizer"] + mem["activations"])


def test_advice_names_settings_that_fit(tokenizer):
    from tunesmith.config import Config

    cfg = Config(method="full")
    mem = {"baseline": 100.0, "weights": 100.0, "gradients": 100.0, "optimizer": 200.0, "activations": 800.0,
           "activations_checkpointed": 50.0, "peak": 1300.0, "peak_checkpointed": 550.0, "chosen": "peak",
           "fits": {"plain": {"a": 0.0, "b": 0.0, "c": 0.0}}, "max_micro_batch": [8, 100]}
    mem["fits"]["plain"]["a"] = 800 * 2**20 / (8 * 100)  # 800 MiB for 8 rows of 100
    tips = E.advice(mem, cfg, limit_mib=700.0)
    assert any("gradient_checkpointing=true" in t for t in tips)
    assert any("batch_size=2 train.grad_accum=4" in t for t in tips)  # 8 -> 2 rows: 500 + 200 MiB
    assert not any("method=lora" in t for t in tips)  # 1,000 MiB without gradients and optimizer: still too much
    assert any("method=lora" in t and "1,000 MiB" in t for t in E.advice(mem, cfg, limit_mib=1100.0))
    assert E.advice(mem, cfg, limit_mib=2000.0) == []
    assert "none of" in E.advice(mem, cfg, limit_mib=400.0)[0]  # nothing alone fits: said so, not a list of misfits


def test_estimate_then_train_records_predicted_against_actual(tmp_path, tiny_model_dir, sst_files, capsys):
    from test_cli import write_config

    path = write_config(tmp_path, tiny_model_dir, sst_files, max_steps=12, eval_every=6)
    assert main(["estimate", str(path), "--calibrate-seconds", "1", "--price-per-hour", "2.5"]) == 0
    out = capsys.readouterr().out
    assert "GFLOP per token" in out and "peak memory" in out and "tokens/s" in out and "cost:" in out
    cfg = load_config(path)
    saved = json.loads((cfg.run_dir / "estimate.json").read_text())
    assert saved["steps"] == 12 and saved["time"]["source"] == "calibration" and saved["time"]["steps_timed"] >= 3
    assert saved["cost"]["cost"] == pytest.approx(saved["time"]["seconds"] / 3600 * 2.5)
    assert main(["train", str(path)]) == 0
    out = capsys.readouterr().out
    assert "estimate vs actual" in out.replace("\n", " ")
    got = json.loads((cfg.run_dir / "train_result.json").read_text())["estimate"]
    assert got["predicted_seconds"] == pytest.approx(saved["time"]["seconds"]) and got["actual_seconds"] > 0
    assert got["actual_peak_mib"] > 0 and abs(got["error_peak_mib"]) < 0.5
    assert "estimate.predicted_seconds" in (cfg.run_dir / "report.html").read_text()
    # a device's throughput and memory instead of this machine's: a prediction for that device, not for a run here
    assert main(["estimate", str(path), "--device-tflops", "100", "--device-memory-gib", "0.001", "--json"]) == 0
    out = capsys.readouterr().out
    doc = json.loads(out[out.index("{"):] if out.startswith("{") else out[out.index("\n{") + 1:])
    assert doc["time"]["source"] == "device 100 TFLOP/s" and doc["time"]["tokens_per_s"] == pytest.approx(1e14 / doc["flops_per_token"])
    assert doc["machine_memory_mib"] == pytest.approx(1.024) and doc["advice"]
    assert main(["train", str(path), "--overwrite"]) == 0
    out = capsys.readouterr().out.replace("\n", " ")
    assert "time: not predicted" in out and (cfg.run_dir / "estimate.json").is_file()  # kept by --overwrite, not used
    assert "predicted_seconds" not in json.loads((cfg.run_dir / "train_result.json").read_text())["estimate"]


def test_estimate_vs_actual_says_which_way_it_was_off():
    """(predicted - actual) / actual printed bare as "-45%" read either way (a newcomer's finding)."""
    from tunesmith.runs.folder import _off

    assert _off(-0.45) == "the prediction was 45% low: actual 1.8x it"
    assert _off(0.3) == "the prediction was 30% high"
    assert _off(-0.1) == "the prediction was 10% low" and _off(0.001) == "as predicted"
