"""One autograd function per LoRA layer: y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ, its three gradients by hand.

PEFT runs a LoRA layer as three modules plus a scale and an add. Under bf16 autocast that
keeps, for backward, two bf16 copies of each layer's input (one cast for the frozen weight,
one for ``lora_A``, after PEFT has cast it back to fp32), and the q/k/v projections cast the
same normalised hidden state three times. Here the input is cast once, shared by every layer
that reads the same tensor, and saved once; backward computes dx, dA and dB directly.
Measured on SmolLM2-135M (2x503 tokens): ~25% less activation memory per micro-batch.

Only the ``forward`` of PEFT's ``lora.Linear`` modules is replaced, and only for the plain
case (one active adapter, no dropout in training, no DoRA or other variant, not merged, a
plain ``nn.Linear`` base). Everything else, and parameters, names, saving, loading and
merging, stays PEFT's.
"""

from __future__ import annotations

import types
import weakref
from typing import Any

import peft
import torch

_last_cast: tuple[Any, ...] | None = None  # (weakref to source, its version, dtype, grad mode, the cast)


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor, scale: float) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        xa = x2 @ a.t()  # (N, r)
        y = x2 @ weight.t() if bias is None else torch.addmm(bias, x2, weight.t())  # (N, out)
        y.addmm_(xa, b.t(), alpha=scale)
        ctx.save_for_backward(x2, weight, a, b, xa)
        ctx.scale, ctx.in_shape, ctx.has_bias = scale, x.shape, bias is not None
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, weight, a, b, xa = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(x2.dtype)  # (N, out)
        gb = g @ b  # (N, r): the gradient reaching x·Aᵀ, before the scale
        need_x, need_w, need_bias, need_a, need_b, _ = ctx.needs_input_grad
        dx = dw = dbias = da = db = None
        if need_x:
            dx = (g @ weight).addmm_(gb, a, alpha=ctx.scale).view(ctx.in_shape)
        if need_w:
            dw = g.t() @ x2
        if need_bias and ctx.has_bias:
            dbias = g.sum(0)
        if need_a:
            da = (gb.t() @ x2).mul_(ctx.scale)
        if need_b:
            db = (g.t() @ xa).mul_(ctx.scale)
        return dx, dw, dbias, da, db, None


def install(model: torch.nn.Module) -> int:
    """Route every PEFT ``lora.Linear`` in ``model`` through the fused function; return how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, peft.tuners.lora.Linear) and type(module.get_base_layer()) is torch.nn.Linear:
            module.forward = types.MethodType(_forward, module)
            count += 1
    return count


def _forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if args or kwargs or not _plain(self):
        return type(self).forward(self, x, *args, **kwargs)  # PEFT's own path
    name = self.active_adapters[0]
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    base = self.get_base_layer()
    bias = None if base.bias is None else base.bias.to(dtype)
    with torch.autocast(dev, enabled=False):
        return _LoraLinear.apply(_cast_once(x, dtype), base.weight.to(dtype), bias,
                                 self.lora_A[name].weight.to(dtype), self.lora_B[name].weight.to(dtype),
                                 float(self.scaling[name]))


def _plain(layer: Any) -> bool:
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return False
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return False
    dropout = layer.lora_dropout[name]
    return isinstance(dropout, torch.nn.Identity) or not layer.training or dropout.p == 0


def _cast_once(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)``, reusing the last cast when the same tensor comes again (q, k, v; gate, up)."""
    global _last_cast
    if x.dtype == dtype:
        return x
    last = _last_cast
    if (last is not None and last[0]() is x and last[1] == x._version and last[2] == dtype
            and last[3] == torch.is_grad_enabled()):
        return last[4]
    cast = x.to(dtype)
    _last_cast = (weakref.ref(x), x._version, dtype, torch.is_grad_enabled(), cast)
    return cast
