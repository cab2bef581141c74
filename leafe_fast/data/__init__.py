"""Tree I/O, token-level chat templating, and tree -> training samples.

``build_samples`` and friends, ``Sample``/``SampleColumns`` and ``ChatFormat`` load on first use, so
reading trees does not import the chat/tokenizer stack.
"""

from __future__ import annotations

import importlib
from typing import Any

from leafe_fast.data.schema import SCHEMA, Node, Tree, TreeFormatError, TreeWriter, iter_trees, read_trees

_LAZY = {
    "build_samples": "leafe_fast.data.samples",
    "build_samples_with_stats": "leafe_fast.data.samples",
    "BuildStats": "leafe_fast.data.samples",
    "Sample": "leafe_fast.data.sample",
    "SampleColumns": "leafe_fast.data.sample",
    "ChatFormat": "leafe_fast.data.chat",
}

__all__ = ["SCHEMA", "Node", "Tree", "TreeFormatError", "TreeWriter", "iter_trees", "read_trees", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'leafe_fast.data' has no attribute {name!r}")
