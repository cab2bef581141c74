"""Hugging Face style labels: the ignore value and the one labels -> target-mask check.

``labels`` are aligned with ``input_ids`` (the model shifts them): ``IGNORE_INDEX`` marks context, any
other value must equal the token itself. The collator, the packer's ``columns_from_labels`` and the
loss's ``labels_to_rows`` all use this module, so "what counts as a target" is defined once.
No torch import: the packer uses it on numpy arrays.
"""

from __future__ import annotations

import numpy as np

from leafe_fast.errors import UserError

IGNORE_INDEX = -100

__all__ = ["IGNORE_INDEX", "target_mask_from_labels"]


def target_mask_from_labels(input_ids: np.ndarray, labels: np.ndarray, where: str) -> np.ndarray:
    """Boolean target mask of one sample (``labels != IGNORE_INDEX``), position 0 always False.

    ``where`` names the sample in errors (e.g. ``"LeafeCollator: row 3"``). Raises ``UserError`` when the
    shapes differ or a label is neither ``IGNORE_INDEX`` nor the input token (shifted labels, usually).
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    lab = np.asarray(labels, dtype=np.int64)
    if ids.ndim != 1 or lab.shape != ids.shape:
        raise UserError(where, f"labels has {lab.size} entries, input_ids {ids.size} (shapes {lab.shape}, {ids.shape})",
                        "give one label per input token, both 1-D")
    mask = lab != IGNORE_INDEX
    bad = np.flatnonzero(mask & (lab != ids))
    if len(bad):
        j = int(bad[0])
        raise UserError(
            where,
            f"labels[{j}] = {lab[j]} differs from input_ids[{j}] = {ids[j]} ({len(bad)} such positions)",
            f"labels must be {IGNORE_INDEX} or the token itself, aligned with input_ids (the shift happens "
            "inside the packer)",
        )
    if len(mask):
        mask[0] = False  # the first token has no predictor (HF drops it in the shift too)
    return mask
