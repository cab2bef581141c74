"""Model loading and the packed forward: stock transformers models, our varlen attention, fused loss.

``load_model`` builds an ``AutoModelForCausalLM`` from a local path or a config (never a hub download)
with the varlen attention of :mod:`leafe_fast.train.attention`, optional Liger kernels on CUDA, and
optional activation checkpointing. ``LeafeCausalLM`` wraps it so that one ``forward`` runs the base
model on a packed micro-batch and sends the hidden states of the supervised rows through
``leafe_fast.loss.leafe_loss`` with the LM head weight: no [T, V] logits are ever built. Wrapping matters
for FSDP2 too: the LM head weight is gathered by the wrapper's own forward hooks. With bf16-mixed precision
on one process the wrapper runs the decoder under bf16 autocast over fp32 master weights
(:mod:`leafe_fast.train.precision`).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any, Sequence

import torch
from torch import nn

from leafe_fast.loss import LossOptions
from leafe_fast.train.attention import (
    BACKENDS,
    TREE_BACKENDS,
    VARLEN_ATTENTION,
    TreeMask,
    packed_row_mask,
    register_varlen_attention,
    set_model_backend,
)
from leafe_fast.train.precision import master_dtype, resolve_precision

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """An explicit dtype name; ``None``/"auto": bf16 on CUDA, fp32 elsewhere (the inference default;
    ``load_model`` resolves "auto" from the training precision instead)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is unknown; choose one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[dtype]


def load_model(
    path_or_config: Any,
    *,
    dtype: str | torch.dtype | None = None,
    precision: str = "auto",
    device: str | torch.device | None = None,
    attn: str = "auto",
    tree_attn: str = "auto",
    liger: bool | str = "auto",
    activation_checkpointing: bool = False,
    seed: int = 0,
) -> nn.Module:
    """A causal LM ready for packed training.

    path_or_config: a local directory with ``config.json`` (+ weights), or a ``PretrainedConfig`` (random
    init with ``seed``). attn: "auto" (our varlen attention, fastest backend), one of the varlen backends
    ("flash_attn", "torch_varlen", "sdpa_mask", "loop") to force it, or a stock transformers name
    ("sdpa", "eager") for unpacked use. tree_attn: the backend of trie batches, "auto" (flex on CUDA, measured
    on the CPU) or one of ``TREE_BACKENDS``. Both choices belong to this model only. liger: apply Liger RMSNorm and SwiGLU ("auto": on CUDA if installed).
    dtype: the parameter dtype; None/"auto" takes it from ``precision`` (see
    :mod:`leafe_fast.train.precision`): fp32 master weights for "bf16-mixed" (the CUDA default) and
    "fp32", bf16 for "bf16-pure".
    """
    from transformers import AutoModelForCausalLM, PretrainedConfig

    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype in (None, "auto"):
        torch_dtype = master_dtype(resolve_precision(precision, device))
    else:
        torch_dtype = resolve_dtype(dtype, device)

    if tree_attn != "auto" and tree_attn not in TREE_BACKENDS:
        raise ValueError(f"load_model: tree_attn {tree_attn!r} is unknown; choose 'auto' or one of {TREE_BACKENDS}")
    packed = attn == "auto" or attn in BACKENDS
    impl = register_varlen_attention() if packed else attn
    if isinstance(path_or_config, PretrainedConfig):
        # transformers writes the attention choice into the config object: copy it so that two models
        # built from one config (say packed and stock) do not share that choice.
        path_or_config = copy.deepcopy(path_or_config)
        # Built directly on the target device: a 1.5B random init on the CPU alone takes minutes.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.device(device):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(path_or_config, attn_implementation=impl, dtype=torch_dtype)
    elif isinstance(path_or_config, (str, os.PathLike)):
        if not os.path.isdir(path_or_config):
            raise FileNotFoundError(
                f"load_model: {path_or_config!r} is not a local model directory (leafe-fast never downloads; "
                "pass a directory with config.json, or a PretrainedConfig)"
            )
        model = AutoModelForCausalLM.from_pretrained(path_or_config, attn_implementation=impl, dtype=torch_dtype)
    else:
        raise TypeError(f"load_model: expected a path or a PretrainedConfig, got {type(path_or_config).__name__}")
    model.to(device)
    if packed:
        set_model_backend(model, attn, tree_attn)
    if liger:
        from leafe_fast.train.liger import apply_liger

        applied = apply_liger(model, required=(liger is True))
        model.leafe_liger = applied  # recorded for logs (an attribute, not in config.json)
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    return model


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in backward (non-reentrant: works with FSDP2 and kwargs)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def base_model(model: nn.Module) -> nn.Module:
    """The decoder stack (``model.model`` for Qwen2/Llama) that returns hidden states."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if base is None:
        raise TypeError(f"{type(model).__name__} has no base model attribute; expected a *ForCausalLM")
    return base


def lm_head(model: nn.Module) -> nn.Linear:
    head = model.get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(model).__name__} has no output embeddings (LM head)")
    return head


# Handed to the model as ``attention_mask``: transformers takes any 4-D mask as already prepared and builds
# none (its mask code scans position_ids for packed sequences, a host sync per forward). Our attention
# reads the packing from the varlen keywords or the tree mask and treats this empty mask as "no mask"
# (``packed_row_mask``).


def packed_hidden_states(
    model: nn.Module,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    subtree_end: torch.Tensor | None = None,
) -> torch.Tensor:
    """Final hidden states ``[T, H]`` of a packed row ``input_ids [T]`` (samples never see each other).

    With ``subtree_end`` (a trie batch) token j sees token i iff ``i <= j < subtree_end[i]``; the
    :class:`~leafe_fast.train.attention.TreeMask` is built here once and shared by all layers.
    """
    cu = cu_seqlens.to(device=input_ids.device, dtype=torch.int32)
    extra: dict[str, Any] = {}
    if subtree_end is not None:
        extra["leafe_tree_mask"] = TreeMask(subtree_end.to(input_ids.device), position_ids.to(input_ids.device), cu)
    out = base_model(model)(
        input_ids=input_ids.reshape(1, -1).long(),
        position_ids=position_ids.reshape(1, -1).long(),
        # a stock attention (e.g. "sdpa") needs transformers' own packed-sequence mask from position_ids
        attention_mask=packed_row_mask(input_ids.device)
        if getattr(model.config, "_attn_implementation", None) == VARLEN_ATTENTION else None,
        cu_seq_lens_q=cu,
        cu_seq_lens_k=cu,
        max_length_q=int(max_seqlen),
        max_length_k=int(max_seqlen),
        use_cache=False,
        **extra,
    )
    return out.last_hidden_state[0]


def packed_logits(model: nn.Module, input_ids, position_ids, cu_seqlens, max_seqlen,
                  subtree_end: torch.Tensor | None = None) -> torch.Tensor:
    """Full logits ``[T, V]`` of a packed row: for tests and small evaluations only (materializes T x V)."""
    return lm_head(model)(packed_hidden_states(model, input_ids, position_ids, cu_seqlens, max_seqlen, subtree_end))


class LeafeCausalLM(nn.Module):
    """A causal LM whose forward takes a packed micro-batch and returns the LEAFE loss.

    ``forward(batch, norms)`` with ``batch`` = ``MicroBatch.to_torch(device)`` (a dict or an object of tensors
    ``input_ids, position_ids, cu_seqlens, rows, targets, weights, group`` and int ``max_seqlen``) and
    ``norms [G]`` the global per-group normalizers of this optimizer step.

    autocast_dtype: run the decoder under ``torch.autocast`` in this dtype (bf16-mixed on one process:
    fp32 parameters, bf16 matmuls). None: compute in the parameters' own dtype (fp32, bf16-pure, or the
    bf16 copies FSDP2's mixed-precision policy gathers).
    loss: the :class:`leafe_fast.loss.LossOptions` (lambdas, z_loss, impl, check_ranges, ...); the reduction
    is always "sum" by the given norms. ``check_ranges`` lets the loss verify target and group ranges on
    every call (a device sync on CUDA); the Trainer checks its packed micro-batches once per epoch on the
    host and turns it off.
    """

    def __init__(self, model: nn.Module, loss: LossOptions | None = None,
                 autocast_dtype: torch.dtype | None = None):
        super().__init__()
        self.model = model
        self.loss_options = (loss or LossOptions()).with_overrides(reduction="sum")
        self.autocast_dtype = autocast_dtype

    def forward(self, batch: Any, norms: torch.Tensor):
        from leafe_fast.loss import leafe_loss

        batch = as_batch(batch)
        input_ids, position_ids, cu, max_len = batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen
        subtree_end = getattr(batch, "subtree_end", None)
        if input_ids.numel() == 0:
            # An empty micro-batch (the balanced packer gives one to a rank with nothing left) still runs
            # one dummy token: under FSDP every rank must take part in every gather and reduce.
            input_ids = torch.zeros(1, dtype=torch.long, device=input_ids.device)
            position_ids = torch.zeros(1, dtype=torch.long, device=input_ids.device)
            cu = torch.tensor([0, 1], dtype=torch.int32, device=input_ids.device)
            max_len = 1
            subtree_end = None
        device_type = input_ids.device.type
        with torch.autocast(device_type, dtype=self.autocast_dtype or torch.bfloat16,
                            enabled=self.autocast_dtype is not None):
            hidden = packed_hidden_states(self.model, input_ids, position_ids, cu, int(max_len), subtree_end)
        head = lm_head(self.model)
        # The fused loss needs hidden and LM-head weight in one dtype. Under autocast the decoder's residual
        # stream (and so the final norm's output) stays fp32 while the head weight is the fp32 master, so
        # both are cast to the compute dtype here: bf16 operands give the Triton kernel tensor-core matmuls
        # (the loss is 6*M*H*V flops, the largest single matmul of a small model with a big vocabulary) and
        # half the traffic of reading the [V, H] weight per block; the kernel still accumulates logits and
        # log-sum-exp in fp32. ``.to`` is differentiable, so the weight gradient flows back (in fp32) into
        # the master parameter, exactly like autocast's own casts of every Linear. Without autocast the
        # casts are no-ops. (leafe_loss turns autocast off itself, so its torch backend keeps fp32 math.)
        loss_dtype = self.autocast_dtype or hidden.dtype
        hidden_c = hidden.to(loss_dtype)
        if head.weight.dtype == torch.float32 and loss_dtype in (torch.bfloat16, torch.float16):
            # fp32 master head: the loss casts it once per optimizer step (not per micro-batch) and returns
            # its gradient in fp32, accumulated in fp32 across row chunks
            weight_c, bias_c = head.weight, head.bias
        else:
            weight_c = head.weight.to(loss_dtype)
            bias_c = None if head.bias is None else head.bias.to(loss_dtype)
        out = leafe_loss(
            hidden_c,
            weight_c,
            batch.rows,
            batch.targets,
            batch.weights,
            batch.group,
            options=self.loss_options,
            norms=norms,
            bias=bias_c,
        )
        if batch.rows.numel() == 0:
            # No targets: keep every parameter in the graph (zero gradient) so FSDP's reductions still run.
            out.loss = out.loss + 0.0 * (hidden.sum() + head.weight.sum())
        return out


def as_batch(batch: Any) -> Any:
    """A micro-batch as attributes: ``MicroBatch.to_torch`` returns a dict, the loss code reads fields."""
    if isinstance(batch, Mapping):
        return SimpleNamespace(**batch)
    return batch


def count_parameters(model: nn.Module, *, exclude_input_embeddings: bool = True) -> int:
    """Unique parameters; the input embedding table is left out unless it is tied to the LM head.

    Why: an embedding lookup does no matmul, so it adds no FLOPs; the LM head does. This is the ``N`` of
    the ``6 N`` FLOPs-per-token estimate used for MFU.
    """
    seen: set[int] = set()
    total = 0
    skip: set[int] = set()
    if exclude_input_embeddings and hasattr(model, "get_input_embeddings"):
        emb = model.get_input_embeddings()
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if emb is not None and not (head is not None and head.weight is emb.weight):
            skip.add(id(emb.weight))
    for p in model.parameters():
        if id(p) in seen or id(p) in skip:
            continue
        seen.add(id(p))
        total += p.numel()
    return total
