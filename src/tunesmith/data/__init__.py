"""Data: read files, map rows to conversations, split, render with the chat template."""

from __future__ import annotations

import random
from dataclasses import dataclass

from tunesmith.config import DataConfig
from tunesmith.data.formats import DataError, Example, read_table
from tunesmith.data.layouts import detect_layout, rows_to_examples
from tunesmith.data.render import IGNORE, Encoded, collate, encode, encode_all

__all__ = [
    "DataError", "Example", "Encoded", "IGNORE", "Splits",
    "collate", "encode", "encode_all", "load_examples", "load_splits",
]


@dataclass
class Splits:
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    notes: list[str]  # how each split was made, for the report


def load_examples(path: str, data: DataConfig, task: str) -> list[Example]:
    """Read a file, detect (or take) its layout, and map its rows onto examples."""
    table = read_table(path, data.format, data.skip_bad_rows)
    layout = detect_layout(table, data.layout, data.columns, task)
    labels = data.labels if task == "classification" else None
    return rows_to_examples(table, layout, labels, data.system_prompt, data.skip_bad_rows)


def load_splits(data: DataConfig, task: str, seed: int = 0) -> Splits:
    """Train / validation / test examples as the config describes.

    Without a validation file, ``validation_size`` of the training rows (a fraction below 1,
    else a count) is held out by a seeded shuffle. Without a test file, the test split is the
    validation split.
    """
    notes = []
    train = load_examples(data.train, data, task)
    if data.validation:
        validation = load_examples(data.validation, data, task)
        notes.append(f"validation: {data.validation}")
    else:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        size = data.validation_size
        n_val = int(round(len(train) * size)) if size < 1 else int(size)
        if not 1 <= n_val < len(train):
            raise DataError(
                f"{data.train}: cannot hold out {n_val} of {len(train)} rows for validation; "
                "set data.validation_size or give data.validation"
            )
        held = set(order[:n_val])
        validation = [train[i] for i in order[:n_val]]
        train = [ex for i, ex in enumerate(train) if i not in held]
        notes.append(f"validation: {n_val} rows held out of {data.train} (seed {seed})")
    if data.test:
        test = load_examples(data.test, data, task)
        notes.append(f"test: {data.test}")
    else:
        test = validation
        notes.append("test: the validation split (no data.test given)")
    train = _cap(train, data.max_train_examples, seed)
    validation = _cap(validation, data.max_validation_examples, seed)
    test = test[: data.max_test_examples] if data.max_test_examples else test
    return Splits(train, validation, test, notes)


def _cap(examples: list[Example], n: int | None, seed: int) -> list[Example]:
    """A seeded random subset of ``n`` examples (all when ``n`` is None or larger)."""
    if not n or n >= len(examples):
        return examples
    idx = sorted(random.Random(seed + 1).sample(range(len(examples)), n))
    return [examples[i] for i in idx]
