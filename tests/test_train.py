import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunesmith.training import losses
from tunesmith.training import loop as train_mod
from tunesmith.config import Config, EarlyStoppingConfig, TrainConfig
from tunesmith.data import collate, encode_all
from conftest import examples
from tunesmith.methods import lora
from tunesmith.training.loop import train
from tunesmith.training.losses import evaluate_loss
from tunesmith.training.losses import target_logprob_per_row, target_loss_sum

LABELS = {"0": "negative", "1": "positive"}


@pytest.fixture
def encoded(tokenizer, sst_files):
    exs = examples(sst_files["train"], "classification",
                                labels=LABELS, system_prompt="Classify the sentiment.")
    data, _ = encode_all(tokenizer, exs, 128)
    return data


def cfg(**kw) -> TrainConfig:
    base = dict(max_steps=1, batch_size=8, grad_accum=1, lr=1e-2, warmup_steps=0, eval_every=100,
                precision="fp32", seed=0)
    base.update(kw)
    return TrainConfig(**base)


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_loss_equals_transformers_loss(tiny_model, tokenizer, encoded):
    batch = collate(encoded[:6], tokenizer.pad_token_id)
    ours, n = target_loss_sum(tiny_model, batch)
    theirs = tiny_model(**batch).loss  # mean over non-ignored shifted labels
    assert n == int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(ours / n, theirs)
    # gradients agree too
    g1 = torch.autograd.grad(ours / n, tiny_model.model.layers[0].mlp.up_proj.weight)[0]
    g2 = torch.autograd.grad(tiny_model(**batch).loss, tiny_model.model.layers[0].mlp.up_proj.weight)[0]
    torch.testing.assert_close(g1, g2)


def test_per_row_logprob_matches_full_logits(tiny_model, tokenizer, encoded):
    batch = collate(encoded[:4], tokenizer.pad_token_id)
    total, count = target_logprob_per_row(tiny_model, batch)
    logp = torch.log_softmax(tiny_model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits[:, :-1], -1)
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    ref = (logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask).sum(1)
    torch.testing.assert_close(total, ref)
    assert count.tolist() == mask.sum(1).tolist()


def test_batch8_accum1_equals_batch2_accum4(tiny_model, tokenizer, encoded, tmp_path):
    a, b = tiny_model, copy.deepcopy(tiny_model)
    for m in (a, b):
        for p in m.parameters():
            p.requires_grad_(True)
    init = params_of(a)
    train(a, encoded, encoded[:4], cfg(batch_size=8, grad_accum=1), tmp_path / "a", tokenizer.pad_token_id, show_progress=False)
    train(b, encoded, encoded[:4], cfg(batch_size=2, grad_accum=4), tmp_path / "b", tokenizer.pad_token_id, show_progress=False)
    pa, pb = params_of(a), params_of(b)
    assert any(not torch.equal(pa[n], init[n]) for n in pa)
    for n in pa:
        torch.testing.assert_close(pa[n], pb[n], msg=n)


def test_token_budget_micro_batches_train_the_same(tiny_model, tokenizer, encoded, tmp_path):
    """Capping tokens per micro-batch splits steps differently but trains exactly the same."""
    a, b = tiny_model, copy.deepcopy(tiny_model)
    for m in (a, b):
        for p in m.parameters():
            p.requires_grad_(True)
    lengths = [len(e.input_ids) for e in encoded]
    budget = 2 * max(lengths)
    train(a, encoded, encoded[:4], cfg(batch_size=8), tmp_path / "a", tokenizer.pad_token_id, show_progress=False)
    train(b, encoded, encoded[:4], cfg(batch_size=8, batch_tokens=budget), tmp_path / "b", tokenizer.pad_token_id,
          show_progress=False)
    pa, pb = params_of(a), params_of(b)
    for n in pa:
        torch.testing.assert_close(pa[n], pb[n], msg=n)
    micro = train_mod.step_batches(lengths, cfg(batch_size=8, batch_tokens=budget), 0, 0)
    assert len(micro) > 1 and sorted(i for mb in micro for i in mb) == sorted(
        train_mod.step_batches(lengths, cfg(batch_size=8), 0, 0)[0])
    for mb in micro:
        assert max(lengths[i] for i in mb) * len(mb) <= budget or len(mb) == 1


def test_token_budget_split_by_hand():
    lengths = [500, 100, 90, 480, 20, 10]
    assert train_mod._token_budget_batches(list(range(6)), lengths, 8, 1024) == [[0, 3], [1, 2, 4, 5]]
    assert train_mod._token_budget_batches(list(range(6)), lengths, 2, 1024) == [[0, 3], [1, 2], [4, 5]]
    assert train_mod._token_budget_batches([0], [5000], 8, 1024) == [[0]]  # too long for the budget: alone


def lora_model(tiny_model, dropout=0.1):
    c = Config(method="lora")
    c.lora.r, c.lora.alpha, c.lora.dropout = 4, 8, dropout
    c.train.precision = "fp32"  # as cfg() trains: the base stays fp32
    return lora.prepare(tiny_model, c)


def test_resume_is_exact(tokenizer, encoded, tmp_path):
    from conftest import make_model

    data = (encoded * 2)[:40]  # 40 examples, batch 4: an epoch is exactly 10 steps
    config = cfg(max_steps=10, batch_size=4, lr=5e-3, warmup_steps=2, eval_every=100)
    straight = lora_model(make_model(len(tokenizer)))  # LoRA dropout on: RNG state must be restored too
    r1 = train(straight, data, data[:4], config, tmp_path / "straight", tokenizer.pad_token_id, show_progress=False)
    assert r1.steps == 10 and r1.best_step == 10

    first = lora_model(make_model(len(tokenizer)))
    r2 = train(first, data, data[:4], config, tmp_path / "resumed", tokenizer.pad_token_id, until_step=5, show_progress=False)
    assert r2.interrupted and r2.steps == 5
    assert (tmp_path / "resumed" / "checkpoints" / "step-5" / "optimizer.pt").is_file()
    second = lora_model(make_model(len(tokenizer)))  # a fresh process would start from the base weights
    r3 = train(second, data, data[:4], config, tmp_path / "resumed", tokenizer.pad_token_id, resume=True, show_progress=False)
    assert r3.steps == 10 and not r3.interrupted
    p1, p3 = params_of(straight), params_of(second)
    assert p1.keys() == p3.keys()
    for n in p1:
        assert torch.equal(p1[n], p3[n]), n
    # the metrics log has each step once, with identical losses
    l1 = [r["loss"] for r in r1.history if r["type"] == "train"]
    l3 = [r["loss"] for r in r3.history if r["type"] == "train"]
    assert l1 == l3 and len(l3) == 10


def test_ctrl_c_leaves_a_resumable_checkpoint(tiny_model, tokenizer, encoded, tmp_path, monkeypatch):
    model = lora_model(tiny_model)
    calls = {"n": 0}
    real = losses.target_loss_sum

    def flaky(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(losses, "target_loss_sum", flaky)
    r = train(model, encoded, encoded[:4], cfg(max_steps=6, batch_size=4), tmp_path, tokenizer.pad_token_id, show_progress=False)
    assert r.interrupted and r.steps == 3
    state = json.loads((tmp_path / "checkpoints" / "step-3" / "state.json").read_text())
    assert state["step"] == 3


def test_early_stopping_restores_best(tiny_model, tokenizer, encoded, tmp_path, monkeypatch):
    model = lora_model(tiny_model, dropout=0.0)
    curve = iter([1.0, 0.8, 0.85, 0.9, 0.7, 0.6])  # best at the 2nd evaluation, then 2 worse ones
    monkeypatch.setattr(losses, "evaluate_loss", lambda *a, **k: next(curve))
    config = cfg(max_steps=12, batch_size=4, eval_every=2, early_stopping=EarlyStoppingConfig(patience=2, min_delta=0.01))
    r = train(model, encoded, encoded[:4], config, tmp_path, tokenizer.pad_token_id, show_progress=False)
    assert r.stopped_early and r.steps == 8 and r.best_step == 4 and r.best_val_loss == 0.8
    best = load_file(str(tmp_path / "checkpoints" / "best" / "trainable.safetensors"))
    last = load_file(str(tmp_path / "checkpoints" / "step-8" / "trainable.safetensors"))
    now = params_of(model)
    assert any(not torch.equal(best[n], last[n]) for n in best)
    for n in best:
        assert torch.equal(now[n], best[n])
    evals = [r for r in r.history if r["type"] == "eval"]
    assert [e["step"] for e in evals] == [2, 4, 6, 8] and [e["best"] for e in evals] == [True, True, False, False]


def test_bf16_autocast_trains_like_fp32(tokenizer, encoded, tmp_path):
    from conftest import make_model

    losses = {}
    for precision in ("fp32", "bf16"):
        model = make_model(len(tokenizer))
        for p in model.parameters():
            p.requires_grad_(True)
        config = cfg(max_steps=15, batch_size=8, lr=3e-3, precision=precision)
        train(model, encoded, encoded[:8], config, tmp_path / precision, tokenizer.pad_token_id, show_progress=False)
        losses[precision] = evaluate_loss(model, encoded, 8, tokenizer.pad_token_id, bf16=False)
        assert next(model.parameters()).dtype == torch.float32  # master weights stay fp32
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.03)


def test_checkpoints_are_pruned_and_complete(tiny_model, tokenizer, encoded, tmp_path):
    model = lora_model(tiny_model)
    train(model, encoded, encoded[:4], cfg(max_steps=6, batch_size=4, save_every=1, keep_checkpoints=2),
          tmp_path, tokenizer.pad_token_id, show_progress=False)
    steps = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert steps == ["best", "step-5", "step-6"]
    for name in ("trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json"):
        assert (tmp_path / "checkpoints" / "step-6" / name).is_file()
    assert not list(Path(tmp_path / "checkpoints").glob(".*tmp"))


@pytest.mark.parametrize("group", [True, False])
def test_epoch_plan_covers_every_example_once(group):
    lengths = [(i * 37) % 101 + 5 for i in range(1000)]
    config = cfg(batch_size=4, grad_accum=2, group_by_length=group)
    steps = [train_mod.step_batches(lengths, config, epoch=0, pos=p) for p in range(125)]
    seen = [i for step in steps for mb in step for i in mb]
    assert sorted(seen) == list(range(1000))
    assert steps == [train_mod.step_batches(lengths, config, epoch=0, pos=p) for p in range(125)]  # deterministic
    assert steps[0] != train_mod.step_batches(lengths, config, epoch=1, pos=0)
    spread = sum(max(lengths[i] for mb in s for i in mb) - min(lengths[i] for mb in s for i in mb) for s in steps) / len(steps)
    if group:  # examples of similar length share a step
        assert spread < 10
    else:
        assert spread > 50


@pytest.mark.parametrize("chunk", [3, 512])
def test_fused_head_loss_and_every_gradient_equal_full_logits(tiny_model, tokenizer, encoded, chunk):
    """The fused LM head + cross-entropy (gradients made in forward, chunk by chunk) against the
    plain full-logits loss: same loss and the same gradient for every parameter, the tied
    embedding / LM head included."""
    for p in tiny_model.parameters():
        p.requires_grad_(True)
    batch = collate(encoded[:6], tokenizer.pad_token_id)
    ours, n = target_loss_sum(tiny_model, batch, chunk=chunk)
    ours = ours / n
    theirs = tiny_model(**batch).loss
    torch.testing.assert_close(ours, theirs)
    params = [p for p in tiny_model.parameters()]
    g_ours = torch.autograd.grad(ours, params)
    g_theirs = torch.autograd.grad(tiny_model(**batch).loss, params)
    for (name, _), a, b in zip(tiny_model.named_parameters(), g_ours, g_theirs):
        torch.testing.assert_close(a, b, msg=name)


def test_fused_head_under_bf16_autocast_matches_the_unfused_path(tiny_model, tokenizer, encoded):
    for p in tiny_model.parameters():
        p.requires_grad_(True)
    batch = collate(encoded[:6], tokenizer.pad_token_id)
    params = list(tiny_model.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, n = target_loss_sum(tiny_model, batch)
        nll, _ = losses.target_nll(tiny_model, batch)  # plain autograd through chunked logits
    g_fused = torch.autograd.grad(fused / n, params)
    g_plain = torch.autograd.grad(nll.sum() / n, params)
    torch.testing.assert_close(fused, nll.sum())
    for (name, _), a, b in zip(tiny_model.named_parameters(), g_fused, g_plain):
        err = ((a - b).norm() / b.norm()).item()
        assert err < 1e-2, (name, err)


def test_best_model_is_the_lowest_validation_loss_even_below_min_delta(tiny_model, tokenizer, encoded, tmp_path, monkeypatch):
    """min_delta decides patience only: a lower loss that is not lower by min_delta is still the best."""
    model = lora_model(tiny_model, dropout=0.0)
    curve = iter([1.0, 0.995, 0.991, 0.998])
    monkeypatch.setattr(losses, "evaluate_loss", lambda *a, **k: next(curve))
    config = cfg(max_steps=12, batch_size=4, eval_every=2, early_stopping=EarlyStoppingConfig(patience=3, min_delta=0.01))
    r = train(model, encoded, encoded[:4], config, tmp_path, tokenizer.pad_token_id, show_progress=False)
    # patience counts from 1.0 (the last evaluation better by min_delta): 0.995, 0.991, 0.998 are three misses
    assert r.stopped_early and r.steps == 8
    assert r.best_step == 6 and r.best_val_loss == 0.991
    evals = [e for e in r.history if e["type"] == "eval"]
    assert [e["best"] for e in evals] == [True, True, True, False]
    best = load_file(str(tmp_path / "checkpoints" / "best" / "trainable.safetensors"))
    now = params_of(model)
    assert all(torch.equal(now[n], best[n]) for n in best)
    assert json.loads((tmp_path / "checkpoints" / "best" / "state.json").read_text())["step"] == 6


def test_a_nan_training_loss_stops_the_run_before_the_update(tiny_model, tokenizer, encoded, tmp_path, monkeypatch):
    model = lora_model(tiny_model, dropout=0.0)
    real = losses.target_loss_sum
    calls = {"n": 0}

    def poisoned(*args, **kw):
        calls["n"] += 1
        loss, n = real(*args, **kw)
        return (loss * float("nan"), n) if calls["n"] == 3 else (loss, n)

    monkeypatch.setattr(losses, "target_loss_sum", poisoned)
    with pytest.raises(train_mod.NonFiniteLossError) as err:
        train(model, encoded, encoded[:4], cfg(max_steps=6, batch_size=4, save_every=1), tmp_path,
              tokenizer.pad_token_id, show_progress=False)
    msg = str(err.value)
    assert "step 3: the training loss is nan" in msg and "train.lr=0.01" in msg and "train.precision=fp32" in msg
    assert str(tmp_path / "checkpoints" / "step-2") in msg
    assert all(torch.isfinite(p).all() for p in params_of(model).values())  # the NaN step never updated the weights
    assert not (tmp_path / "checkpoints" / "step-3").exists()


def test_an_infinite_gradient_norm_stops_the_run(tiny_model, tokenizer, encoded, tmp_path, monkeypatch):
    model = lora_model(tiny_model, dropout=0.0)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: torch.tensor(float("inf")))
    with pytest.raises(train_mod.NonFiniteLossError, match="step 1: the training loss is .*gradient norm inf.*no checkpoint"):
        train(model, encoded, encoded[:4], cfg(max_steps=3, batch_size=4), tmp_path, tokenizer.pad_token_id,
              show_progress=False)


def test_a_nan_validation_loss_is_never_best(tiny_model, tokenizer, encoded, tmp_path, monkeypatch):
    model = lora_model(tiny_model, dropout=0.0)
    curve = iter([0.9, float("nan")])
    monkeypatch.setattr(losses, "evaluate_loss", lambda *a, **k: next(curve))
    with pytest.raises(train_mod.NonFiniteLossError, match="step 4: the validation loss is nan"):
        train(model, encoded, encoded[:4], cfg(max_steps=6, batch_size=4, eval_every=2), tmp_path,
              tokenizer.pad_token_id, show_progress=False)
    assert json.loads((tmp_path / "checkpoints" / "best" / "state.json").read_text()) == {"step": 2, "val_loss": 0.9}


def test_gradient_checkpointing_gives_the_same_gradients(tokenizer, encoded, tmp_path):
    from conftest import make_model

    results = {}
    for on in (False, True):
        model = lora_model(make_model(len(tokenizer)), dropout=0.0)
        train(model, encoded, encoded[:4], cfg(max_steps=3, batch_size=4, gradient_checkpointing=on),
              tmp_path / str(on), tokenizer.pad_token_id, show_progress=False)
        results[on] = params_of(model)
        assert model.get_base_model().is_activation_checkpointing == on
    for n in results[False]:
        torch.testing.assert_close(results[True][n], results[False][n], rtol=1e-5, atol=1e-6)


def test_out_of_memory_names_the_settings_that_fit(tiny_model, tokenizer, encoded, tmp_path, monkeypatch):
    model = lora_model(tiny_model)

    def too_big(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(losses, "target_loss_sum", too_big)
    with pytest.raises(train_mod.OutOfMemoryError) as e:
        train(model, encoded, encoded[:4], cfg(max_steps=3, batch_size=8, grad_accum=2), tmp_path, tokenizer.pad_token_id,
              show_progress=False)
    msg = str(e.value)
    assert msg.startswith("step 1 did not fit in memory (micro-batch of 8 examples, the longest ")
    assert "Tried to allocate 20.00 GiB" in msg
    assert "--set train.batch_size=4 --set train.grad_accum=4 (the same 16 examples per step" in msg
    assert "train.batch_tokens=" in msg and "train.gradient_checkpointing=true" in msg and "Start again" in msg
