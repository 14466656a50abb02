"""The fused LoRA layer against PEFT's own forward: same outputs and gradients, less saved memory."""

import copy

import peft
import pytest
import torch

from tunesmith.data import collate, encode_all
from tunesmith.methods import fused_lora
from tunesmith.training.losses import target_loss_sum
from conftest import examples


def peft_pair(tiny_model):
    """Two identical LoRA models with non-zero adapters: PEFT's forward, and ours."""
    settings = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    torch.manual_seed(0)
    reference = peft.get_peft_model(copy.deepcopy(tiny_model), settings)
    torch.manual_seed(1)
    for name, p in reference.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    fused = copy.deepcopy(reference)
    assert fused_lora.install(fused) == 14  # 7 projections x 2 layers
    return reference, fused


@pytest.fixture
def batch(tokenizer, sst_files):
    exs = examples(sst_files["train"], "classification", labels={"0": "negative", "1": "positive"})
    return collate(encode_all(tokenizer, exs, 128)[0][:4], tokenizer.pad_token_id)


def loss_and_grads(model, batch, bf16=False):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss, n = target_loss_sum(model, batch)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss / n, [p for p in model.parameters() if p.requires_grad])
    return loss.detach(), dict(zip(names, grads))


def test_fused_equals_peft_in_fp32(tiny_model, batch):
    reference, fused = peft_pair(tiny_model)
    with torch.no_grad():
        torch.testing.assert_close(fused(**batch).logits, reference(**batch).logits)
    (l_ref, g_ref), (l_fused, g_fused) = loss_and_grads(reference, batch), loss_and_grads(fused, batch)
    torch.testing.assert_close(l_fused, l_ref)
    assert g_ref.keys() == g_fused.keys() and any("lora_A" in n for n in g_ref)
    for name in g_ref:
        torch.testing.assert_close(g_fused[name], g_ref[name], msg=name)


def test_fused_matches_peft_under_bf16_autocast(tiny_model, batch):
    reference, fused = peft_pair(tiny_model)
    (l_ref, g_ref), (l_fused, g_fused) = loss_and_grads(reference, batch, True), loss_and_grads(fused, batch, True)
    assert abs(l_fused / l_ref - 1) < 5e-3
    for name in g_ref:
        err = ((g_fused[name] - g_ref[name]).norm() / g_ref[name].norm()).item()
        assert err < 2e-2, (name, err)


def test_fused_keeps_less_for_backward(tiny_model, batch):
    """Under autocast PEFT keeps two bf16 copies of each layer's input; ours one per distinct input."""
    def saved_bytes(model):
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            target_loss_sum(model, batch)
        return sum(seen.values())

    reference, fused = peft_pair(tiny_model)
    assert saved_bytes(fused) < 0.9 * saved_bytes(reference)


def test_unusual_cases_take_peft_path(tiny_model, batch):
    reference, fused = peft_pair(tiny_model)
    with torch.no_grad():
        with fused.disable_adapter(), reference.disable_adapter():  # base model only
            torch.testing.assert_close(fused(**batch).logits, reference(**batch).logits)
        base = copy.deepcopy(tiny_model)(**batch).logits
        with fused.disable_adapter():
            torch.testing.assert_close(fused(**batch).logits, base)
        merged = copy.deepcopy(fused).merge_and_unload()(**batch).logits
        torch.testing.assert_close(merged, fused(**batch).logits, rtol=1e-5, atol=1e-5)
    layer = next(m for m in fused.modules() if isinstance(m, peft.tuners.lora.Linear))
    layer.lora_dropout["default"] = torch.nn.Dropout(0.1)
    layer.train()
    assert not fused_lora._plain(layer)  # dropout while training: PEFT's path
    layer.eval()
    assert fused_lora._plain(layer)
