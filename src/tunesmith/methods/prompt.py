"""Prompt engineering as a method: no weight changes; the system prompt and ``k`` solved
examples from the training split go into each question's conversation, as earlier turns.

``selection: random`` puts the same ``k`` examples (drawn with the run's seed) before every
question; ``similar`` picks, for each question, the ``k`` training examples whose user turns
are closest by TF-IDF cosine similarity (word 1-2 grams), the most similar one last, next to
the question. The result is scored by exactly the code that scores tuned models.
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunesmith.config import Config
from tunesmith.data.formats import Example
from tunesmith.io import atomic_write_json

ARTIFACT = "prompt"


def prepare(model: torch.nn.Module, cfg: Config) -> torch.nn.Module:
    """Nothing trains."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def choose_shots(train: list[Example], questions: list[Example], k: int, selection: str, seed: int) -> list[list[Example]]:
    """The shots for each question (a list per question)."""
    pool = [ex for ex in train if ex.text is None and any(m["role"] == "assistant" for m in ex.messages)]
    k = min(k, len(pool))
    if k == 0:
        return [[] for _ in questions]
    if selection == "random":
        picked = random.Random(seed).sample(pool, k)
        return [picked for _ in questions]
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    pool_m = vectorizer.fit_transform([_user_text(ex) for ex in pool])  # rows are L2-normalised
    out = []
    for i in range(0, len(questions), 256):  # (256, pool) similarities at a time
        q = vectorizer.transform([_user_text(ex) for ex in questions[i : i + 256]])
        sims = (q @ pool_m.T).toarray()
        for row in sims:
            top = np.argsort(-row, kind="stable")[:k]
            out.append([pool[j] for j in reversed(top)])  # most similar last: next to the question
    return out


def with_shots(example: Example, shots: list[Example]) -> Example:
    """``example`` with the shots' user/assistant turns between its system prompt and its question."""
    system = [m for m in example.messages if m["role"] == "system"]
    turns = [m for shot in shots for m in shot.messages if m["role"] != "system"]
    return replace(example, messages=system + turns + [m for m in example.messages if m["role"] != "system"])


def apply(cfg: Config, train: list[Example], questions: list[Example]) -> list[Example]:
    """The questions as the prompt method asks them."""
    shots = choose_shots(train, questions, cfg.prompt.shots, cfg.prompt.selection, cfg.train.seed)
    return [with_shots(q, s) for q, s in zip(questions, shots)]


def save(cfg: Config, train: list[Example], run_dir: Path) -> Path:
    """Write ``prompt/prompt.json``: the settings and, for random selection, the shots themselves."""
    out = Path(run_dir) / ARTIFACT
    out.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"shots": cfg.prompt.shots, "selection": cfg.prompt.selection, "seed": cfg.train.seed,
                           "system_prompt": cfg.data.system_prompt}
    if cfg.prompt.selection == "random":
        doc["examples"] = [s.messages for s in choose_shots(train, [Example([])], cfg.prompt.shots, "random", cfg.train.seed)[0]]
    atomic_write_json(out / "prompt.json", doc)
    return out


def _user_text(ex: Example) -> str:
    users = [m["content"] for m in ex.messages if m["role"] == "user"]
    return users[-1] if users else ""
