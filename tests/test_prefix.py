"""Shared-prefix passes (training.prefix): the common start of a batch runs once, with the loss,
its gradients and label scores of running every row whole."""

import peft
import pytest
import torch

from conftest import examples, make_model
from tunesmith.data.render import IGNORE, collate, encode_all
from tunesmith.training import losses, prefix
from tunesmith.training.losses import target_loss_sum
from tunesmith.training.prefix import can_share, shared_length

LABELS = {"0": "negative", "1": "positive"}


def _batch(tokenizer, sst_files, n=8, system="Classify the sentiment of the movie review as positive or negative."):
    rows = examples(sst_files["train"], "classification", labels=LABELS)[:n]
    for ex in rows:
        ex.messages.insert(0, {"role": "system", "content": system})
    data, _ = encode_all(tokenizer, rows, 128)
    return collate(data, tokenizer.pad_token_id)


def test_shared_length_stops_at_difference_targets_and_row_end():
    ids = torch.tensor([[5, 6, 7, 8, 9, 1], [5, 6, 7, 8, 2, 3], [5, 6, 7, 8, 9, 4]])
    prefix.MIN_SAVED_POSITIONS, saved = 1, prefix.MIN_SAVED_POSITIONS
    try:
        assert shared_length(ids) == 4  # tokens 0..3 identical in every row
        labels = torch.full_like(ids, IGNORE)
        labels[1, 3] = 8  # token 3 is a target: position 2 predicts it and must run in the second pass
        assert shared_length(ids, labels) == 2
        assert shared_length(ids[:, :1]) == 0  # nothing left for a second pass
        assert shared_length(ids, most=1) == 1
        assert shared_length(ids[:1]) == 0  # one row: nothing to share
        assert shared_length(torch.tensor([[5, 6], [7, 6]])) == 0  # first token differs
    finally:
        prefix.MIN_SAVED_POSITIONS = saved
    assert shared_length(ids) == 0  # 2 rows x 4 tokens saved: below the threshold, not worth a second call


def test_demo_shaped_batch_is_shared(tokenizer, sst_files):
    batch = _batch(tokenizer, sst_files)
    p = shared_length(batch["input_ids"], batch["labels"])
    first_target = int((batch["labels"] != IGNORE).any(0).nonzero()[0])
    assert 10 < p < first_target  # the system prompt and the chat markup, not the reviews


@pytest.mark.parametrize("lora", [False, True])
def test_shared_prefix_loss_and_gradients_equal_whole_rows(tokenizer, sst_files, monkeypatch, lora):
    """Golden: the summed loss and the gradient of every trainable weight with the shared start run
    once equal those of running each row whole (right-padded rows of different lengths)."""
    batch = _batch(tokenizer, sst_files)
    model = make_model(len(tokenizer))
    if lora:
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    else:
        model.requires_grad_(True)
    model.train()
    assert can_share(model, model.get_decoder() if not lora else model.base_model.model.get_decoder())
    calls = []
    real = prefix.decode_shared
    monkeypatch.setattr(losses, "decode_shared", lambda *a, **k: calls.append(a[2]) or real(*a, **k))

    def run():
        model.zero_grad(set_to_none=True)
        loss, n = target_loss_sum(model, batch)
        loss.backward()
        return loss.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}

    shared = run()
    assert calls and calls[0] > 10  # the shared path ran
    monkeypatch.setattr(losses, "shared_length", lambda *a, **k: 0)
    whole = run()
    assert len(calls) == 1
    assert shared[1] == whole[1]
    torch.testing.assert_close(shared[0], whole[0], rtol=1e-5, atol=1e-5)
    assert shared[2].keys() == whole[2].keys() and shared[2]
    for k in whole[2]:
        torch.testing.assert_close(shared[2][k], whole[2][k], rtol=1e-4, atol=1e-6, msg=k)


def test_not_shared_with_dropout_in_training_or_activation_checkpointing(tokenizer):
    model = make_model(len(tokenizer), attention_dropout=0.1)
    model.train()
    assert not can_share(model, model.get_decoder())  # rows would share one dropout mask
    model.eval()
    assert can_share(model, model.get_decoder())  # no dropout at evaluation
    lora = peft.get_peft_model(make_model(len(tokenizer)), peft.LoraConfig(r=4, lora_dropout=0.1, target_modules="all-linear"))
    lora.train()
    assert not can_share(lora, lora.base_model.model.get_decoder())
    plain = make_model(len(tokenizer))
    plain.gradient_checkpointing_enable()
    plain.train()
    assert not can_share(plain, plain.get_decoder())


def test_sliding_window_caches_are_not_shared(tokenizer):
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=8)
    model = MistralForCausalLM(cfg).eval()
    assert not can_share(model, model.get_decoder())


def test_label_scoring_with_shared_system_prompt_equals_whole_candidates(tokenizer, sst_files, monkeypatch):
    """Golden: label scores with the prompts' common start run once equal scoring each whole
    (prompt, label) sequence, and the shared path is what ran."""
    from tunesmith.data import Example, encode
    from tunesmith.evaluation import scoring
    from tunesmith.training.losses import target_logprob_per_row

    model = make_model(len(tokenizer)).eval()
    system = {"role": "system", "content": "Classify the sentiment of the movie review as positive or negative."}
    texts = [line.split(" ", 1)[1] for line in sst_files["test"].read_text().splitlines()]
    cands = [[encode(tokenizer, Example([system, {"role": "user", "content": t}, {"role": "assistant", "content": w}]),
                     256, last_turn_only=True) for w in LABELS.values()] for t in texts]
    calls = []
    real = prefix.decode_shared
    monkeypatch.setattr(scoring, "decode_shared", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    scores, counts, _ = scoring.score_candidates(model, cands, tokenizer.pad_token_id, 6, False)
    assert calls and calls[0] > 10
    flat = [c for cs in cands for c in cs]
    monkeypatch.setattr(losses, "shared_length", lambda *a, **k: 0)  # the reference runs every row whole
    with torch.no_grad():
        want, n = target_logprob_per_row(model, collate(flat, tokenizer.pad_token_id))
    assert torch.equal(counts.reshape(-1), n)
    torch.testing.assert_close(scores.reshape(-1), want, rtol=1e-4, atol=1e-4)


def test_training_records_what_the_shared_start_saved_and_mfu_counts_only_work_done(tokenizer, sst_files, tmp_path,
                                                                                       monkeypatch):
    """A newcomer saw "MFU 112%": the FLOPs of positions a shared pass never ran were counted as work.
    Each step's record gives the positions saved, (B - 1)·p per micro-batch, and its MFU leaves them out."""
    from tunesmith import methods
    from tunesmith.config import Config, TrainConfig
    from tunesmith.training.loop import train

    rows = examples(sst_files["train"], "classification", labels=LABELS,
                    system_prompt="Classify the sentiment of the movie review as positive or negative.")[:16]
    data, _ = encode_all(tokenizer, rows, 128)
    c = Config(method="lora")
    c.lora.r, c.lora.alpha, c.lora.dropout = 4, 8, 0.0
    torch.manual_seed(0)
    model = methods.prepare(make_model(len(tokenizer)), c)
    expected = []
    real = prefix.decode_shared
    monkeypatch.setattr(losses, "decode_shared", lambda d, ids, p, *a, **k: (
        expected.append((ids.shape[0] - 1) * p) if torch.is_grad_enabled() else None) or real(d, ids, p, *a, **k))
    cfg = TrainConfig(max_steps=2, batch_size=8, lr=1e-3, warmup_steps=0, eval_every=100, precision="fp32", seed=0)
    result = train(model, data, data[:4], cfg, tmp_path / "run", tokenizer.pad_token_id, show_progress=False)
    steps = [r for r in result.history if r["type"] == "train"]
    assert [r["shared_positions"] for r in steps] == expected and all(n > 0 for n in expected)
    for r in steps:  # MFU = model FLOPs of the positions really run, per second, over the peak
        done = 1 - r["shared_positions"] / r["tokens"]
        assert 0 < done < 1 and r["mfu"] > 0
    assert prefix.take_saved() == 0  # nothing left over for the next run (validation passes are not counted)
