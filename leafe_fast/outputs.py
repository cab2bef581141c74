"""Result files written whole or not at all: a killed or failed run never leaves a half-written JSON.

One temporary name beside the target, renamed over it when complete; the temporary is removed when the
write fails. The commands' summary, stats and report files all go through :func:`write_json`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from leafe_fast.errors import UserError


def write_json(path: str | Path, data: Any, *, indent: int = 2, default: Callable[[Any], Any] | None = None,
               disk_full_fix: str | None = None) -> None:
    """Write ``data`` as JSON to ``path`` (parent folders created). An ``OSError`` (a full disk) is re-raised,
    or, with ``disk_full_fix``, turned into a one-line :class:`UserError` naming ``path`` with that fix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(data, indent=indent, default=default) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if disk_full_fix is None:
            raise
        raise UserError(str(path), f"could not be written ({exc.strerror or exc})", disk_full_fix) from exc


__all__ = ["write_json"]
