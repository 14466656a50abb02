"""Keeping what the model knew, on the training side: replay, distillation and weight anchoring.

* Replay (``replay.*``, ``data/replay.py``): general text, or instructions answered by the base
  model, mixed into the training list.
* Distillation (``distill.*``, ``losses.py``): loss += weight * KL per distilled token, between a
  teacher's and the student's next-token distributions, at the positions ``distill.on`` names.
* Anchoring (``anchor.*``, ``anchoring.py``): loss += strength / 2 * sum F (w - w0)^2.

The loop (``train.train``) sees one objective object. ``train.TaskLoss`` is the null object (task
cross-entropy only, what the loop does when every mitigation is off); ``Mitigations`` here has the
same four methods and adds the KL and the penalty::

    begin_step(examples)                    # the whole optimizer step's rows: counts distilled positions
    loss(model, batch, examples, n_targets) # per micro-batch: CE / n_targets + weight * KL / n_distilled
    end_step() -> float                     # after the backward passes: the anchor's gradient; its value
    parts() -> dict[str, float]             # the step's loss parts, for metrics.jsonl

Both terms are normalised over the whole optimizer step, as the cross-entropy is, so batch 8 x
accum 1 equals batch 2 x accum 4 with distillation too. ``build`` makes the object (and the
teacher, the anchor, the Fisher) from a config; ``with_replay`` makes the training list.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any

import torch

from tunesmith import runtime
from rich.progress import Progress

from tunesmith.config import GENERAL, INSTRUCTIONS, Config, load_config
from tunesmith.data.formats import DataError, Example
from tunesmith.data.general import EVAL_INSTRUCTIONS, train_instructions, train_texts
from tunesmith.data.render import IGNORE, Encoded, pack
from tunesmith.data.replay import conversation_rows, mix, read_replay_file, replay_rows, with_replies
from tunesmith.models import ModelError, load_model
from tunesmith.generation.replies import cached_replies
from tunesmith.training.losses import TaskLoss
from tunesmith.training.losses import HeadCrossEntropy, decoder_inputs, plain_head, target_loss_sum
from tunesmith.models import unwrap
from tunesmith.training.anchoring import Anchor, estimate_fisher, load_fisher, save_fisher
from tunesmith.training.losses import head_kl_sum

__all__ = ["Anchor", "Mitigations", "Teacher", "build", "load_teacher", "with_replay"]


class Teacher:
    """The distillation teacher: hidden states (no gradient) and the LM head they go through.

    ``adapters_off``: ``model`` is the student itself (a PEFT model) and the teacher is it with its
    adapters disabled (PEFT's ``disable_adapter()``): the base model, without a second copy.
    Otherwise ``model`` is a separate frozen model. The teacher always runs in eval mode (no dropout)."""

    def __init__(self, model: torch.nn.Module, adapters_off: bool = False, description: str = "") -> None:
        self.model = model
        self.adapters_off = adapters_off
        self.description = description
        if not adapters_off:
            model.eval().requires_grad_(False)

    @torch.no_grad()
    def hidden(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The teacher's last hidden states (B, T, d) for ``batch``."""
        was_training = self.model.training
        self.model.eval()
        off = self.model.disable_adapter() if self.adapters_off else contextlib.nullcontext()
        with off:
            h = unwrap(self.model).get_decoder()(**decoder_inputs(batch)).last_hidden_state
        self.model.train(was_training)
        return h

    def head_weight(self) -> torch.Tensor:
        """The teacher's LM head weight (V, d)."""
        return unwrap(self.model).get_output_embeddings().weight

    @torch.no_grad()
    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Full logits (B, T, V): for tests and small checks only."""
        return self.hidden(batch) @ self.head_weight().t()


class Mitigations(TaskLoss):
    """The training objective with distillation and/or anchoring on (see the module docstring).

    ``teacher`` None: no distillation (the task loss is ``train.target_loss_sum``); ``anchor`` None:
    no anchoring. ``packing``/``max_seq_len`` must be the loop's (train.packing, train.max_seq_len):
    the distilled positions are laid out as ``collate``/``collate_packed`` lay out the rows."""

    def __init__(self, teacher: Teacher | None = None, weight: float = 0.0, temperature: float = 1.0,
                 direction: str = "forward", on: str = "replay", anchor: Anchor | None = None,
                 packing: bool = False, max_seq_len: int = 512) -> None:
        self.teacher, self.weight, self.temperature, self.direction, self.on = teacher, weight, temperature, direction, on
        self.anchor = anchor
        self.packing, self.max_seq_len = packing, max_seq_len
        self.n_distilled = 0
        self._parts: dict[str, float] = {}

    def distilled(self, e: Encoded) -> list[bool]:
        """For positions t = 0 .. len-2 of row ``e`` (position t predicts token t+1): is it distilled?
        Replay rows: their target positions (``on`` replay or both); other rows: their non-target
        positions, the prompt predicting its own next token (``on`` prompts or both)."""
        nxt = e.labels[1:]
        if e.kind == "replay":
            return [y != IGNORE for y in nxt] if self.on in ("replay", "both") else [False] * len(nxt)
        return [y == IGNORE for y in nxt] if self.on in ("prompts", "both") else [False] * len(nxt)

    def positions(self, examples: list[Encoded], shape: tuple[int, int]) -> torch.Tensor:
        """(B, T-1) bool for a batch of ``shape`` (B, T) collated from ``examples``: the hidden
        states to distil, laid out as ``render.collate`` (one row each) or ``collate_packed`` does."""
        mask = torch.zeros(shape, dtype=torch.bool)
        rows = pack([len(e.input_ids) for e in examples], self.max_seq_len) if self.packing else [[i] for i in range(len(examples))]
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                n = len(examples[i].input_ids)
                mask[r, at : at + n - 1] = torch.tensor(self.distilled(examples[i]), dtype=torch.bool)
                at += n
        return mask[:, :-1]

    def begin_step(self, examples: list[Encoded]) -> None:
        self.n_distilled = sum(sum(self.distilled(e)) for e in examples) if self.teacher is not None else 0
        self._parts = {"ce": 0.0} | ({"kl": 0.0} if self.teacher is not None else {})

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], examples: list[Encoded],
             n_targets: int) -> torch.Tensor:
        """CE / n_targets + weight * KL / n_distilled for one micro-batch (n_* over the whole step).
        The student's decoder runs once for both terms."""
        if self.teacher is None:
            ce = target_loss_sum(model, batch)[0] / n_targets
            self._parts["ce"] += float(ce.detach())
            return ce
        base = unwrap(model)
        hidden = base.get_decoder()(**decoder_inputs(batch)).last_hidden_state[:, :-1]  # (B, T-1, d)
        labels = batch["labels"][:, 1:]
        targets = labels != IGNORE
        head = base.get_output_embeddings().weight  # (V, d)
        ce = _ce_sum(hidden[targets], head, labels[targets]) / n_targets
        self._parts["ce"] += float(ce.detach())
        mask = self.positions(examples, tuple(batch["input_ids"].shape))  # (B, T-1), on the CPU
        if not bool(mask.any()):  # no replay row (or prompt) in this micro-batch: no teacher pass
            return ce
        mask = mask.to(hidden.device)
        rows = mask.any(1)
        h_teacher = self.teacher.hidden({k: v[rows] for k, v in batch.items()})[:, :-1][mask[rows]]  # (N, d)
        kl = head_kl_sum(hidden[mask], head, h_teacher, self.teacher.head_weight(), self.temperature,
                         self.direction) / max(self.n_distilled, 1)
        self._parts["kl"] += float(kl.detach())
        return ce + self.weight * kl

    def end_step(self) -> float:
        if self.anchor is None:
            return 0.0
        self._parts["anchor"] = self.anchor.add_grad()
        return self._parts["anchor"]

    def parts(self) -> dict[str, float]:
        """The last step's loss parts: ``ce`` (per target token, replay rows included), ``kl`` (per
        distilled position, before ``distill.weight``), ``anchor`` (the penalty)."""
        return dict(self._parts)


def _ce_sum(h: torch.Tensor, head: torch.Tensor, y: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Summed cross-entropy of ``h`` (N, d) through ``head`` (V, d) against ``y`` (N,): the fused
    path of ``train.target_loss_sum`` on hidden states already computed."""
    dev = h.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    with torch.autocast(dev, enabled=False):
        return HeadCrossEntropy.apply(h.to(dtype), head.to(dtype), y, chunk)


# ---------------------------------------------------------------- building from a config


def replay_source(cfg: Config) -> tuple[list[str] | None, list[Example] | None]:
    """What ``replay.data`` holds: ``(texts, None)`` for general text, ``(None, conversations)`` for
    instructions or chats. Cheap (no model): runs call it before preparing data, so a bad replay
    file fails first. Raises DataError when the file cannot be read, or holds no reply that
    ``replay.replies: data`` could use."""
    r = cfg.replay
    if r.data == INSTRUCTIONS:
        return None, [Example([{"role": "user", "content": q}], source=f"instruction {i + 1}")
                      for i, q in enumerate(train_instructions(), start=EVAL_INSTRUCTIONS)]
    if r.data == GENERAL:
        return train_texts(GENERAL), None
    texts, conversations = read_replay_file(r.data)
    if conversations is not None and r.replies == "data" and not any(
            m["role"] == "assistant" for ex in conversations for m in ex.messages):
        raise DataError(f"{r.data}: replay.replies: data, but the file has no replies (use replay.replies: base)")
    return texts, conversations


def with_replay(cfg: Config, tokenizer: Any, train_set: list[Encoded], base: torch.nn.Module | None = None,
                progress: Progress | None = None) -> tuple[list[Encoded], dict[str, Any]]:
    """The training list with ``replay.ratio`` of general data mixed in (``data/replay.py``), and
    its summary ({} when replay is off).

    General text becomes language-modelling windows; instructions (``replay.data: instructions``
    or a file of them) become conversations answered by ``base`` (``replay.replies: base``: call
    before training changes it; greedy, cached by its weights) or by the file's own replies
    (``data``). Raises DataError when the data cannot be read, or holds no reply that
    ``replies: data`` could use; ValueError when base replies are wanted and ``base`` is None."""
    r = cfg.replay
    if r.ratio <= 0:
        return train_set, {}
    texts, conversations = replay_source(cfg)
    if conversations is None:
        pool = replay_rows(tokenizer, texts or [], cfg.train.max_seq_len)
        kind = "text"
    else:
        if r.replies == "data":
            answered = conversations
        else:
            if base is None:
                raise ValueError("replay.replies: base needs the base model")
            was = base.training
            bf16 = runtime.use_bf16(cfg.train.precision, next(base.parameters()).device)
            replies = cached_replies(base, tokenizer, conversations, r.max_new_tokens, cfg.eval.batch_size, bf16, progress)
            base.train(was)
            answered = with_replies(conversations, replies)
        pool = conversation_rows(tokenizer, answered, cfg.train.max_seq_len)
        kind = f"conversations, replies by the {'base model' if r.replies == 'base' else 'data'}"
    mixed, summary = mix(train_set, pool, r.ratio, r.by, cfg.train.seed)
    return mixed, summary | {"data": r.data, "kind": kind}


def build(cfg: Config, model: torch.nn.Module, tokenizer: Any, run_dir: Path, resume: bool,
          pad_id: int) -> tuple[TaskLoss | Mitigations, dict[str, Any]]:
    """The loop's objective for ``cfg`` and a summary of what it uses (for train_result.json).

    Call with the freshly prepared model, before ``train`` loads any checkpoint: the anchor's w0
    is the weights now, and a ``base`` teacher for full fine-tuning is a frozen copy made now.
    EWC's Fisher is estimated here (or read back from the run folder on resume).
    Raises ModelError for a teacher whose vocabulary differs or a model whose logits are not
    ``lm_head(hidden)``; ValueError when there is no general text for the Fisher."""
    d, a = cfg.distill, cfg.anchor
    if d.weight <= 0 and a.method == "none":
        return TaskLoss(), {}
    summary: dict[str, Any] = {}
    teacher = None
    if d.weight > 0:
        teacher = load_teacher(d.teacher, model, tokenizer, cfg)
        summary["distill"] = {"teacher": teacher.description, "weight": d.weight, "temperature": d.temperature,
                              "direction": d.direction, "on": d.on}
    anchor = None
    if a.method != "none":
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        fisher, source = None, None
        if a.method == "ewc":
            fisher = load_fisher(run_dir) if resume else None
            source = "read back from the run folder"
            if fisher is None:
                windows = fisher_windows(cfg, tokenizer)
                fisher = estimate_fisher(model, params, windows, pad_id, runtime.use_bf16(cfg.train.precision, runtime.device()))
                save_fisher(fisher, run_dir)
                source = f"estimated on {len(windows)} windows of {a.fisher_data}"
        anchor = Anchor(params, a.strength, fisher)
        summary["anchor"] = {"method": a.method, "strength": a.strength} | ({"fisher": source} if source else {})
    objective = Mitigations(teacher, d.weight, d.temperature, d.direction, d.on, anchor, cfg.train.packing,
                            cfg.train.max_seq_len)
    return objective, summary


def fisher_windows(cfg: Config, tokenizer: Any) -> list[Encoded]:
    """``anchor.fisher_examples`` windows of ``anchor.fisher_data`` (``train.max_seq_len`` tokens),
    in an order seeded by ``train.seed``; all of them when there are fewer."""
    pool = replay_rows(tokenizer, train_texts(cfg.anchor.fisher_data), cfg.train.max_seq_len)
    g = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + 101)
    return [pool[i] for i in torch.randperm(len(pool), generator=g).tolist()[: cfg.anchor.fisher_examples]]


def load_teacher(spec: str, model: torch.nn.Module, tokenizer: Any, cfg: Config) -> Teacher:
    """The teacher ``distill.teacher`` names, for the student ``model`` (already prepared, on its device).

    ``base``: with LoRA the student with its adapters disabled; with full fine-tuning a frozen
    copy of ``model`` made now (before training: twice the weights' memory). A run folder: its
    trained model (LoRA runs: adapter merged into their base). Otherwise a model path or hub id,
    loaded through ``tunesmith.models``. Raises ModelError when the teacher's tokenizer vocabulary
    differs from the student's, or when either model's logits are not ``lm_head(hidden)``."""
    _check_plain(model, "the student")
    dev = next(model.parameters()).device
    if spec == "base":
        if hasattr(model, "disable_adapter"):
            return Teacher(model, adapters_off=True, description="base (the student with its adapters disabled)")
        frozen = copy.deepcopy(model)
        return Teacher(frozen, description="base (a frozen copy of the model before training)")
    folder = Path(spec)
    if (folder / "config.yaml").is_file():
        from tunesmith.models import uses_head

        theirs = load_config(folder / "config.yaml")
        if uses_head(theirs):
            raise ModelError(f"distill.teacher: {spec} is a classification-head run; a teacher must predict next tokens")
        if (folder / "adapter").is_dir():
            from tunesmith.methods import lora

            base, their_tok = load_model(theirs.model)
            teacher_model = lora.load(base, folder / "adapter").merge_and_unload()
            their_tok = _tokenizer_of(folder / "adapter", their_tok)
        elif (folder / "model").is_dir():
            teacher_model, their_tok = load_model(str(folder / "model"))
        else:
            raise ModelError(f"distill.teacher: {spec} is a run folder without a trained adapter/ or model/")
    else:
        teacher_model, their_tok = load_model(spec)
    if their_tok.get_vocab() != tokenizer.get_vocab():
        raise ModelError(f"distill.teacher: {spec}'s tokenizer vocabulary differs from the student's "
                         f"({len(their_tok)} vs {len(tokenizer)} tokens, or other ids): the KL compares "
                         "distributions over the same token ids, so the teacher must share the tokenizer")
    _check_plain(teacher_model, f"the teacher {spec}")
    teacher = Teacher(teacher_model.to(dev), description=spec)
    v_s = unwrap(model).get_output_embeddings().weight.shape[0]
    if teacher.head_weight().shape[0] != v_s:
        raise ModelError(f"distill.teacher: {spec} predicts {teacher.head_weight().shape[0]} token ids, the student {v_s}")
    return teacher


def _tokenizer_of(folder: Path, fallback: Any) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError):
        return fallback


def _check_plain(model: torch.nn.Module, who: str) -> None:
    """Distillation runs the LM head on chosen hidden states: logits must be exactly a bias-free
    ``lm_head(hidden)``."""
    base = unwrap(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if not plain_head(base) or type(head) is not torch.nn.Linear or head.bias is not None:
        raise ModelError(f"distill: {who} ({type(base).__name__}) does not compute its logits as a plain linear "
                         "LM head on the last hidden state (soft-capping, scaling, a bias or an adapted head); "
                         "distillation is not supported for it")
