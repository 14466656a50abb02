"""Padding-free packing: no example sees another, and the loss is the unpacked loss."""

import torch

from conftest import examples
from tunesmith.data.render import collate, collate_packed, encode_all, pack
from tunesmith.training.losses import target_loss_sum


def test_best_fit_decreasing_fills_rows():
    lengths = [50, 40, 30, 30, 20, 10, 10, 5]
    rows = pack(lengths, 100)
    assert sorted(i for r in rows for i in r) == list(range(8))
    assert all(sum(lengths[i] for i in r) <= 100 for r in rows)
    assert len(rows) == 2  # 195 tokens fit in two rows of 100


def test_packed_logits_equal_each_example_alone(tiny_model, tokenizer, sst_files):
    data, _ = encode_all(tokenizer, examples(sst_files["train"], "classification",
                                             labels={"0": "negative", "1": "positive"})[:6], 128)
    batch = collate_packed(data, tokenizer.pad_token_id, max_len=512)
    assert batch["input_ids"].shape[0] == 1  # all six in one row
    tiny_model.eval()
    with torch.no_grad():
        packed = tiny_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        at = 0
        (row,) = pack([len(e.input_ids) for e in data], 512)  # the order examples were packed in
        for e in (data[i] for i in row):
            alone = tiny_model(input_ids=torch.tensor([e.input_ids])).logits[0]
            torch.testing.assert_close(packed[at : at + len(e.input_ids)], alone, rtol=1e-4, atol=1e-5)
            at += len(e.input_ids)


def test_packed_loss_and_grads_equal_padded(tiny_model, tokenizer, sst_files):
    data, _ = encode_all(tokenizer, examples(sst_files["train"], "classification",
                                             labels={"0": "negative", "1": "positive"})[:8], 128)
    padded, n1 = target_loss_sum(tiny_model, collate(data, tokenizer.pad_token_id))
    g1 = torch.autograd.grad(padded, tiny_model.model.layers[1].self_attn.q_proj.weight)[0]
    packed, n2 = target_loss_sum(tiny_model, collate_packed(data, tokenizer.pad_token_id, max_len=200))
    g2 = torch.autograd.grad(packed, tiny_model.model.layers[1].self_attn.q_proj.weight)[0]
    assert n1 == n2
    torch.testing.assert_close(packed, padded, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(g2, g1, rtol=1e-3, atol=1e-5)


def test_training_with_packing_matches_padded_training(tokenizer, sst_files, tmp_path):
    from conftest import make_model
    from tunesmith.config import TrainConfig
    from tunesmith.training.loop import train

    data, _ = encode_all(tokenizer, examples(sst_files["train"], "classification",
                                             labels={"0": "negative", "1": "positive"}), 128)
    params = {}
    for packing in (False, True):
        model = make_model(len(tokenizer))
        for p in model.parameters():
            p.requires_grad_(True)
        cfg = TrainConfig(max_steps=3, batch_size=8, lr=1e-2, precision="fp32", packing=packing, max_seq_len=128)
        train(model, data, data[:4], cfg, tmp_path / str(packing), tokenizer.pad_token_id, show_progress=False)
        params[packing] = {n: p.detach().clone() for n, p in model.named_parameters()}
    for n in params[False]:
        torch.testing.assert_close(params[True][n], params[False][n], rtol=1e-3, atol=1e-4, msg=n)
