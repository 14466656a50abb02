"""Methods turn a base model into what the training loop runs.

Each method module offers ``prepare(model, cfg) -> model`` and names its saved ``ARTIFACT`` folder.
The loop itself only needs the parameters with ``requires_grad`` set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tunesmith.config import Config
from tunesmith.io import atomic_dir
from tunesmith.methods import full, lora, prompt

METHODS = {"lora": lora, "full": full, "prompt": prompt}


def prepare(model: torch.nn.Module, cfg: Config) -> torch.nn.Module:
    """Apply ``cfg.method`` to ``model`` and return the model to train."""
    return METHODS[cfg.method].prepare(model, cfg)


def save_final(model: torch.nn.Module, tokenizer: Any, cfg: Config, run_dir: Path) -> Path:
    """Write the trained artifact (``adapter/`` or ``model/``) into the run folder, atomically."""
    out = Path(run_dir) / METHODS[cfg.method].ARTIFACT

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    atomic_dir(out, fill)
    return out


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, tied weights counted once."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
