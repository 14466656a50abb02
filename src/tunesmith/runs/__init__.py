"""Runs: one run's folder (``folder``: finetune, evaluate_run), the index of every run
(``index``), cost estimates before training (``estimate``), hyperparameter search
(``search``) and the trackers users already use (``trackers``)."""

from tunesmith.runs.folder import (Run, RunError, check_resume, encode, evaluate_run, finetune, macro_average,
                                   needs_chat_template, prepare_data, print_macro, print_table, ready_tokenizer,
                                   run_lock, stats_from_predictions, uses_head)

__all__ = ["Run", "RunError", "check_resume", "encode", "evaluate_run", "finetune", "macro_average",
           "needs_chat_template", "prepare_data", "print_macro", "print_table", "ready_tokenizer", "run_lock",
           "stats_from_predictions", "uses_head"]
