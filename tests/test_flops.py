import pytest
import torch

from tunesmith.config import Config
from tunesmith.training.flops import flops_per_token, matmul_peak
from tunesmith.methods import full, lora


def test_flops_model_full_and_lora(tiny_model):
    cfg = tiny_model.config
    d, layers, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    embed = tiny_model.get_input_embeddings().weight.numel()
    total = sum(p.numel() for p in tiny_model.parameters())
    n_body = total - embed  # tied LM head: the embedding table is counted once
    full.prepare(tiny_model, Config(method="full"))
    assert flops_per_token(tiny_model, 100, 0.1) == pytest.approx(6 * n_body + 12 * layers * d * 100 + 6 * d * vocab * 0.1)
    c = Config(method="lora")
    c.lora.r, c.lora.alpha = 4, 8
    model = lora.prepare(tiny_model, c)
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert flops_per_token(model, 100, 0.1) == pytest.approx(
        4 * n_body + 12 * layers * d * 100 + 4 * d * vocab * 0.1 + 6 * n_lora)


def test_matmul_peak_is_measured():
    peak = matmul_peak("cpu", bf16=False, size=256, seconds=0.05)
    assert 1e8 < peak < 1e14  # a real number of FLOP/s for a CPU, not a constant
    assert torch.get_num_threads() >= 1
