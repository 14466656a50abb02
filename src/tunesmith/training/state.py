"""The training loop's state: where the run is and what it has learnt of itself (``state.json`` in
every checkpoint, besides the weights, the optimizer, the scheduler and the RNG)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class LoopState:
    """``step``: optimizer steps done. ``epoch``, ``epoch_step``, ``per_step``, ``rest``: the data
    position (``loop.EpochPlan``; ``rest``: the epoch's examples not yet trained, in order, after a
    change of step size). ``best_val_loss``/``best_step``: the best validation so far;
    ``bad_evals``/``patience_ref``: early stopping's count and the loss it counts from.
    ``target_tokens``, ``train_seconds``: totals. The fingerprints: the data the position and the
    best loss refer to (a resume on other data re-plans and re-validates)."""

    step: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    patience_ref: float | None = None
    target_tokens: int = 0
    train_seconds: float = 0.0
    epoch: int | None = 0  # None: a checkpoint of a version that saved only the step count (EpochPlan.resume places it)
    epoch_step: int = 0
    per_step: int | None = None
    rest: list[int] | None = None
    val_fingerprint: str | None = None
    train_fingerprint: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, saved: dict[str, Any]) -> LoopState:
        """The state a checkpoint saved (keys of other versions ignored; missing ones as that
        version meant them)."""
        known = {f.name for f in fields(cls)}
        state = cls(**{k: v for k, v in saved.items() if k in known})
        if "patience_ref" not in saved:  # checkpoints written before this key existed count from the best loss
            state.patience_ref = state.best_val_loss
        if "epoch" not in saved:
            state.epoch = None
        return state
