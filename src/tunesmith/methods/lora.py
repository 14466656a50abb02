"""LoRA through PEFT: low-rank adapters on the chosen linear layers, base weights frozen."""

from __future__ import annotations

from pathlib import Path

import peft
import torch

from tunesmith.config import Config

ARTIFACT = "adapter"


def prepare(model: torch.nn.Module, cfg: Config) -> peft.PeftModel:
    settings = peft.LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(model, settings)


def load(base: torch.nn.Module, adapter_dir: Path) -> peft.PeftModel:
    """Attach a saved adapter to a freshly loaded base model."""
    return peft.PeftModel.from_pretrained(base, str(adapter_dir))
