"""Distillation loss: a temperature-softened KL between teacher and student next-token distributions,
computed through the LM head chunk by chunk, so neither model's (B, T, V) logits are ever built.

For one position with student logits s and teacher logits t (V,), temperature T, z = s / T, u = t / T:

    forward: T^2 * KL(softmax(u) || softmax(z)) = T^2 * sum_v p_t (log p_t - log p_s)
    reverse: T^2 * KL(softmax(z) || softmax(u)) = T^2 * sum_v p_s (log p_s - log p_t)

The T^2 factor keeps the gradient's size independent of T (Hinton, Vinyals and Dean 2015,
"Distilling the Knowledge in a Neural Network", section 2). Gradients with respect to the
student logits s (a = log p_s - log p_t, KL the row's unscaled value):

    forward: T * (p_s - p_t)              reverse: T * p_s * (a - KL)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from tunesmith.train import _GradsMadeInForward

DIRECTIONS = ("forward", "reverse")


def kl_from_logits(student: torch.Tensor, teacher: torch.Tensor, temperature: float, direction: str) -> torch.Tensor:
    """T^2-scaled KL of each position from full logits (N, V) -> (N,), differentiable by plain
    autograd: the reference the fused path is tested against (and the path for heads that are
    not one bias-free linear layer). ``direction``: forward = KL(teacher || student), reverse =
    KL(student || teacher). Raises ValueError for another direction."""
    if direction not in DIRECTIONS:
        raise ValueError(f"distill.direction: {direction!r} is not one of {', '.join(DIRECTIONS)}")
    ls = F.log_softmax(student.float() / temperature, dim=-1)
    lt = F.log_softmax(teacher.float() / temperature, dim=-1)
    kl = (lt.exp() * (lt - ls)).sum(-1) if direction == "forward" else (ls.exp() * (ls - lt)).sum(-1)
    return kl * temperature**2


def head_kl_sum(h: torch.Tensor, weight: torch.Tensor, h_teacher: torch.Tensor, weight_teacher: torch.Tensor,
                temperature: float, direction: str, chunk: int = 256) -> torch.Tensor:
    """sum over N positions of the T^2-scaled KL between ``softmax(h W^T / T)`` (student, with
    gradients for ``h`` (N, d) and ``weight`` (V, d)) and ``softmax(h_teacher W_t^T / T)``
    (teacher, no gradient). Under autocast, the matmuls run in the autocast dtype and the
    softmaxes in fp32, as the fused cross-entropy in train.py does. A scalar (fp32)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"distill.direction: {direction!r} is not one of {', '.join(DIRECTIONS)}")
    dev = h.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    with torch.autocast(dev, enabled=False):
        return _HeadKL.apply(h.to(dtype), weight.to(dtype), h_teacher.detach().to(dtype), weight_teacher.detach().to(dtype),
                             float(temperature), direction == "reverse", chunk)


class _HeadKL(_GradsMadeInForward):
    """The T^2-scaled KL summed over positions, its gradients computed during forward, chunk by
    chunk (as ``train._HeadCrossEntropy``): each chunk's (c, V) logits of both models are turned
    into the loss and d/d(student logits) at once and folded into dh (N, d) and dW (V, d), so only
    those are kept for backward. About 4 (c, V) fp32 tensors are alive at a time."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, h_t: torch.Tensor, weight_t: torch.Tensor,
                temperature: float, reverse: bool, chunk: int) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        dh = torch.empty_like(h) if need_h else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
        for i in range(0, len(h), chunk):
            hc = h[i : i + chunk]
            ls = F.log_softmax((hc @ weight.t()).float().div_(temperature), dim=-1)  # (c, V) student log-probs
            lt = F.log_softmax((h_t[i : i + chunk] @ weight_t.t()).float().div_(temperature), dim=-1)  # (c, V) teacher
            if reverse:
                ps = ls.exp()
                a = lt.neg_().add_(ls)  # log p_s - log p_t, in place of lt
                kl = (ps * a).sum(-1)  # (c,)
                grad = a.sub_(kl[:, None]).mul_(ps)  # dKL/dz
            else:
                pt = lt.exp()
                kl = (pt * (lt - ls)).sum(-1)
                grad = ls.exp_().sub_(pt)
            total += kl.sum() * temperature**2
            if need_h or need_w:
                grad = grad.mul_(temperature).to(h.dtype)  # d(T^2 KL)/d(logits) = T * dKL/dz, since z = logits / T
                if need_h:
                    dh[i : i + chunk] = grad @ weight
                if need_w:
                    dw += grad.t() @ hc
        ctx.save_for_backward(dh, dw)
        ctx.weight_dtype = weight.dtype
        return total
