"""The operand record every op set of the fused LM-head cross-entropy takes (torch and Triton alike).

One ``LossHead`` replaces the 12-13 positional arguments (with positional booleans) the op functions
used to take; ``GradNeeds`` says which gradients a pass must produce. Both are plain NamedTuples so the
launchers can unpack them cheaply and tests can build them by keyword.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class LossHead(NamedTuple):
    """``hidden[rows] @ weight.T (+ bias)``, soft-capped, scored against ``targets``, with ``z_loss * lse**2``."""

    hidden: torch.Tensor  # [N, H]
    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None  # [V]
    rows: torch.Tensor  # int64 [M], may repeat
    targets: torch.Tensor  # int64 [M]
    softcap: float | None = None  # None: no cap
    z_loss: float = 0.0

    @property
    def m(self) -> int:
        return self.rows.numel()

    @property
    def v(self) -> int:
        return self.weight.shape[0]

    @property
    def d(self) -> int:
        return self.hidden.shape[1]


class GradNeeds(NamedTuple):
    """Which gradients a pass computes (bias only when there is one)."""

    hidden: bool = True
    weight: bool = True
    bias: bool = False

    @property
    def any(self) -> bool:
        return self.hidden or self.weight or self.bias


NO_GRADS = GradNeeds(False, False, False)
