"""Data: read files, prepare them (clean, de-duplicate, label, split), render with the chat template.

Names are imported lazily, so ``import tunesmith.data.dedup`` (or ``prepare``) does not pull
in torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

from tunesmith.data.formats import DataError, Example

_LAZY = {
    "IGNORE": "render", "Encoded": "render", "collate": "render", "encode": "render", "encode_all": "render", "encode_for_head": "render",
    "Splits": "prepare", "load_splits": "prepare", "prepare": "prepare", "load_examples": "layouts",
}
__all__ = ["DataError", "Example", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"tunesmith.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'tunesmith.data' has no attribute {name!r}")
