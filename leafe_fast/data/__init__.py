"""Tree I/O, token-level chat templating, and tree -> training samples."""

from leafe_fast.data.schema import SCHEMA, Node, Tree, TreeFormatError, TreeWriter, iter_trees, read_trees

__all__ = ["SCHEMA", "Node", "Tree", "TreeFormatError", "TreeWriter", "iter_trees", "read_trees"]
