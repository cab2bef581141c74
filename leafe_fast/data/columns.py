"""Training samples: the containers between ``build_samples`` (Stage 2 data) and the packer.

A sample is one token sequence with a per-token target mask. ``target_mask[i]`` means token ``i`` is
supervised: it is predicted from the hidden state at position ``i - 1`` (the packer applies that
shift inside the sample, never across samples), so ``target_mask[0]`` is always False.

``SampleColumns`` is the columnar form the C++ packer reads without copies: one concatenated int32
token buffer plus offsets.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from leafe_fast.errors import UserError

REHEARSAL = 0
COUNTERFACTUAL = 1
GUIDED = 2  # guided continuations as their own group (only when asked: BuildConfig.guided="group")
GROUP_NAMES = ("rehearsal", "counterfactual", "guided")
"""Loss group ids -> names; the one definition (the trainer, the loss reports and the build stats use it)."""


def group_name(group: int) -> str:
    """The name of a group id (``group<k>`` past the named ones)."""
    return GROUP_NAMES[group] if 0 <= group < len(GROUP_NAMES) else f"group{group}"


@dataclass
class Sample:
    input_ids: np.ndarray  # int32 [L]
    target_mask: np.ndarray  # bool [L]; True at i: token i is a target, predicted from position i-1
    group: int = REHEARSAL  # 0 rehearsal, 1 counterfactual, 2 guided (a few more groups are allowed)
    weight: float = 1.0  # per-sample loss weight, applied to each of its target tokens
    tree_id: int = -1  # samples of one exploration tree share prefixes
    prefix_len: int = 0  # tokens this sample shares with the tree's other samples (from the start)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.input_ids = np.ascontiguousarray(self.input_ids, dtype=np.int32)
        self.target_mask = np.ascontiguousarray(self.target_mask, dtype=bool)
        if self.input_ids.ndim != 1 or self.target_mask.shape != self.input_ids.shape:
            raise ValueError(
                f"Sample: input_ids {self.input_ids.shape} and target_mask {self.target_mask.shape} "
                "must be 1-D and of equal length"
            )
        if len(self.target_mask) and self.target_mask[0]:
            raise ValueError("Sample: target_mask[0] must be False (the first token has no predictor)")

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_targets(self) -> int:
        return int(self.target_mask.sum())


@dataclass
class SampleColumns:
    """Columnar samples: sample ``j`` is ``tokens[offsets[j]:offsets[j+1]]``."""

    tokens: np.ndarray  # int32 [T]
    offsets: np.ndarray  # int64 [n+1], offsets[0] == 0, non-decreasing
    target_mask: np.ndarray  # uint8 [T]
    group: np.ndarray  # int8 [n]
    weight: np.ndarray  # float32 [n]
    tree_id: np.ndarray  # int64 [n]
    prefix_len: np.ndarray  # int32 [n]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def validate(self) -> None:
        """Shapes, dtypes and ranges (token ids >= 0, groups >= 0, finite weights); raises ValueError."""
        for name in ("tokens", "offsets", "target_mask", "group", "tree_id", "prefix_len"):
            arr = np.asarray(getattr(self, name))
            if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
                raise ValueError(f"SampleColumns: {name} must be a 1-D integer array, got {arr.dtype} {arr.shape}")
        weight = np.asarray(self.weight)
        if weight.ndim != 1 or not np.issubdtype(weight.dtype, np.floating):
            raise ValueError(f"SampleColumns: weight must be a 1-D float array, got {weight.dtype} {weight.shape}")
        if len(self.offsets) == 0:
            raise ValueError("SampleColumns: offsets is empty (it needs at least the leading 0)")
        n = len(self)
        T = len(self.tokens)
        if n < 0 or self.offsets[0] != 0 or self.offsets[-1] != T or np.any(np.diff(self.offsets) < 0):
            raise ValueError("SampleColumns: offsets must start at 0, be non-decreasing and end at len(tokens)")
        if len(self.target_mask) != T:
            raise ValueError(f"SampleColumns: target_mask has {len(self.target_mask)} entries, tokens {T}")
        for name in ("group", "weight", "tree_id", "prefix_len"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"SampleColumns: {name} has {len(getattr(self, name))} entries, samples {n}")
        # one pass over every token where the dtype already bounds one side (pack() runs this on every call)
        tok = self.tokens
        too_big = np.iinfo(tok.dtype).max > np.iinfo(np.int32).max if tok.dtype != bool else False
        signed = tok.dtype != bool and np.iinfo(tok.dtype).min < 0
        if T and ((signed and tok.min() < 0) or (too_big and tok.max() > np.iinfo(np.int32).max)):
            bad = int(tok.min()) if signed and tok.min() < 0 else int(tok.max())
            raise ValueError(f"SampleColumns: token id {bad} is outside [0, 2**31)")
        if n and self.group.min() < 0:
            raise ValueError(f"SampleColumns: group id {int(self.group.min())} is negative")
        if n and not np.all(np.isfinite(weight)):
            bad = np.flatnonzero(~np.isfinite(weight))[:5].tolist()
            raise ValueError(f"SampleColumns: samples {bad} have a weight that is not finite")
        if n and weight.min() < 0:
            bad = np.flatnonzero(weight < 0)[:5].tolist()
            raise ValueError(f"SampleColumns: samples {bad} have a negative weight")
        mask = np.asarray(self.target_mask)
        # min/max, not np.isin: this runs on every pack() call, over every token (hundreds of millions)
        if T and mask.dtype != bool and ((np.iinfo(mask.dtype).min < 0 and mask.min() < 0) or mask.max() > 1):
            raise ValueError("SampleColumns: target_mask must hold only 0 and 1")
        lengths = np.diff(self.offsets)
        if n and (np.asarray(self.prefix_len).min() < 0 or np.any(self.prefix_len > lengths)):
            bad = np.flatnonzero((self.prefix_len < 0) | (self.prefix_len > lengths))[:5].tolist()
            raise ValueError(f"SampleColumns: samples {bad} have a prefix_len outside [0, their length]")
        starts = self.offsets[:-1][lengths > 0]
        if len(starts) and np.any(self.target_mask[starts]):  # token 0 has no predictor
            bad = np.flatnonzero(lengths > 0)[np.asarray(self.target_mask[starts], bool)][:5].tolist()
            raise ValueError(f"SampleColumns: samples {bad} mark their first token as a target "
                             "(target_mask[i] means token i is predicted from token i-1)")

    @classmethod
    def from_samples(cls, samples: Sequence[Sample]) -> "SampleColumns":
        lengths = np.fromiter((len(s) for s in samples), dtype=np.int64, count=len(samples))
        offsets = np.zeros(len(samples) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        cat = (lambda xs, dt: np.concatenate(xs).astype(dt, copy=False) if xs else np.zeros(0, dt))
        return cls(
            tokens=cat([s.input_ids for s in samples], np.int32),
            offsets=offsets,
            target_mask=cat([s.target_mask for s in samples], np.uint8),
            group=np.array([s.group for s in samples], dtype=np.int8),
            weight=np.array([s.weight for s in samples], dtype=np.float32),
            tree_id=np.array([s.tree_id for s in samples], dtype=np.int64),
            prefix_len=np.array([s.prefix_len for s in samples], dtype=np.int32),
        )

    def to_samples(self) -> list[Sample]:
        out = []
        for j in range(len(self)):
            a, b = int(self.offsets[j]), int(self.offsets[j + 1])
            out.append(
                Sample(
                    self.tokens[a:b].copy(),
                    self.target_mask[a:b].astype(bool),
                    int(self.group[j]),
                    float(self.weight[j]),
                    int(self.tree_id[j]),
                    int(self.prefix_len[j]),
                )
            )
        return out

    def save(self, path: str | Path) -> None:
        """One .npz file; written to a temporary name and renamed, so a crash never leaves half a file
        (and a failed write leaves no ``.tmp`` behind)."""
        path = Path(path)
        if path.is_dir():
            raise UserError(str(path), "is a directory", "pass a file path for the samples, e.g. runs/x/samples.npz")
        if path.exists() and not path.is_file():  # the rename would replace a device or pipe
            raise UserError(str(path), "is not a regular file", "pass a file path for the samples")
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                np.savez(f, **{k: getattr(self, k) for k in self.__dataclass_fields__})
                f.flush()
                os.fsync(f.fileno())  # the data is on disk before the rename makes it visible
            tmp.replace(path)
        except BaseException as e:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            if isinstance(e, OSError):  # disk full, read-only or missing folder: the user's to fix
                raise UserError(str(path), f"cannot be written ({e.strerror or e})",
                                "check that its folder exists, is writable and has space") from None
            raise

    @classmethod
    def load(cls, path: str | Path) -> "SampleColumns":
        """Read and check a samples file; every defect of the file is a ``UserError`` naming it."""
        path = Path(path)
        fix = "pass a samples .npz written by `leafe-fast build-data`"
        if not path.exists():
            raise UserError(str(path), "does not exist", fix)
        if path.is_dir():
            raise UserError(str(path), "is a directory, not a samples file", fix)
        if path.stat().st_size == 0:
            raise UserError(str(path), "is empty", fix)
        if not zipfile.is_zipfile(path):  # np.load would read it as a pickle and blame pickling
            raise UserError(str(path), "is not a readable .npz samples file (not a zip archive)", fix)
        try:
            with np.load(path, allow_pickle=False) as z:
                missing = [k for k in cls.__dataclass_fields__ if k not in z.files]
                if missing:
                    raise UserError(str(path), f"lacks the arrays {missing}", fix)
                cols = cls(**{k: z[k] for k in cls.__dataclass_fields__})
        except UserError:
            raise
        except Exception as e:  # BadZipFile, a pickled object array, a truncated member, ...
            raise UserError(str(path), f"is not a readable .npz samples file ({type(e).__name__}: {e})", fix) from None
        try:
            cols.validate()
        except ValueError as e:
            raise UserError(str(path), str(e), fix) from None
        if len(cols) and not np.any(cols.target_mask):
            raise UserError(str(path), f"none of its {len(cols)} samples has a target token", fix)
        return cols


def concat_columns(parts: Iterable[SampleColumns]) -> SampleColumns:
    return SampleColumns.from_samples([s for p in parts for s in p.to_samples()])
