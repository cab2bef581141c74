"""The one exception type for mistakes a user can fix (bad files, configs, flags).

Every input boundary (a trees or samples file, a config, a CLI flag, a checkpoint directory) raises
:class:`UserError` with one line that names *where* (file, line, field or flag) and *what to do*.
``leafe_fast.cli.main`` prints that line and exits with status 2; any other exception is a bug and
keeps its traceback. Library users catch ``UserError`` (it is a ``ValueError``) the same way.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in the user's input, reported as one line: ``<where>: <what is wrong>; <what to do>``."""

    def __init__(self, where: str, problem: str, fix: str | None = None) -> None:
        self.where = where
        self.problem = problem
        self.fix = fix
        text = f"{where}: {problem}" if where else problem
        if fix:
            text += f"; {fix}"
        super().__init__(text)
