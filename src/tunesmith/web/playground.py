"""The chat playground's models: one run (and its base model) loaded at a time with the serving code,
so the playground answers exactly as ``tunesmith serve`` would (same chat template, same engine,
same streaming). Loading happens on first use; choosing another run unloads the previous one.
"""

from __future__ import annotations

import threading
from pathlib import Path

from tunesmith.deploy.loading import load_for_serving, run_config, run_kind
from tunesmith.deploy.server import OpenAIServing, ServeSettings


class Playground:
    """Holds the ``OpenAIServing`` of the one run being chatted with."""

    def __init__(self, max_tokens: int = 512) -> None:
        self.lock = threading.Lock()
        self.run_dir: Path | None = None
        self.serving: OpenAIServing | None = None
        self.settings = ServeSettings(max_tokens=max_tokens, max_batch_size=8, max_waiting=16)

    def load(self, run_dir: Path) -> tuple[OpenAIServing, str, str]:
        """The serving of ``run_dir`` (loaded now unless already held), the base model's served name
        and the run's. Raises RunError/ModelError/ServeError from loading (a classifier-head or
        prompt run cannot chat)."""
        with self.lock:
            if self.run_dir != run_dir or self.serving is None:
                self.close_locked()
                cfg = run_config(run_dir)
                full = run_kind(cfg) == "full"
                self.serving = OpenAIServing(load_for_serving([run_dir], base=cfg.model if full else None), self.settings)
                self.run_dir = run_dir
            serving = self.serving
        base = next(m.name for m in serving.models.values() if m.name != run_dir.name and m.parent is None)
        return serving, base, run_dir.name

    def close_locked(self) -> None:
        if self.serving is not None:
            self.serving.shutdown(drain=False, timeout=5)
        self.serving, self.run_dir = None, None

    def close(self) -> None:
        with self.lock:
            self.close_locked()
