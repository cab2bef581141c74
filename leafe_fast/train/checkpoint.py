"""Checkpoints that resume exactly, and a safetensors export transformers can load.

A checkpoint is a directory ``<root>/step_<n>/`` holding model, optimizer and scheduler state, the
trainer's own state (step, data position, seeds) and every RNG (python, numpy, torch CPU and CUDA).
It is written under a temporary name and renamed when complete, and ``<root>/latest`` is replaced
atomically after it, so a crash mid-save leaves the previous checkpoint intact and never a half one.

Single process: one ``state.pt`` (``torch.save``). Under FSDP2: ``torch.distributed.checkpoint`` (each
rank writes its shards; the optimizer state is resharded on load) plus one RNG file per rank.

A checkpoint that cannot be read (missing, truncated or foreign files) is a :class:`UserError` naming
the file and what to do, not a traceback from deep inside ``torch.load``.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from leafe_fast.errors import UserError

LATEST = "latest"


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank() -> int:
    return dist.get_rank() if _is_dist() else 0


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(tuple(state["python"]) if not isinstance(state["python"], tuple) else state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fix_python_rng(obj):
    # random.getstate() is (version, tuple_of_ints, gauss); a round trip may turn tuples into lists.
    v, internal, gauss = obj
    return (v, tuple(internal), gauss)


def save_checkpoint(
    root: str | Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    train_state: dict[str, Any],
    keep_last: int | None = 2,
) -> Path:
    """Write ``root/step_<step>`` atomically and point ``root/latest`` at it; returns its path.

    An ``OSError`` (a full disk, a quota, a vanished folder) removes the partial ``.tmp_step_*`` and is a
    :class:`UserError` naming the checkpoint folder: ``latest`` still points at the previous complete
    checkpoint, from which ``--resume`` continues exactly.
    """
    root = Path(root)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    rank = _rank()
    try:
        _save(root, final, tmp, rank, model=model, optimizer=optimizer, scheduler=scheduler,
              train_state=train_state, keep_last=keep_last)
    except OSError as exc:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            with contextlib.suppress(OSError):
                (root / (LATEST + ".tmp")).unlink(missing_ok=True)
        prev = latest_checkpoint(root) if root.is_dir() else None
        kept = f"the newest complete checkpoint, {prev.name}, is kept" if prev else "no earlier checkpoint exists"
        raise UserError(str(final), f"the checkpoint could not be written ({exc.strerror or exc}); {kept}",
                        "free disk space (or pass another --out), then rerun with --resume"
                        if prev else "free disk space (or pass another --out) and run again") from exc
    return final


def _save(root: Path, final: Path, tmp: Path, rank: int, *, model: nn.Module, optimizer: torch.optim.Optimizer,
          scheduler: Any, train_state: dict[str, Any], keep_last: int | None) -> None:
    """:func:`save_checkpoint`'s writes: everything into ``tmp``, renamed to ``final``, then ``latest``."""
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    if _is_dist():
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        dist.barrier()
        msd, osd = get_state_dict(model, optimizer)
        dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(tmp))
        _torch_save(rng_state(), tmp / f"rng_rank{rank}.pt")
        if rank == 0:
            _torch_save({"scheduler": scheduler.state_dict(), "train_state": train_state}, tmp / "meta.pt")
        dist.barrier()
    else:
        _torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "train_state": train_state, "rng": rng_state()},
                    tmp / "state.pt")
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_latest(root, final.name)
        if keep_last:
            for old in sorted(root.glob("step_*"))[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    if _is_dist():
        dist.barrier()


def _torch_save(obj: Any, file: Path) -> None:
    """``torch.save`` through a Python file, synced: a full disk is then an ``OSError`` (ENOSPC) rather than
    torch's ``RuntimeError`` from its C++ writer, and the bytes are on disk before the rename publishes them."""
    with open(file, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as exc:  # its zip writer, closing after a failed write, raises over the OSError
            if isinstance(exc.__context__, OSError):
                raise exc.__context__ from exc
            raise
        f.flush()
        os.fsync(f.fileno())


def _write_latest(root: Path, name: str) -> None:
    tmp = root / (LATEST + ".tmp")
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (None when there is none)."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.exists():
        cand = root / pointer.read_text().strip()
        if cand.is_dir():
            return cand
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    return steps[-1] if steps else None


def _check_same_model(path: Path, model: torch.nn.Module, saved: dict[str, Any]) -> None:
    """A checkpoint of another model (changed --model or --tiny-style) is the user's mistake: refused before
    anything is restored, with the parameter names, not load_state_dict's traceback."""
    own = model.state_dict()
    missing = sorted(set(own) - set(saved))
    unexpected = sorted(set(saved) - set(own))
    reshaped = sorted(k for k in set(own) & set(saved)
                      if hasattr(saved[k], "shape") and tuple(own[k].shape) != tuple(saved[k].shape))
    if missing or unexpected or reshaped:
        example = (missing or unexpected or reshaped)[0]
        raise UserError(f"--resume {path}", f"was trained with another model ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected, {len(reshaped)} reshaped parameters, e.g. {example})",
                        "pass the --model (and --tiny-style) of that run, or start a new run in another --out")


def load_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    restore_rng: bool = True,
    validate: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Restore everything saved by :func:`save_checkpoint` in place; returns the trainer state.

    ``validate(train_state)`` runs before anything is restored: when it raises (a resume that would read
    another packing), the model, optimizer, scheduler and RNGs are untouched.
    """
    path = Path(path)
    fix = (f"delete {path} to resume from an earlier checkpoint (the pointer falls back to the newest complete "
           "one), or pass --resume with another checkpoint directory")
    if not path.is_dir():
        raise UserError(f"--resume {path}", "is not a checkpoint directory" if path.exists() else
                        "the checkpoint directory does not exist",
                        "pass a step_* directory written by `leafe-fast train`, or --resume alone for the latest")
    if _is_dist():
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        if not (path / ".metadata").exists():
            raise UserError(str(path), "is not a distributed checkpoint (no .metadata; was it written by one "
                            "process?)", "resume with the number of ranks that wrote it, or " + fix)
        meta = _load_file(path / "meta.pt", ("scheduler", "train_state"), fix)
        if validate is not None:
            validate(meta["train_state"])
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optimizer": osd}
        try:
            dcp.load(state, checkpoint_id=str(path))
        except Exception as exc:  # torch raises CheckpointException wrapping each rank's error
            raise UserError(str(path), f"the distributed checkpoint cannot be read ({_first_line(exc)})",
                            fix) from exc
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        scheduler.load_state_dict(meta["scheduler"])
        rng_file = path / f"rng_rank{_rank()}.pt"
        if restore_rng and rng_file.exists():
            st = _load_file(rng_file, ("python", "numpy", "torch"), fix)
            st["python"] = _fix_python_rng(st["python"])
            set_rng_state(st)
        return meta["train_state"]
    state = _load_file(path / "state.pt", ("model", "optimizer", "scheduler", "train_state", "rng"),
                       "it was written by a distributed run: resume it under torchrun with the same ranks"
                       if (path / ".metadata").exists() else fix)
    if validate is not None:
        validate(state["train_state"])
    _check_same_model(path, model, state["model"])
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        state["rng"]["python"] = _fix_python_rng(state["rng"]["python"])
        set_rng_state(state["rng"])
    return state["train_state"]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def _load_file(file: Path, keys: tuple[str, ...], fix: str) -> dict[str, Any]:
    """``torch.load`` of one checkpoint file, or a one-line :class:`UserError` when it is missing/damaged."""
    if not file.is_file():
        raise UserError(str(file), "is missing (the checkpoint is incomplete)", fix)
    try:
        state = torch.load(file, weights_only=False, map_location="cpu")
    except Exception as exc:  # truncated zip, unpickling error, EOF: all mean "damaged file"
        raise UserError(str(file), f"is truncated or damaged ({type(exc).__name__}: {_first_line(exc)})",
                        fix) from exc
    missing = [k for k in keys if not isinstance(state, dict) or k not in state]
    if missing:
        raise UserError(str(file), f"is not a leafe-fast checkpoint file (missing {missing})", fix)
    return state


def export_pretrained(
    wrapper: nn.Module,
    hf_model: nn.Module,
    out_dir: str | Path,
    *,
    tokenizer: Any = None,
    prefix: str = "model.",
) -> Path | None:
    """Save ``hf_model`` as safetensors + config (+ tokenizer) loadable by ``from_pretrained``.

    ``wrapper`` is the module whose state dict holds the weights (FSDP-sharded or not) under ``prefix``;
    under FSDP2 the full state dict is gathered to rank 0 on the CPU. The directory appears atomically.
    The saved config names stock SDPA attention, so transformers loads it without leafe-fast.
    """
    out_dir = Path(out_dir)
    if _is_dist():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(wrapper, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        full = {k: v.detach().cpu() for k, v in wrapper.state_dict().items()}
    if _rank() != 0:
        dist.barrier()
        return None
    sd = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)} if prefix else full
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    impl = hf_model.config._attn_implementation
    hf_model.config._attn_implementation = "sdpa"
    try:
        hf_model.save_pretrained(tmp, state_dict=sd)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except Exception as exc:  # a full disk: no half-written model folder left, one line naming it
        shutil.rmtree(tmp, ignore_errors=True)
        # safetensors reports a failed write as SafetensorError("... I/O error: <os error>"), not OSError
        if not (isinstance(exc, OSError) or (type(exc).__name__ == "SafetensorError" and "I/O error" in str(exc))):
            raise
        why = exc.strerror if isinstance(exc, OSError) else str(exc).split("I/O error:")[-1].strip()
        raise UserError(str(out_dir), f"the trained model could not be written ({why or exc})",
                        "free disk space (or pass another --out) and run again") from exc
    finally:
        hf_model.config._attn_implementation = impl
    if _is_dist():
        dist.barrier()
    return out_dir
