"""tunesmith: fine-tune pretrained language models on your task and data, and prove the result.

The library is the product; the ``tunesmith`` command is a thin layer over these calls::

    from tunesmith import load_config, finetune, evaluate_run
    cfg = load_config("examples/sst2.yaml", overrides=["train.max_steps=20"])
    run = finetune(cfg)              # trains, saves, evaluates against the base model
    print(run.eval["tuned"]["accuracy"])
"""

import tunesmith.runtime  # noqa: F401  first: it chooses how OpenMP threads wait, before torch starts them

from tunesmith.config import Config, ConfigError, load_config  # noqa: E402
from tunesmith.data import DataError  # noqa: E402
from tunesmith.models import ModelError, load_model  # noqa: E402
from tunesmith.runs import Run, RunError, evaluate_run, finetune  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "Config", "ConfigError", "DataError", "ModelError", "Run", "RunError",
    "evaluate_run", "finetune", "load_config", "load_model",
]
