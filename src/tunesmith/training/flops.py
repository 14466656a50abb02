"""FLOPs per trained token and the machine's measured matmul peak, for MFU.

FLOPs model (per real token, T = mean sequence length, L layers, width d, N_body = the
decoder's parameters without the embedding table, f = share of tokens that are targets):

    full fine-tuning:  6 * N_body + 12 * L * d * T + 6 * d * V * f
    LoRA:              4 * N_body + 12 * L * d * T + 4 * d * V * f + 6 * N_lora

Frozen weights need no weight gradient, hence 4 instead of 6 under LoRA; the LM head runs
only on target positions (see ``train.target_loss_sum``), hence the factor f.
"""

from __future__ import annotations

import functools
import time

import torch


def flops_per_token(model: torch.nn.Module, mean_len: float, target_share: float) -> float:
    """Training FLOPs per real token for ``model`` as prepared (LoRA or full)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    d, layers, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    embed = base.get_input_embeddings().weight.numel()
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = frozen + trainable
    lora = hasattr(model, "get_base_model")
    n_body = (frozen if lora else total) - embed
    attention = 12 * layers * d * mean_len
    if lora:
        return 4 * n_body + attention + 4 * d * vocab * target_share + 6 * trainable
    return 6 * n_body + attention + 6 * d * vocab * target_share


@functools.cache
def matmul_peak(device: str = "cpu", bf16: bool = True, size: int | None = None, seconds: float = 0.2,
                rounds: int = 5) -> float:
    """Measured FLOP/s of a square matmul in bf16 (or fp32) on ``device``: the practical peak.

    1024-square on a CPU; 8192-square on a GPU, which a small product leaves mostly idle.
    The best of ``rounds`` timed rounds: a single short round read anywhere from 415 to 956
    GFLOP/s on the same 2-core machine (clock ramp-up, a neighbour's burst).
    """
    size = size or (1024 if device == "cpu" else 8192)
    dtype = torch.bfloat16 if bf16 else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):  # warm-up: thread pools, kernel selection
        a @ b
    best = 0.0
    for _ in range(rounds):
        if device != "cpu":
            torch.cuda.synchronize()
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            n += 1
        if device != "cpu":
            torch.cuda.synchronize()
        best = max(best, 2 * size**3 * n / (time.perf_counter() - start))
    return best
