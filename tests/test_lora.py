import copy

import torch

from tunesmith.config import Config, TrainConfig
from tunesmith.data import collate, encode_all
from conftest import examples
from tunesmith.methods import count_parameters, full, lora
from tunesmith.train import train


def test_lora_merged_equals_unmerged_and_differs_from_base(tiny_model, tokenizer, sst_files, tmp_path):
    exs = examples(sst_files["train"], "classification",
                                labels={"0": "negative", "1": "positive"})
    data, _ = encode_all(tokenizer, exs, 128)
    cfg = Config(method="lora")
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = 4, 8, 0.0
    model = lora.prepare(tiny_model, cfg)
    trainable, total = count_parameters(model)
    assert 0 < trainable < total
    # all-linear: every attention and MLP projection has an adapter, the LM head does not
    names = {n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    train(model, data, data[:4], TrainConfig(max_steps=1, batch_size=8, lr=1e-2, precision="fp32"),
          tmp_path, tokenizer.pad_token_id, show_progress=False)  # one step: B is no longer zero
    batch = collate(data[:4], tokenizer.pad_token_id)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    model.eval()
    with torch.no_grad():
        unmerged = model(**inputs).logits
        with model.disable_adapter():
            base = model(**inputs).logits
        merged = copy.deepcopy(model).merge_and_unload()(**inputs).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    assert (unmerged - base).abs().max() > 1e-4


def test_full_makes_everything_trainable(tiny_model):
    for p in tiny_model.parameters():
        p.requires_grad_(False)
    model = full.prepare(tiny_model, Config(method="full"))
    trainable, total = count_parameters(model)
    assert trainable == total
