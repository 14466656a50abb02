"""tunesmith: fine-tune pretrained language models on your task and data, and prove the result.

The library is the product; the ``tunesmith`` command is a thin layer over these calls::

    from tunesmith import load_config, finetune, evaluate_run
    cfg = load_config("examples/sst2.yaml", overrides=["train.max_steps=20"])
    run = finetune(cfg)              # trains, saves, evaluates against the base model
    print(run.eval["tuned"]["accuracy"])
"""

from tunesmith.config import Config, ConfigError, load_config
from tunesmith.data import DataError
from tunesmith.models import ModelError, load_model
from tunesmith.runs import Run, RunError, evaluate_run, finetune

__version__ = "0.1.0"
__all__ = [
    "Config", "ConfigError", "DataError", "ModelError", "Run", "RunError",
    "evaluate_run", "finetune", "load_config", "load_model",
]
