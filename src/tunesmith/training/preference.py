"""Preference objectives: DPO and its kin as the loop's loss, over ``data.pairs.Pair`` rows.

Every objective reads the summed log-probability of each answer's target tokens under the policy (``logp``, with
gradients) and, where it has one, under the reference model (``ref``, fixed). With beta > 0, for a pair (chosen c,
rejected r), ``n`` the answer's target-token count, ``avg = logp / n``, ``h = (logp_c - ref_c) - (logp_r - ref_r)``:

* ``dpo``   (Rafailov et al. 2023, eq. 7; TRL ``loss_type="sigmoid"``): ``-log sigmoid(beta * h)``; with
  ``label_smoothing`` eps (cDPO): ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``.
* ``ipo``   (Azar et al. 2023, eq. 17; TRL ``loss_type="ipo"``): ``(h_avg - 1 / (2 beta))^2`` with every log-prob
  averaged over its answer's tokens, as TRL does.
* ``simpo`` (Meng et al. 2024, eq. 6; TRL CPO ``loss_type="simpo"``): ``-log sigmoid(beta (avg_c - avg_r) - gamma)``,
  no reference model.
* ``orpo``  (Hong et al. 2024, eq. 6-7; TRL ``ORPOTrainer``): ``NLL_c - beta * log sigmoid(log odds_c - log odds_r)``,
  ``log odds = avg - log(1 - exp(avg))``, ``NLL_c`` the chosen answer's mean token cross-entropy; no reference.
* ``kto``   (Ethayarajh et al. 2024, eq. 8; TRL ``KTOTrainer``): unpaired rows, ``r = logp - ref``;
  desirable: ``w_d (1 - sigmoid(beta (r - z)))``, undesirable: ``w_u (1 - sigmoid(beta (z - r)))``, with ``z`` the
  detached, clamped (>= 0) mean of ``logp - ref`` over the step's mismatched rows (each prompt with another row's
  answer: ``Pair.kl``).

``sft_weight`` (TRL's ``rpo_alpha``, Pang et al. 2024) adds ``sft_weight * NLL_c``, the chosen answers' mean token
cross-entropy, against the fall of both log-probs. The step's loss is the mean over its rows (pairs, or unpaired
rows for KTO), whatever the micro-batches.

The reference: ``precomputed`` (default): every row's reference log-probs computed once before training by the model
as it starts (with LoRA, its adapters disabled) and saved with the run (``reference_logps.json``), so a resume reads
them instead of computing them again; ``adapter`` (LoRA only): computed each step with the adapters disabled (no
second copy of the model either way).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from tunesmith import runtime
from tunesmith.config import PreferenceConfig
from tunesmith.data.pairs import Pair
from tunesmith.data.render import IGNORE, Encoded, collate
from tunesmith.io import atomic_write_json
from tunesmith.models import unwrap
from tunesmith.training.losses import plain_head, target_hidden, target_nll

OBJECTIVES = ("dpo", "ipo", "simpo", "orpo", "kto")
REFERENCE_FREE = ("simpo", "orpo")
REFERENCE_FILE = "reference_logps.json"


Settings = PreferenceConfig  # what the objective reads: the config's ``preference:`` block


@dataclass
class Terms:
    """One micro-batch's rows: the loss of each row (B,), and what is logged about them."""

    losses: torch.Tensor
    logp_chosen: torch.Tensor  # (P,) summed log-probs of the paired rows' (or desirable rows') answers
    logp_rejected: torch.Tensor
    reward_chosen: torch.Tensor  # beta * (logp - ref) (reference-free: beta * avg logp)
    reward_rejected: torch.Tensor


# ---------------------------------------------------------------- log-probabilities


class HeadLogProb(torch.autograd.Function):
    """log softmax(h_i W^T)[y_i] for N positions (N,), with the (N, V) logits never kept: forward runs the head
    ``chunk`` rows at a time, backward runs each chunk's head again and turns it into the gradient at once
    (d logp_i / d logits_i = onehot(y_i) - softmax_i, scaled by the incoming gradient of row i). The memory of the
    fused cross-entropy (``losses.HeadCrossEntropy``) for a loss that is not a plain sum of the log-probs."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, chunk: int) -> torch.Tensor:
        acc = torch.promote_types(h.dtype, torch.float32)  # fp32 at least (bf16 matmuls, fp32 softmax)
        out = torch.empty(len(y), dtype=acc, device=h.device)
        for i in range(0, len(y), chunk):
            logits = (h[i : i + chunk] @ weight.t()).to(acc)
            out[i : i + chunk] = logits.gather(1, y[i : i + chunk, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
        ctx.save_for_backward(h, weight, y)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, weight, y = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.empty_like(h) if need_h else None
        acc = torch.promote_types(h.dtype, torch.float32)
        dw = torch.zeros(weight.shape, dtype=acc, device=h.device) if need_w else None
        for i in range(0, len(y), ctx.chunk):
            hc, yc = h[i : i + ctx.chunk], y[i : i + ctx.chunk]
            g = torch.softmax((hc @ weight.t()).to(acc), dim=-1).neg_()  # d logp / d logits = onehot - softmax
            g[torch.arange(len(yc), device=h.device), yc] += 1.0
            g = g.mul_(grad[i : i + ctx.chunk, None]).to(h.dtype)
            if need_h:
                dh[i : i + ctx.chunk] = g @ weight
            if need_w:
                dw += (g.t() @ hc).to(acc)
        return dh, None if dw is None else dw.to(weight.dtype), None, None


def row_logps(model: torch.nn.Module, rows: list[Encoded], pad_id: int, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of its target tokens (B,) and their count (B,), with gradients when they
    are on (through ``HeadLogProb``: no (N, V) logits kept)."""
    dev = next(model.parameters()).device
    batch = {k: v.to(dev) for k, v in collate(rows, pad_id).items()}
    base = unwrap(model)
    if torch.is_grad_enabled() and plain_head(base) and getattr(base.get_output_embeddings(), "bias", None) is None:
        h, y, at = target_hidden(model, batch)
        weight = base.get_output_embeddings().weight
        kind = h.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else h.dtype
        with torch.autocast(kind, enabled=False):
            logp = HeadLogProb.apply(h.to(dtype), weight.to(dtype), y, chunk)
    else:
        nll, at = target_nll(model, batch)
        logp = -nll
    total = torch.zeros(len(rows), dtype=torch.float32, device=dev).index_add(0, at, logp)
    count = torch.zeros(len(rows), dtype=torch.float32, device=dev).index_add_(0, at, torch.ones_like(logp))
    return total, count


def _sides(pairs: list[Pair]) -> tuple[list[Encoded], int]:
    """The rows of a micro-batch in one batch: every first side, then the rejected sides of the paired rows."""
    firsts = [p.sides()[0] for p in pairs]
    return firsts + [p.rejected for p in pairs if p.rejected is not None], len(firsts)


# ---------------------------------------------------------------- the losses


def pair_losses(s: Settings, logp_c: torch.Tensor, logp_r: torch.Tensor, n_c: torch.Tensor, n_r: torch.Tensor,
                ref_c: torch.Tensor | None, ref_r: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pair (P,): the loss of ``s.objective`` (dpo, ipo, simpo, orpo; see the module docstring; without the
    SFT term), and the chosen and rejected rewards (detached). Log-probs are sums over each answer's ``n`` tokens."""
    avg_c, avg_r = logp_c / n_c.clamp(min=1), logp_r / n_r.clamp(min=1)
    if s.objective == "dpo":
        h = (logp_c - ref_c) - (logp_r - ref_r)
        losses = -F.logsigmoid(s.beta * h) * (1 - s.label_smoothing) - F.logsigmoid(-s.beta * h) * s.label_smoothing
    elif s.objective == "ipo":
        h = (avg_c - ref_c / n_c.clamp(min=1)) - (avg_r - ref_r / n_r.clamp(min=1))
        losses = (h - 1 / (2 * s.beta)) ** 2
    elif s.objective == "simpo":
        z = s.beta * (avg_c - avg_r) - s.simpo_gamma
        losses = -F.logsigmoid(z) * (1 - s.label_smoothing) - F.logsigmoid(-z) * s.label_smoothing
    elif s.objective == "orpo":
        log_odds = (avg_c - avg_r) - (torch.log1p(-torch.exp(avg_c)) - torch.log1p(-torch.exp(avg_r)))
        losses = -s.beta * F.logsigmoid(log_odds)
    else:
        raise ValueError(f"preference.objective: {s.objective!r} is not a paired objective ({', '.join(OBJECTIVES[:4])})")
    if s.objective in REFERENCE_FREE:
        rc, rr = s.beta * avg_c.detach(), s.beta * avg_r.detach()
    else:
        rc, rr = s.beta * (logp_c - ref_c).detach(), s.beta * (logp_r - ref_r).detach()
    return losses, rc, rr


def kto_losses(s: Settings, logp: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor,
               kl: torch.Tensor) -> torch.Tensor:
    """KTO's loss per unpaired row (B,): ``desirable`` (B,) bool, ``kl`` the step's detached reference point z."""
    r = logp - ref
    good = s.desirable_weight * (1 - torch.sigmoid(s.beta * (r - kl)))
    bad = s.undesirable_weight * (1 - torch.sigmoid(s.beta * (kl - r)))
    return torch.where(desirable, good, bad)


class PreferenceLoss:
    """The loop's objective for ``task: preference`` (the interface of ``losses.TaskLoss``), with the preference
    metrics of each step (``parts``) and a validation of its own (``validation_loss``: the mean loss over the
    validation rows, and their reward accuracy, margin and chosen/rejected log-probs, logged at every validation)."""

    def __init__(self, settings: Settings, model: torch.nn.Module, pad_id: int, reference: str = "precomputed") -> None:
        self.s, self.model, self.pad_id, self.reference = settings, model, pad_id, reference
        self.n_rows = 1
        self.kl = torch.zeros(())
        self._step_rows: list[Encoded] | None = None
        self._sums: dict[str, float] = {}

    def nll_weight(self) -> float:
        """The weight of the chosen answers' mean token cross-entropy: ORPO's own 1, plus ``sft_weight``."""
        return (1.0 if self.s.objective == "orpo" else 0.0) + self.s.sft_weight

    def needs_reference(self) -> bool:
        return self.s.objective not in REFERENCE_FREE

    def begin_step(self, examples: list[Encoded]) -> None:
        self.n_rows = max(len(examples), 1)
        self._sums = {}
        self._step_rows = examples if self.s.objective == "kto" else None  # KTO's KL: at the step's first pass

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], examples: list[Encoded],
             n_targets: int) -> torch.Tensor:
        if self._step_rows is not None:  # inside the pass's autocast, as the frozen bf16 weights need
            self.kl, self._step_rows = self.kl_estimate(model, self._step_rows), None
        pairs = [e for e in examples if isinstance(e, Pair)]
        terms, nll_c = self.terms(model, pairs)
        loss = terms.losses.sum() + self.nll_weight() * nll_c * len(pairs)
        self._add(terms, nll_c, len(pairs))
        return loss / self.n_rows

    def terms(self, model: torch.nn.Module, pairs: list[Pair]) -> tuple[Terms, torch.Tensor]:
        """The micro-batch's per-row losses and rewards, and the chosen answers' mean token cross-entropy."""
        rows, n_first = _sides(pairs)
        logp, count = row_logps(model, rows, self.pad_id)
        ref = self._reference(model, pairs, rows) if self.needs_reference() else None
        dev = logp.device
        if self.s.objective == "kto":
            desirable = torch.tensor([bool(p.desirable) for p in pairs], device=dev)
            losses = kto_losses(self.s, logp, ref, desirable, self.kl.to(dev))
            reward = self.s.beta * (logp - ref).detach()
            good = [i for i, p in enumerate(pairs) if p.desirable]
            nll = -(logp[good].sum() / count[good].sum().clamp(min=1)) if good else logp.sum() * 0.0
            return Terms(losses, logp[desirable].detach(), logp[~desirable].detach(), reward[desirable],
                         reward[~desirable]), nll
        paired = [i for i, p in enumerate(pairs) if p.rejected is not None]
        c, r = logp[paired], logp[n_first:]
        nc, nr = count[paired], count[n_first:]
        rc, rr = (ref[paired], ref[n_first:]) if ref is not None else (None, None)
        losses, wc, wr = pair_losses(self.s, c, r, nc, nr, rc, rr)
        nll = -(c.sum() / nc.sum().clamp(min=1))
        return Terms(losses, c.detach(), r.detach(), wc, wr), nll

    def _reference(self, model: torch.nn.Module, pairs: list[Pair], rows: list[Encoded]) -> torch.Tensor:
        """The reference log-probs of ``rows`` (``_sides`` order): precomputed, or now with the adapters off."""
        dev = next(model.parameters()).device
        if self.reference == "adapter":
            with torch.no_grad(), reference_model(model):
                return row_logps(model, rows, self.pad_id)[0]
        if any(p.reference is None for p in pairs):
            raise RuntimeError("a preference row has no reference log-probabilities (fill_references was not run)")
        firsts = [p.reference[0] for p in pairs]
        seconds = [p.reference[1] for p in pairs if p.rejected is not None]
        return torch.tensor(firsts + seconds, dtype=torch.float32, device=dev)

    def kl_estimate(self, model: torch.nn.Module, examples: list[Encoded]) -> torch.Tensor:
        """KTO's reference point z: mean of (policy - reference) log-probs over the step's mismatched rows
        (``Pair.kl``), clamped at 0, without gradient."""
        pairs = [e for e in examples if isinstance(e, Pair) and e.kl is not None]
        if not pairs:
            return torch.zeros(())
        with torch.no_grad():
            policy = row_logps(model, [p.kl for p in pairs], self.pad_id)[0]
            if self.reference == "adapter":
                with reference_model(model):
                    ref = row_logps(model, [p.kl for p in pairs], self.pad_id)[0]
            else:
                ref = torch.tensor([p.reference[-1] for p in pairs], dtype=torch.float32, device=policy.device)
        return (policy - ref).mean().clamp(min=0).detach()

    def _add(self, t: Terms, nll_c: torch.Tensor, n: int) -> None:
        s = self._sums
        for key, v in (("rewards_chosen", t.reward_chosen), ("rewards_rejected", t.reward_rejected),
                       ("logps_chosen", t.logp_chosen), ("logps_rejected", t.logp_rejected)):
            s[key] = s.get(key, 0.0) + float(v.sum())
            s[key + "_n"] = s.get(key + "_n", 0.0) + len(v)
        if self.s.objective != "kto":
            s["accuracy"] = s.get("accuracy", 0.0) + float((t.reward_chosen > t.reward_rejected).float().sum()
                                                        + 0.5 * (t.reward_chosen == t.reward_rejected).float().sum())
            s["margin"] = s.get("margin", 0.0) + float((t.reward_chosen - t.reward_rejected).sum())
            s["pairs"] = s.get("pairs", 0.0) + len(t.reward_chosen)
        s["nll_chosen"] = s.get("nll_chosen", 0.0) + float(nll_c.detach()) * n
        s["rows"] = s.get("rows", 0.0) + n

    def end_step(self) -> float:
        return 0.0

    def parts(self) -> dict[str, float]:
        return summarize(self._sums) | ({"kl": float(self.kl)} if self.s.objective == "kto" else {})

    @torch.no_grad()
    def validation_loss(self, model: torch.nn.Module, data: list[Pair], batch_size: int, pad_id: int,
                        bf16: bool = False) -> tuple[float, dict[str, Any]]:
        """The mean loss over ``data`` (model left in its mode), and its metrics as ``val_*`` keys."""
        was_training = model.training
        model.eval()
        saved, self._sums = self._sums, {}
        dev = next(model.parameters()).device
        total = 0.0
        try:
            if self.s.objective == "kto":
                with runtime.autocast(dev, bf16):
                    self.kl = self.kl_estimate(model, data)
            for i in range(0, len(data), batch_size):
                pairs = data[i : i + batch_size]
                with runtime.autocast(dev, bf16):
                    terms, nll_c = self.terms(model, pairs)
                total += float(terms.losses.sum()) + float(nll_c) * len(pairs) * self.nll_weight()
                self._add(terms, nll_c, len(pairs))
            metrics = {f"val_{k}": v for k, v in summarize(self._sums).items()}
        finally:
            self._sums = saved
            model.train(was_training)
        return total / max(len(data), 1), metrics


def summarize(sums: dict[str, float]) -> dict[str, float]:
    """Means of what ``PreferenceLoss._add`` summed."""
    out = {}
    for key in ("rewards_chosen", "rewards_rejected", "logps_chosen", "logps_rejected"):
        if sums.get(key + "_n"):
            out[key] = sums[key] / sums[key + "_n"]
    if sums.get("pairs"):
        out["reward_accuracy"] = sums["accuracy"] / sums["pairs"]
        out["reward_margin"] = sums["margin"] / sums["pairs"]
    if sums.get("rows"):
        out["nll_chosen"] = sums["nll_chosen"] / sums["rows"]
    return out


@contextlib.contextmanager
def reference_model(model: torch.nn.Module) -> Any:
    """The model as the reference: a PEFT model with its adapters disabled. Raises ValueError for another model
    (full fine-tuning has no reference inside it: its reference log-probs are precomputed)."""
    if not hasattr(model, "disable_adapter"):
        raise ValueError("preference.reference: adapter needs method: lora (full fine-tuning precomputes the reference)")
    with model.disable_adapter():
        yield


# ---------------------------------------------------------------- the reference, once


def fingerprint(rows: list[Pair]) -> str:
    """A hash of the rows' tokens (both sides and the mismatched KTO rows)."""
    h = hashlib.sha256()
    for p in rows:
        h.update(repr((p.input_ids, p.labels, p.rejected and (p.rejected.input_ids, p.rejected.labels),
                       p.kl and (p.kl.input_ids, p.kl.labels))).encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def compute_references(model: torch.nn.Module, rows: list[Pair], pad_id: int, batch_size: int, bf16: bool,
                       lora: bool, advance: Callable[[int], None] | None = None) -> list[list[float]]:
    """The reference log-probs of every row: [first side, rejected side?, mismatched KTO row?], by ``model`` as it is
    (``lora``: with its adapters disabled)."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    out: list[list[float]] = []
    try:
        with reference_model(model) if lora else contextlib.nullcontext():
            for i in range(0, len(rows), batch_size):
                part = rows[i : i + batch_size]
                sides = [s for p in part for s in p.sides() + ([p.kl] if p.kl is not None else [])]
                with runtime.autocast(dev, bf16):
                    logp = row_logps(model, sides, pad_id)[0].tolist()
                k = 0
                for p in part:
                    n = len(p.sides()) + (p.kl is not None)
                    out.append(logp[k : k + n])
                    k += n
                if advance:
                    advance(len(part))
    finally:
        model.train(was_training)
    return out


def fill_references(model: torch.nn.Module, splits: dict[str, list[Pair]], run_dir: Path, pad_id: int, batch_size: int,
                    bf16: bool, lora: bool, say: Callable[[str], None], progress: Any = None) -> None:
    """Put the reference log-probs on every row of ``splits`` (name -> rows): read from ``run_dir/reference_logps.json``
    when it was made for these rows, else computed now (the model as it starts) and saved there first, so a resumed
    run uses the very reference its first steps used."""
    path = Path(run_dir) / REFERENCE_FILE
    saved = json.loads(path.read_text()) if path.is_file() else {}
    prints = {name: fingerprint(rows) for name, rows in splits.items()}
    if saved.get("fingerprints") == prints:
        say(f"reference log-probabilities: read from {path.name}")
        values = saved["logps"]
    else:
        values = {}
        total = sum(map(len, splits.values()))
        task = progress.add_task("reference", total=total, info="") if progress is not None else None
        for name, rows in splits.items():
            values[name] = compute_references(model, rows, pad_id, batch_size, bf16, lora,
                                              (lambda n: progress.update(task, advance=n)) if task is not None else None)
        atomic_write_json(path, {"fingerprints": prints, "logps": values})
        say(f"reference log-probabilities of {total:,} rows computed and saved to {path.name}")
    for name, rows in splits.items():
        for p, v in zip(rows, values[name]):
            p.reference = v


def mismatched(rows: list[Pair]) -> None:
    """KTO's mismatched rows: each row's prompt with the answer of the row after it (the last with the first's), as
    TRL's KTO pairs a batch's prompts with shifted completions; set as ``Pair.kl``."""
    if len(rows) < 2:
        return
    for i, p in enumerate(rows):
        other = rows[(i + 1) % len(rows)]
        answer_ids, answer_labels = other.input_ids[other.prompt_len:], other.labels[other.prompt_len:]
        p.kl = Encoded(p.input_ids[: p.prompt_len] + answer_ids,
                       [IGNORE] * p.prompt_len + answer_labels, None, p.source)


def build(cfg: Any, model: torch.nn.Module, train: list[Pair], validation: list[Pair], run_dir: Path, pad_id: int,
          say: Callable[[str], None], progress: Any = None) -> PreferenceLoss:
    """The objective of a ``task: preference`` run (``cfg.preference``), its rows' reference log-probs filled in
    (``fill_references``) when the objective has a reference and it is precomputed."""
    pr = cfg.preference
    objective = PreferenceLoss(pr, model, pad_id, pr.reference)
    if objective.needs_reference() and pr.reference == "precomputed":
        bf16 = runtime.use_bf16(cfg.train.precision, next(model.parameters()).device)
        fill_references(model, {"train": train, "validation": validation}, run_dir, pad_id, cfg.eval.batch_size, bf16,
                        cfg.method == "lora", say, progress)
    return objective
