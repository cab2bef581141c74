"""leafe-fast: a fast trainer for LEAFE (reflective tree exploration + experience distillation).

The public API, importable from here lazily (heavy modules load on first use):

- ``leafe_loss`` / ``LeafeLoss``   fused LM head + masked two-group cross-entropy   (leafe_fast.loss)
- ``pack``                         trees' samples into varlen micro-batches         (leafe_fast.packing)
- ``explore``                      Stage-1 reflective tree exploration               (leafe_fast.explore)
- ``build_samples``                trees -> rehearsal + counterfactual samples       (leafe_fast.data)
- ``Trainer`` / ``TrainConfig``    Stage-2 trainer (one GPU or FSDP2), ``load_model`` (leafe_fast.train)
- ``pass_at_k``                    unbiased pass@k estimator                         (leafe_fast.eval)

Hugging Face Trainer / TRL users: ``leafe_fast.integrations.hf`` (``LeafeCollator``, ``LeafeLossMixin``).
"""

from __future__ import annotations

from leafe_fast._lazy import lazy_getattr

__version__ = "0.1.0"

_LAZY = {
    "leafe_loss": "leafe_fast.loss",
    "leafe_loss_from_labels": "leafe_fast.loss",
    "group_norms": "leafe_fast.loss",
    "LeafeLoss": "leafe_fast.loss",
    "pack": "leafe_fast.packing",
    "explore": "leafe_fast.explore",
    "ExploreConfig": "leafe_fast.explore",
    "build_samples": "leafe_fast.data",
    "Trainer": "leafe_fast.train",
    "TrainConfig": "leafe_fast.train",
    "load_model": "leafe_fast.train",
    "pass_at_k": "leafe_fast.eval",
}

__all__ = ["__version__", *_LAZY]


__getattr__ = lazy_getattr(__name__, _LAZY)
