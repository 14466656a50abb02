"""General data: text and instructions that say what a model knew before it was tuned.

Used by the forgetting check (``eval.general``), replay (``replay.data``) and EWC's Fisher
estimate (``anchor.fisher_data``). ``general`` names the set shipped in the package
(``resources/general/``: 30 Wikipedia articles and 128 everyday instructions); both are split so
that what is scored is never what is trained on: the first ``EVAL_ARTICLES`` articles and
``EVAL_INSTRUCTIONS`` instructions are scored, the rest are replayed (``replay.data: general`` /
``instructions``). Any other value is a file of the user's own general text, read
by tunesmith's data readers (a text file: one text per line; JSONL/JSON/CSV/Parquet: the
``text`` column, or the only column).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from tunesmith.config import GENERAL
from tunesmith.data.formats import DataError, read_table

EVAL_ARTICLES = 8  # articles 1-8 of the shipped set are scored; 9-30 are for training (replay, Fisher)
EVAL_INSTRUCTIONS = 16  # instructions 1-16 are scored (eval.general_instructions at most); 17-128 are for replay


def _shipped(name: str) -> Path:
    return Path(str(resources.files("tunesmith") / "resources" / "general" / name))


def articles() -> list[str]:
    """The shipped Wikipedia articles (30), in file order."""
    return [line.strip() for line in _shipped("wiki_30_articles.txt").read_text(encoding="utf-8").splitlines()
            if line.strip()]


def instructions() -> list[str]:
    """The shipped general instructions (128), in file order."""
    lines = _shipped("instructions.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["instruction"] for line in lines if line.strip()]


def eval_texts(spec: str) -> list[str]:
    """General texts to score for forgetting: the held-out shipped articles, or a user's file.

    Raises DataError naming the file when it cannot be read or holds no text column."""
    return articles()[:EVAL_ARTICLES] if spec == GENERAL else read_texts(spec)


def train_texts(spec: str) -> list[str]:
    """General texts to train on (replay) or estimate a Fisher from: the shipped articles not
    scored by ``eval_texts(GENERAL)``, or a user's file (all of it)."""
    return articles()[EVAL_ARTICLES:] if spec == GENERAL else read_texts(spec)


def eval_instructions(count: int) -> list[str]:
    """The first ``count`` (at most ``EVAL_INSTRUCTIONS``) shipped instructions: the scored ones."""
    return instructions()[: min(count, EVAL_INSTRUCTIONS)]


def train_instructions() -> list[str]:
    """The shipped instructions never scored by the forgetting check (112): for replay."""
    return instructions()[EVAL_INSTRUCTIONS:]


def read_texts(path: str) -> list[str]:
    """Every non-empty text in a file of general text (see the module docstring for the layouts)."""
    table = read_table(path)
    columns = table.columns
    if table.format == "text":
        column = columns[0]
    elif "text" in columns:
        column = "text"
    elif len(columns) == 1:
        column = columns[0]
    else:
        raise DataError(f"{path}: general text needs a 'text' column (or a single column); found {', '.join(columns)}")
    texts = [str(r.values.get(column) or "").strip() for r in table.rows]
    texts = [t for t in texts if t]
    if not texts:
        raise DataError(f"{path}: no general text found in column {column!r}")
    return texts
