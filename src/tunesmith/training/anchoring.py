"""Weight anchoring: a penalty on the trainable weights moving away from where training started.

    penalty = strength / 2 * sum_i F_i (w_i - w0_i)^2

* L2-SP (Li, Grandvalet and Davoine 2018, "Explicit Inductive Bias for Transfer Learning with
  Convolutional Networks"): F_i = 1, w0 = the pretrained starting point.
* EWC (Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in neural networks"): F_i is
  the diagonal of the Fisher information of the general text at w0, here the empirical Fisher

      F_i = 1/K * sum_k (d/dw_i  mean_t NLL_k,t (w0))^2

  over K windows k of general text (``anchor.fisher_examples`` windows of ``anchor.fisher_data``),
  mean_t NLL_k,t the window's mean next-token negative log-likelihood in nats, one gradient per
  window (batch of one), the model in eval mode (no dropout). Units of F: nats^2 per weight^2.

w0 is the trainable weights' value when the anchor is made: build it from the freshly prepared
model, before ``train`` loads a checkpoint, so a resumed run anchors to the same w0. The Fisher
is saved in the run folder (``anchor_fisher.safetensors``) and read back on resume.

The penalty's gradient strength * F * (w - w0) is added to ``.grad`` directly after the task
backward (no autograd graph): one fused multiply-add per trainable tensor per optimizer step.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tunesmith import runtime
from tunesmith.data.render import Encoded, collate
from tunesmith.io import default_modes

FISHER_FILE = "anchor_fisher.safetensors"


class Anchor:
    """The anchoring penalty on ``params`` (name -> trainable parameter), anchored at their values now.

    ``fisher``: name -> F (same shapes) for EWC; None for L2-SP (F = 1). Raises ValueError when
    ``fisher`` lacks a parameter or a shape differs."""

    def __init__(self, params: dict[str, torch.nn.Parameter], strength: float,
                 fisher: dict[str, torch.Tensor] | None = None) -> None:
        self.params = params
        self.strength = strength
        self.w0 = {n: p.detach().clone() for n, p in params.items()}
        if fisher is not None:
            bad = [n for n, p in params.items() if n not in fisher or fisher[n].shape != p.shape]
            if bad:
                raise ValueError(f"anchor: the Fisher does not match the trainable weights (e.g. {bad[0]})")
            fisher = {n: fisher[n].to(device=p.device, dtype=torch.float32) for n, p in params.items()}
        self.fisher = fisher

    @torch.no_grad()
    def penalty(self) -> float:
        """strength / 2 * sum_i F_i (w_i - w0_i)^2 at the current weights."""
        total = torch.zeros((), dtype=torch.float32, device=next(iter(self.w0.values())).device)
        for n, p in self.params.items():
            d = (p.detach().float() - self.w0[n].float()).square_()
            total += d.mul_(self.fisher[n]).sum() if self.fisher is not None else d.sum()
        return self.strength / 2 * float(total)  # one device sync per step

    @torch.no_grad()
    def add_grad(self) -> float:
        """Add the penalty's gradient strength * F * (w - w0) to each parameter's ``.grad``; return
        the penalty (before the update)."""
        value = self.penalty()
        for n, p in self.params.items():
            g = (p.detach() - self.w0[n]).mul_(self.strength)
            if self.fisher is not None:
                g.mul_(self.fisher[n])
            p.grad = g.to(p.dtype) if p.grad is None else p.grad.add_(g.to(p.grad.dtype))
        return value


def estimate_fisher(model: torch.nn.Module, params: dict[str, torch.nn.Parameter], windows: list[Encoded],
                    pad_id: int, bf16: bool = False) -> dict[str, torch.Tensor]:
    """The empirical diagonal Fisher of ``params`` on ``windows`` (see the module docstring):
    name -> fp32 tensor of the parameter's shape. The model is left in its previous mode and
    its ``.grad`` untouched. Raises ValueError when ``windows`` is empty."""
    from tunesmith.training.losses import target_loss_sum  # the loop does not import anchoring: no cycle

    if not windows:
        raise ValueError("anchor: no general-text window to estimate the Fisher on")
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    names = list(params)
    fisher = {n: torch.zeros(params[n].shape, dtype=torch.float32, device=dev) for n in names}
    for w in windows:
        batch = {k: v.to(dev) for k, v in collate([w], pad_id).items()}
        with runtime.autocast(dev, bf16):
            loss_sum, n = target_loss_sum(model, batch)
        grads = torch.autograd.grad(loss_sum / n, [params[k] for k in names], allow_unused=True)
        for k, g in zip(names, grads):
            if g is not None:
                fisher[k].add_(g.float().square())
    model.train(was_training)
    return {k: f.div_(len(windows)) for k, f in fisher.items()}


def save_fisher(fisher: dict[str, torch.Tensor], run_dir: Path) -> Path:
    path = Path(run_dir) / FISHER_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({n: f.contiguous().cpu() for n, f in fisher.items()}, str(path))
    default_modes(path)  # safetensors leaves 0600
    return path


def load_fisher(run_dir: Path) -> dict[str, torch.Tensor] | None:
    """The Fisher saved in ``run_dir``, or None when there is none."""
    path = Path(run_dir) / FISHER_FILE
    return load_file(str(path)) if path.is_file() else None
