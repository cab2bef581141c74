"""Checks of command-line inputs shared by several commands (a model directory, a torch device).

Each raises :class:`~leafe_fast.errors.UserError` naming the flag, before anything expensive loads,
so a wrong ``--model`` or ``--device`` is one line (exit 2 from the CLI) instead of a traceback from
transformers or torch after the environment and output file are already set up.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import IO, Any, Iterator

from leafe_fast.errors import UserError

_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_TOKENIZER = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tokenizer.tiktoken")


def check_model_dir(path: str | Path, flag: str = "--model", *, tokenizer: bool = True) -> Path:
    """A local transformers model directory: ``config.json``, weights and (if ``tokenizer``) a tokenizer.

    Limits: checks that the files exist, not that they are complete; a damaged weights file still
    fails inside transformers."""
    path = Path(path)
    fix = "pass a folder written by `leafe-fast train` (runs/x/final) or save_pretrained"
    if not path.is_dir():
        raise UserError(flag, f"{path} is not a local model directory", fix)
    if not (path / "config.json").is_file():
        raise UserError(flag, f"{path} has no config.json", fix)
    _check_config(path / "config.json", flag, fix)
    if not any((path / name).is_file() for name in _WEIGHTS):
        raise UserError(flag, f"{path} has no weights (none of {', '.join(_WEIGHTS)})", fix)
    if tokenizer and not any((path / name).is_file() for name in _TOKENIZER):
        raise UserError(flag, f"{path} has no tokenizer (none of {', '.join(_TOKENIZER)})",
                        "save the tokenizer into the model folder (tokenizer.save_pretrained)")
    return path


def _check_config(config: Path, flag: str, fix: str) -> None:
    """config.json is a JSON object whose ``model_type`` this transformers knows (read, nothing loaded)."""
    import json

    try:
        data = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(flag, f"{config} is not readable JSON ({e})", fix) from None
    if not isinstance(data, dict):
        raise UserError(flag, f"{config} is not a JSON object", fix)
    model_type = data.get("model_type")
    if model_type is None:
        return  # transformers decides (some configs name only an architecture)
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise UserError(flag, f"{config}: model_type {model_type!r} is unknown to the installed transformers",
                        "use a model of a supported architecture, or upgrade transformers")


def check_device(device: str | None, flag: str = "--device") -> None:
    """A torch device string this machine has (None: the command picks one)."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(flag, f"{device!r} is not a torch device", "pass cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(flag, f"{device}: CUDA is not available on this machine", "pass --device cpu")
        if dev.index is not None and dev.index >= count:
            raise UserError(flag, f"{device}: this machine has {count} CUDA device(s)",
                            f"pass cuda:0 .. cuda:{count - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(flag, f"{device}: MPS is not available on this machine", "pass --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise UserError(flag, f"device type {dev.type!r} is not supported", "pass cpu or cuda")


def check_out_path(path: str | Path, flag: str = "--out", *, folder: bool = False) -> Path:
    """An output path that can be written: no folder above it is a file, and it is a file path (or,
    with ``folder``, a folder path) rather than the other kind. Parents that do not exist are fine
    (the commands create them)."""
    path = Path(path)
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise UserError(flag, f"{path}: {parent} is a file, not a folder", "pass a path under a folder")
    if folder and path.exists() and not path.is_dir():
        raise UserError(flag, f"{path} is a file, not a folder", "pass a folder path (it is created if missing)")
    if not folder and path.is_dir():
        raise UserError(flag, f"{path} is a directory", "pass a file path")
    if not folder and path.exists() and not path.is_file():  # tmp + rename would replace /dev/null itself
        raise UserError(flag, f"{path} is not a regular file (a device, pipe or socket)", "pass a file path")
    return path


def lock_or_refuse(f: IO[Any], where: str) -> None:
    """Exclusive ``flock`` on the open file ``f`` (released when it closes or the process dies); held by
    another run: a ``UserError`` naming ``where``. No lock where ``fcntl`` does not exist."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX: no lock
        return
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UserError(where, "is in use by another run (locked)",
                        "wait for that run to finish or pass a different --out") from None


@contextlib.contextmanager
def run_folder_lock(folder: str | Path, flag: str = "--out") -> Iterator[None]:
    """Hold ``folder/.lock`` for a run that writes the folder, so a second run on it is refused instead
    of interleaving checkpoints and metrics. A folder created here and left holding only the lock is
    removed again (a run that failed before writing anything leaves nothing)."""
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / ".lock"
    with open(lock, "a") as f:
        try:
            lock_or_refuse(f, f"{flag} {folder}")
            yield
        finally:
            if created and [p.name for p in folder.iterdir()] == [".lock"]:
                lock.unlink()
                folder.rmdir()


__all__ = ["check_model_dir", "check_device", "check_out_path", "lock_or_refuse", "run_folder_lock"]
