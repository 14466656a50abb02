"""Full fine-tuning: every weight trains."""

from __future__ import annotations

import torch

from tunesmith.config import Config

ARTIFACT = "model"


def prepare(model: torch.nn.Module, cfg: Config) -> torch.nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model
