"""leafe-fast inside a Hugging Face ``transformers.Trainer`` or ``trl.SFTTrainer``.

An existing SFT script keeps its model, tokenizer, dataset and ``TrainingArguments``; it changes two
things:

- ``data_collator=LeafeCollator()``: HF-style rows (``input_ids``, ``labels`` with -100 on
  non-targets, optional ``group`` 0 rehearsal / 1 counterfactual, optional ``weight``) become one packed
  varlen micro-batch through ``leafe_fast.packing`` (no padding, no attention across samples);
- the trainer class: ``class MyTrainer(LeafeLossMixin, Trainer)`` (or ``SFTTrainer``), whose
  ``compute_loss`` runs the model on the packed row and sends only the supervised hidden states through
  ``leafe_fast.loss.leafe_loss`` (fused LM head + per-group CE; no [T, V] logits).

The mixin also computes the per-group normalizers over all micro-batches of an optimizer step (and all
data-parallel ranks), so gradient accumulation gives the gradient of one big batch, and it keeps the
``group``/``weight`` columns from being dropped by ``remove_unused_columns``. ``leafe_compute_loss`` is
the same loss as a plain function for trainers that cannot take a mixin (then each micro-batch is
normalized by its own per-group counts, like HF's default mean).

Limits: single device or DDP. Under FSDP the LM-head weight is sharded outside the forward; use
``leafe_fast.train.Trainer`` there. The model's attention is switched to leafe-fast's varlen attention
(``enable_packed_attention``); a model already on flash-attention 2/3 keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from leafe_fast.data.columns import Sample, SampleColumns
from leafe_fast.labels import target_mask_from_labels
from leafe_fast.loss import LossOptions
# Attention implementations that honour cu_seq_lens_* on a packed row.
_PACKED_OK = ("flash_attention_2", "flash_attention_3")

__all__ = ["LeafeCollator", "LeafeLossMixin", "enable_packed_attention", "features_to_samples", "leafe_compute_loss"]


# --- features -> packed batch -------------------------------------------------------------------


def features_to_samples(features: Sequence[Mapping[str, Any]], default_group: int = 0) -> list[Sample]:
    """HF rows -> ``Sample``s. A row has ``input_ids`` and either ``labels`` (-100 = not a target,
    otherwise equal to ``input_ids``), or ``completion_mask`` / ``assistant_masks`` (1 = target), or
    neither (every token after the first is a target, as HF does); optional ``group`` and ``weight``.
    """
    out = []
    for i, f in enumerate(features):
        if "input_ids" not in f:
            raise KeyError(f"LeafeCollator: row {i} has no 'input_ids' (keys: {sorted(f)})")
        ids = np.asarray(_flat(f["input_ids"]), dtype=np.int64)
        if ids.ndim != 1 or len(ids) == 0:
            raise ValueError(f"LeafeCollator: row {i}: input_ids must be a non-empty 1-D sequence")
        if f.get("labels") is not None:
            mask = target_mask_from_labels(ids, np.asarray(_flat(f["labels"]), dtype=np.int64), f"LeafeCollator: row {i}")
        else:
            key = next((k for k in ("completion_mask", "assistant_masks") if f.get(k) is not None), None)
            mask = np.ones(len(ids), bool) if key is None else np.asarray(_flat(f[key])).astype(bool)
            if mask.shape != ids.shape:
                raise ValueError(f"LeafeCollator: row {i}: {key} has {len(mask)} entries, input_ids {len(ids)}")
            mask = mask.copy()
            mask[0] = False  # the first token has no predictor (HF drops it in the shift too)
        group = int(_scalar(f.get("group", default_group)))
        weight = float(_scalar(f.get("weight", 1.0)))
        if group < 0:
            raise ValueError(f"LeafeCollator: row {i}: group must be >= 0, got {group}")
        out.append(Sample(ids.astype(np.int32), mask, group=group, weight=weight))
    return out


def _flat(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.reshape(-1).tolist()
    return x


def _scalar(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.reshape(-1)[0].item()
    if isinstance(x, (list, tuple, np.ndarray)):
        return np.asarray(x).reshape(-1)[0]
    return x


@dataclass
class LeafeCollator:
    """Packs a list of HF rows into ONE varlen micro-batch (a dict of tensors).

    ``max_tokens``: the largest packed row allowed (None: any); a longer batch is an error naming the
    sizes (lower ``per_device_train_batch_size`` or raise it), never a silent cut.
    ``default_group``: group of rows without a ``group`` field.

    Output keys: ``input_ids [1, T]``, ``position_ids [1, T]``, ``cu_seqlens [n+1]`` (int32),
    ``max_seqlen`` (int), and the loss rows ``rows, targets, weights, group [M]``.
    """

    max_tokens: int | None = None
    default_group: int = 0

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not features:
            raise ValueError("LeafeCollator: empty batch")
        samples = features_to_samples(features, self.default_group)
        total = sum(len(s) for s in samples)
        if self.max_tokens is not None and total > self.max_tokens:
            raise ValueError(
                f"LeafeCollator: the batch has {total} tokens, more than max_tokens={self.max_tokens}; "
                "lower per_device_train_batch_size or raise max_tokens"
            )
        return pack_one(samples)


def pack_one(samples: Sequence[Sample]) -> dict[str, Any]:
    """All ``samples`` in one micro-batch, through the project's packer, as torch tensors."""
    from leafe_fast.packing import pack

    cols = SampleColumns.from_samples(list(samples))
    if not cols.target_mask.any():
        raise ValueError("LeafeCollator: no row of this batch has a target token (every label is -100)")
    packing = pack(cols, max(1, int(cols.lengths.sum())), seed=0, shuffle=False)
    mbs = list(packing.micro_batches)
    if len(mbs) != 1:
        raise RuntimeError(f"LeafeCollator: expected one micro-batch for the whole batch, the packer made {len(mbs)}")
    mb = mbs[0].to_torch()
    return {
        "input_ids": mb["input_ids"].long().reshape(1, -1),
        "position_ids": mb["position_ids"].long().reshape(1, -1),
        "cu_seqlens": mb["cu_seqlens"].to(torch.int32),
        "max_seqlen": int(mb["max_seqlen"]),
        "rows": mb["rows"].long(),
        "targets": mb["targets"].long(),
        "weights": mb["weights"].float(),
        "group": mb["group"].long(),
    }


# --- the loss hook -------------------------------------------------------------------------------


def enable_packed_attention(model: nn.Module) -> str:
    """Switch ``model`` to leafe-fast's varlen attention unless it already honours packed rows.

    Returns the attention implementation in use. Idempotent.
    """
    from leafe_fast.train.attention import VARLEN_ATTENTION, register_varlen_attention

    inner = _unwrap(model)
    current = getattr(getattr(inner, "config", None), "_attn_implementation", None)
    if current == VARLEN_ATTENTION or current in _PACKED_OK:
        return current
    name = register_varlen_attention()
    inner.set_attn_implementation(name)
    return name


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module  # DDP / accelerate wrappers
    return model


def _hidden_states(model: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor:
    """Final hidden states ``[T, H]`` of the packed row, through the top-level forward (so wrappers
    such as DDP see a normal forward) with the LM head limited to one position: the loss uses the
    head's weight on the supervised rows only."""
    inner = _unwrap(model)
    base = getattr(inner, getattr(inner, "base_model_prefix", "model"), None)
    if base is None:
        raise TypeError(f"leafe_compute_loss: {type(inner).__name__} has no base model; expected a *ForCausalLM")
    captured: list[torch.Tensor] = []

    def grab(_module, _args, output):
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    cu = inputs["cu_seqlens"].to(device=inputs["input_ids"].device, dtype=torch.int32)
    max_len = int(inputs["max_seqlen"])
    handle = base.register_forward_hook(grab)
    try:
        model(
            input_ids=inputs["input_ids"].reshape(1, -1),
            position_ids=inputs["position_ids"].reshape(1, -1),
            cu_seq_lens_q=cu,
            cu_seq_lens_k=cu,
            max_length_q=max_len,
            max_length_k=max_len,
            use_cache=False,
            logits_to_keep=1,
        )
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"leafe_compute_loss: expected one base-model forward, saw {len(captured)}")
    return captured[0].reshape(-1, captured[0].shape[-1])


def leafe_compute_loss(
    model: nn.Module,
    inputs: Mapping[str, Any],
    return_outputs: bool = False,
    num_items_in_batch: Any = None,
    *,
    options: LossOptions | None = None,
):
    """``Trainer.compute_loss`` for a ``LeafeCollator`` batch: the LEAFE loss of the packed row.

    ``options``: the :class:`~leafe_fast.loss.LossOptions` (lambdas, z_loss, impl, ...); its reduction is
    replaced: with ``inputs["leafe_norms"]`` (set by ``LeafeLossMixin``: per-group target counts of the
    whole optimizer step, all ranks) each group is normalized by it ("sum") and the result is scaled by
    the world size (DDP averages gradients); without it, by this micro-batch's own per-group counts
    ("mean"). ``num_items_in_batch`` is accepted for the Trainer signature and unused: a single count
    cannot normalize two groups. ``return_outputs=True`` returns ``(loss, LeafeLossOutput)``.
    """
    from leafe_fast.loss import leafe_loss

    del num_items_in_batch
    missing = [k for k in ("input_ids", "position_ids", "cu_seqlens", "max_seqlen", "rows", "targets", "weights", "group") if k not in inputs]
    if missing:
        raise KeyError(f"leafe_compute_loss: batch lacks {missing}; use data_collator=LeafeCollator()")
    hidden = _hidden_states(model, inputs)
    head = _unwrap(model).get_output_embeddings()
    norms = inputs.get("leafe_norms")
    opts = (options or LossOptions()).with_overrides(reduction="sum" if norms is not None else "mean")
    out = leafe_loss(
        hidden,
        head.weight,
        inputs["rows"],
        inputs["targets"],
        inputs["weights"],
        inputs["group"],
        options=opts,
        norms=norms,
        bias=head.bias,
    )
    loss = out.loss
    if norms is not None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            loss = loss * dist.get_world_size()
    return (loss, out) if return_outputs else loss


class LeafeLossMixin:
    """Put first in the bases: ``class MyTrainer(LeafeLossMixin, transformers.Trainer)``.

    The keyword argument ``leafe_options`` (a :class:`~leafe_fast.loss.LossOptions`: lambdas, z_loss,
    impl, ...) is taken from the constructor; everything else goes to the trainer.
    """

    # The loss is normalized over the whole accumulated step (leafe_norms): no division by GA steps.
    loss_is_scaled_for_ga = True
    _LEAFE_COLUMNS = ("input_ids", "labels", "group", "weight", "completion_mask", "assistant_masks")

    def __init__(self, *args, leafe_options: LossOptions | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if leafe_options is not None and not isinstance(leafe_options, LossOptions):
            raise TypeError(f"LeafeLossMixin: leafe_options must be a LossOptions, got {type(leafe_options).__name__}")
        self.leafe_options = leafe_options or LossOptions()
        enable_packed_attention(self.model)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        cols = list(self._signature_columns or [])
        self._signature_columns = cols + [c for c in self._LEAFE_COLUMNS if c not in cols]

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        from leafe_fast.loss import group_norms

        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if batches and all(isinstance(b, Mapping) and "group" in b and "rows" in b for b in batches):
            norms = group_norms([b["group"].to(device) for b in batches], num_groups=self.leafe_options.groups)
            for b in batches:
                b["leafe_norms"] = norms
        return batches, num_items

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return leafe_compute_loss(model, inputs, return_outputs, num_items_in_batch, options=self.leafe_options)
