"""Runs: one run's folder (``folder``: finetune, evaluate_run), its data (``data``), several
methods compared (``compare``), the index of every run (``index``), cost estimates before
training (``estimate``), hyperparameter search (``search``) and the trackers users already use
(``trackers``)."""

from tunesmith.runs.data import prepare_data
from tunesmith.runs.errors import RunError
from tunesmith.runs.folder import (Run, check_resume, evaluate_run, finetune, macro_average, print_macro, print_table,
                                   run_lock, stats_from_predictions)

__all__ = ["Run", "RunError", "check_resume", "evaluate_run", "finetune", "macro_average", "prepare_data",
           "print_macro", "print_table", "run_lock", "stats_from_predictions"]
