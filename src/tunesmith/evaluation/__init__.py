"""Evaluation: task metrics against the base model, kept resumable (``answers``).

(The evaluation code still lives in ``tunesmith.evaluation.evaluate``, ``metrics``, ``forgetting`` and
``learning_curve``; it moves here with the package layout of shared/docs/design.md.)
"""
