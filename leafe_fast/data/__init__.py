"""Tree I/O (``schema``), token-level chat templating (``chat``), the sample containers (``columns``)
and tree -> training samples by recipe (``recipes``).

``build_samples`` and friends, ``Sample``/``SampleColumns`` and ``ChatFormat`` load on first use, so
reading trees does not import the chat/tokenizer stack.
"""

from __future__ import annotations

from leafe_fast._lazy import lazy_getattr

from leafe_fast.data.schema import SCHEMA, Node, Tree, TreeFormatError, TreeWriter, iter_trees, read_trees

_LAZY = {
    "build_samples": "leafe_fast.data.recipes",
    "build_samples_with_stats": "leafe_fast.data.recipes",
    "BuildStats": "leafe_fast.data.recipes",
    "BuildConfig": "leafe_fast.data.recipes",
    "build_recipe": "leafe_fast.data.recipes",
    "RECIPES": "leafe_fast.data.recipes",
    "GROUP_NAMES": "leafe_fast.data.columns",
    "Sample": "leafe_fast.data.columns",
    "SampleColumns": "leafe_fast.data.columns",
    "ChatFormat": "leafe_fast.data.chat",
}

__all__ = ["SCHEMA", "Node", "Tree", "TreeFormatError", "TreeWriter", "iter_trees", "read_trees", *_LAZY]


__getattr__ = lazy_getattr(__name__, _LAZY)
