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

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from tunesmith import runtime
from tunesmith.data.render import IGNORE, Encoded, collate
from tunesmith.models import unwrap
from tunesmith.training.prefix import can_share, decode_shared, note_saved, shared_length

def target_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk: int = 512) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over target positions, and their count.

    With gradients on, the LM head and the loss run fused (``HeadCrossEntropy``): the (N, V)
    logits exist one chunk at a time and are never kept for backward.
    """
    if batch["labels"].ndim == 1:  # a classification head: one label per row
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits.float(), batch["labels"], reduction="sum"), len(batch["labels"])
    base = unwrap(model)
    head = base.get_output_embeddings() if plain_head(base) else None
    if not torch.is_grad_enabled() or head is None or getattr(head, "bias", None) is not None:
        nll, _ = target_nll(model, batch, chunk)
        return nll.sum(), nll.numel()
    h, y, _ = target_hidden(model, batch)
    dev = h.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    with torch.autocast(dev, enabled=False):
        return HeadCrossEntropy.apply(h.to(dtype), head.weight.to(dtype), y, chunk), len(y)


def target_logprob_per_row(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of the batch: the summed log-probability of its target tokens, and their count. (B,), (B,)"""
    nll, rows = target_nll(model, batch)
    b = batch["input_ids"].shape[0]
    total = torch.zeros(b, dtype=torch.float32, device=nll.device).index_add_(0, rows, -nll)
    count = torch.zeros(b, dtype=torch.long, device=nll.device).index_add_(0, rows, torch.ones_like(rows))
    return total, count


def target_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of each target token (N,) and the batch row it belongs to (N,).

    Runs the decoder, then the LM head only on hidden states whose next token is a target,
    ``chunk`` rows at a time: (N, V) logits instead of (B, T, V).
    """
    base = unwrap(model)
    if not plain_head(base):  # models that post-process logits: take the full path
        labels = batch["labels"][:, 1:]
        mask = labels != IGNORE
        logits = model(**decoder_inputs(batch)).logits
        return F.cross_entropy(logits[:, :-1][mask].float(), labels[mask], reduction="none"), mask.nonzero()[:, 0]
    h, y, rows = target_hidden(model, batch)
    head = base.get_output_embeddings()
    parts = [F.cross_entropy(head(h[i : i + chunk]).float(), y[i : i + chunk], reduction="none")  # (chunk, V) logits
             for i in range(0, len(y), chunk)]
    return (torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)), rows


def target_hidden(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The decoder's last hidden states at positions whose next token is a target (N, d), those
    next tokens (N,), and the batch row of each (N,)."""
    labels = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
    mask = labels != IGNORE
    decoder = unwrap(model).get_decoder()
    p = 0 if "position_ids" in batch else shared_length(batch["input_ids"], batch["labels"])
    if p and can_share(model, decoder):  # the rows' common start (a system prompt) runs once
        hidden, _ = decode_shared(decoder, batch["input_ids"], p)  # (B, T-p, d): positions p..T-1
        mask, labels = mask[:, p:], labels[:, p:]  # no target is predicted from positions < p
        if torch.is_grad_enabled():  # a training pass: its MFU counts what really ran
            note_saved((batch["input_ids"].shape[0] - 1) * p)
    else:
        hidden = decoder(**decoder_inputs(batch)).last_hidden_state
    return hidden[:, :-1][mask], labels[mask], mask.nonzero()[:, 0]


def decoder_inputs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    # Packed batches carry position_ids and no attention mask; without a KV cache transformers
    # then builds a block-diagonal causal mask from the position ids (and no cache is wanted here).
    # Right-padded batches need no attention mask under causal attention: a real token only
    # sees earlier positions, all real; pads come after and are never targets. Without a mask
    # SDPA takes its is_causal kernel, ~30% faster on this CPU than the masked path.
    return {k: batch[k] for k in ("input_ids", "position_ids") if k in batch} | {"use_cache": False}


class GradsMadeInForward(torch.autograd.Function):
    """Base of the fused LM-head losses whose forward already computed the gradients of its first
    two inputs (hidden states dh, head weight dW) and saved them: backward only scales them by the
    incoming gradient of the (scalar) loss; every further input gets no gradient."""

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        dh, dw = ctx.saved_tensors
        rest = (None,) * (len(ctx.needs_input_grad) - 2)
        return (None if dh is None else dh * grad.to(dh.dtype),
                None if dw is None else (dw * grad).to(ctx.weight_dtype), *rest)


class HeadCrossEntropy(GradsMadeInForward):
    """sum_i CE(h_i · Wᵀ, y_i), with the gradients computed during forward, chunk by chunk.

    Plain autograd keeps every chunk's (chunk, V) logits and log-softmax for backward: about
    N·V·6 bytes, 260 MB for 886 targets at V = 49,152. Here each chunk's logits are turned
    into their gradient (softmax - one-hot) at once and folded into dh (N, d) and dW (V, d);
    only those are kept. The loss is a plain sum, so backward just scales them.
    """

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, chunk: int) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        dh = torch.empty_like(h) if need_h else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
        for i in range(0, len(y), chunk):
            hc, yc = h[i : i + chunk], y[i : i + chunk]
            logits = (hc @ weight.t()).float()  # (c, V)
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, yc[:, None]).squeeze(1)).sum()
            if need_h or need_w:
                grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                grad[torch.arange(len(yc), device=h.device), yc] -= 1.0
                grad = grad.to(h.dtype)
                if need_h:
                    dh[i : i + chunk] = grad @ weight
                if need_w:
                    dw += grad.t() @ hc  # summed over chunks in fp32
        ctx.save_for_backward(dh, dw)
        ctx.weight_dtype = weight.dtype
        return total


def plain_head(model: torch.nn.Module) -> bool:
    """True when logits are exactly ``lm_head(hidden)`` (no scaling or soft-capping)."""
    cfg = getattr(model, "config", None)
    scaled = any(getattr(cfg, k, None) not in (None, 1.0) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
    return not scaled and hasattr(model, "get_decoder") and model.get_output_embeddings() is not None


LossSum = Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, int]]


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, data: list[Encoded], batch_size: int, pad_id: int, bf16: bool = False,
                  loss_sum: LossSum | None = None) -> float:
    """Mean loss per target token over ``data`` (model left in its previous mode).
    ``loss_sum``: how a batch's summed loss and target count are computed (default
    ``target_loss_sum(model, batch)``; under FSDP, through the sharded root module)."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(data), batch_size):
        batch = {k: v.to(dev) for k, v in collate(data[i : i + batch_size], pad_id).items()}
        with runtime.autocast(dev, bf16):
            loss, n = loss_sum(batch) if loss_sum else target_loss_sum(model, batch)
        total, count = total + float(loss), count + n
    model.train(was_training)
    return total / max(count, 1)


def validation_loss(model: torch.nn.Module, data: list[Encoded] | dict[str, list[Encoded]], batch_size: int,
                    pad_id: int, bf16: bool = False, loss_sum: LossSum | None = None) -> tuple[float, dict[str, Any]]:
    """The validation loss, and for several tasks (``data`` a dict name -> rows) their losses as
    ``{"task_val_loss": {name: loss}}`` with the loss their macro average (each task counts once,
    whatever its size); ``{}`` for one task."""
    if not isinstance(data, dict):
        return evaluate_loss(model, data, batch_size, pad_id, bf16, loss_sum), {}
    losses = {name: evaluate_loss(model, rows, batch_size, pad_id, bf16, loss_sum) for name, rows in data.items()}
    return sum(losses.values()) / len(losses), {"task_val_loss": losses}


class TaskLoss:
    """The loop's objective with no mitigation: the task cross-entropy, normalised over the step.

    The null object of ``tunesmith.training.mitigations.Mitigations`` (distillation, weight anchoring), which
    has the same four methods; see there. Costs nothing beyond ``target_loss_sum``."""

    def begin_step(self, examples: list[Encoded]) -> None:
        pass

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], examples: list[Encoded],
             n_targets: int) -> torch.Tensor:
        return target_loss_sum(model, batch)[0] / n_targets  # normalised over the whole optimizer step

    def end_step(self) -> float:
        return 0.0

    def parts(self) -> dict[str, float]:
        return {}


# ---------------------------------------------------------------- the loop


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
    softmaxes in fp32, as the fused cross-entropy (HeadCrossEntropy) does. A scalar (fp32)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"distill.direction: {direction!r} is not one of {', '.join(DIRECTIONS)}")
    dev = h.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    with torch.autocast(dev, enabled=False):
        return _HeadKL.apply(h.to(dtype), weight.to(dtype), h_teacher.detach().to(dtype), weight_teacher.detach().to(dtype),
                             float(temperature), direction == "reverse", chunk)


class _HeadKL(GradsMadeInForward):
    """The T^2-scaled KL summed over positions, its gradients computed during forward, chunk by
    chunk (as ``train.HeadCrossEntropy``): each chunk's (c, V) logits of both models are turned
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
