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


def _map_checkout_kernels() -> None:
    """Run from a source checkout with no install (a bare GPU machine running ``make gpu-check``), the
    top-level ``kernels/`` folder becomes ``leafe_fast.kernels``, as every install maps it (setup.py).
    An installed package (editable or not) finds its own ``leafe_fast.kernels`` and this does nothing."""
    import importlib.util
    import sys
    from pathlib import Path

    name = __name__ + ".kernels"
    if name in sys.modules or importlib.util.find_spec(name) is not None:
        return
    folder = Path(__file__).resolve().parent.parent / "kernels"
    if not (folder / "__init__.py").is_file() or not (folder.parent / "setup.py").is_file():
        return
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


_map_checkout_kernels()


__getattr__ = lazy_getattr(__name__, _LAZY)
