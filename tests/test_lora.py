import copy

import torch

from tunesmith.config import Config, TrainConfig
from tunesmith.data import collate, encode_all
from conftest import examples
from tunesmith.methods import count_parameters, full, lora
from tunesmith.training.loop import train


def test_lora_merged_equals_unmerged_and_differs_from_base(tiny_model, tokenizer, sst_files, tmp_path):
    exs = examples(sst_files["train"], "classification",
                                labels={"0": "negative", "1": "positive"})
    data, _ = encode_all(tokenizer, exs, 128)
    cfg = Config(method="lora")
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = 4, 8, 0.0
    cfg.train.precision = "fp32"
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


def test_frozen_weights_in_bf16_change_nothing_under_autocast(tiny_model, tokenizer, sst_files):
    """Storing the frozen base weights in bf16 gives the same loss and adapter gradients, bit for bit."""
    from tunesmith.training.losses import target_loss_sum

    exs = examples(sst_files["train"], "classification", labels={"0": "negative", "1": "positive"})
    batch = collate(encode_all(tokenizer, exs, 128)[0][:4], tokenizer.pad_token_id)
    cfg = Config(method="lora")
    cfg.train.precision = "fp32"  # prepare leaves the base in fp32
    torch.manual_seed(0)  # the same adapter initialisation on both
    reference = lora.prepare(copy.deepcopy(tiny_model), cfg)
    cfg.train.precision = "bf16"
    torch.manual_seed(0)
    stored_bf16 = lora.prepare(copy.deepcopy(tiny_model), cfg)
    for model in (reference, stored_bf16):  # B starts at zero; make the adapters do something
        torch.manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
    for name, p in stored_bf16.named_parameters():
        expected = torch.float32 if p.requires_grad or "embed" in name or "norm" in name else torch.bfloat16
        assert p.dtype == expected, name
    grads = []
    for model in (reference, stored_bf16):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = target_loss_sum(model, batch)
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        grads[-1]["loss"] = loss.detach()
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 1
    assert any(g.abs().sum() > 0 for n, g in grads[0].items() if "lora_A" in n)
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


def test_lora_target_modules_are_checked_against_the_model(tiny_model):
    import pytest

    from tunesmith.config import ConfigError

    cfg = Config(method="lora")
    cfg.train.precision = "fp32"
    cfg.lora.target_modules = ["q_proj", "v_prj"]  # one typo among valid names: PEFT would ignore it silently
    with pytest.raises(ConfigError) as err:
        lora.prepare(copy.deepcopy(tiny_model), cfg)
    assert len(err.value.problems) == 1
    assert "'v_prj' matches no layer of the model; did you mean 'v_proj'?" in str(err.value)
    assert "valid names: down_proj, embed_tokens, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj" in str(err.value)
    cfg.lora.target_modules = ["query", "value"]  # a wholly wrong list (BERT names on a Llama): every name listed
    with pytest.raises(ConfigError) as err:
        lora.prepare(copy.deepcopy(tiny_model), cfg)
    assert len(err.value.problems) == 2
    cfg.lora.target_modules = r".*\.attn\.q"  # a regular expression matching nothing
    with pytest.raises(ConfigError, match="matches no layer's full name"):
        lora.prepare(copy.deepcopy(tiny_model), cfg)
    cfg.lora.target_modules = ["self_attn.q_proj", "mlp.down_proj"]  # dotted suffixes are valid, as in PEFT
    model = lora.prepare(copy.deepcopy(tiny_model), cfg)
    assert {n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")} == {"q_proj", "down_proj"}
    cfg.lora.target_modules = r".*\.(q|v)_proj"
    model = lora.prepare(copy.deepcopy(tiny_model), cfg)
    assert {n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")} == {"q_proj", "v_proj"}
