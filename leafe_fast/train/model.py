"""Model loading and the packed forward: stock transformers models, our varlen attention, fused loss.

``load_model`` builds an ``AutoModelForCausalLM`` from a local path or a config (never a hub download)
with the varlen attention of :mod:`leafe_fast.train.attention`, optional Liger kernels on CUDA, and
optional activation checkpointing. ``LeafeCausalLM`` wraps it so that one ``forward`` runs the base
model on a packed micro-batch and sends the hidden states of the supervised rows through
``leafe_fast.loss.leafe_loss`` with the LM head weight: no [T, V] logits are ever built. Wrapping matters
for FSDP2 too: the LM head weight is gathered by the wrapper's own forward hooks.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Sequence

import torch
from torch import nn

from leafe_fast.train.attention import VARLEN_ATTENTION, register_varlen_attention, set_backend

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None``/"auto": bf16 on CUDA, fp32 elsewhere."""
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
    device: str | torch.device | None = None,
    attn: str = "auto",
    liger: bool | str = "auto",
    activation_checkpointing: bool = False,
    seed: int = 0,
) -> nn.Module:
    """A causal LM ready for packed training.

    path_or_config: a local directory with ``config.json`` (+ weights), or a ``PretrainedConfig`` (random
    init with ``seed``). attn: "auto" (our varlen attention, fastest backend), one of the varlen backends
    ("flash_attn", "torch_varlen", "sdpa_mask", "loop") to force it, or a stock transformers name
    ("sdpa", "eager") for unpacked use. liger: apply Liger RMSNorm/RoPE/SwiGLU ("auto": on CUDA if installed).
    """
    from transformers import AutoModelForCausalLM, PretrainedConfig

    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = resolve_dtype(dtype, device)
    from leafe_fast.train.attention import BACKENDS

    if attn == "auto" or attn in BACKENDS:
        impl = register_varlen_attention()
        set_backend(None if attn == "auto" else attn)
    else:
        impl = attn
    if isinstance(path_or_config, PretrainedConfig):
        # transformers writes the attention choice into the config object: copy it so that two models
        # built from one config (say packed and stock) do not share that choice.
        path_or_config = copy.deepcopy(path_or_config)
        with torch.random.fork_rng(devices=[]):
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


def packed_hidden_states(
    model: nn.Module,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
) -> torch.Tensor:
    """Final hidden states ``[T, H]`` of a packed row ``input_ids [T]`` (samples never see each other)."""
    cu = cu_seqlens.to(device=input_ids.device, dtype=torch.int32)
    out = base_model(model)(
        input_ids=input_ids.reshape(1, -1).long(),
        position_ids=position_ids.reshape(1, -1).long(),
        cu_seq_lens_q=cu,
        cu_seq_lens_k=cu,
        max_length_q=int(max_seqlen),
        max_length_k=int(max_seqlen),
        use_cache=False,
    )
    return out.last_hidden_state[0]


def packed_logits(model: nn.Module, input_ids, position_ids, cu_seqlens, max_seqlen) -> torch.Tensor:
    """Full logits ``[T, V]`` of a packed row: for tests and small evaluations only (materializes T x V)."""
    return lm_head(model)(packed_hidden_states(model, input_ids, position_ids, cu_seqlens, max_seqlen))


class LeafeCausalLM(nn.Module):
    """A causal LM whose forward takes a packed micro-batch and returns the LEAFE loss.

    ``forward(batch, norms)`` with ``batch`` a ``MicroBatch`` on the model's device (tensors
    ``input_ids, position_ids, cu_seqlens, rows, targets, weights, group`` and int ``max_seqlen``) and
    ``norms [G]`` the global per-group normalizers of this optimizer step.
    """

    def __init__(self, model: nn.Module, lambdas: Sequence[float] = (1.0, 1.0), z_loss: float = 0.0):
        super().__init__()
        self.model = model
        self.lambdas = tuple(float(x) for x in lambdas)
        self.z_loss = float(z_loss)

    def forward(self, batch: Any, norms: torch.Tensor):
        from leafe_fast.loss import leafe_loss

        hidden = packed_hidden_states(
            self.model, batch.input_ids, batch.position_ids, batch.cu_seqlens, int(batch.max_seqlen)
        )
        head = lm_head(self.model)
        return leafe_loss(
            hidden,
            head.weight,
            batch.rows,
            batch.targets,
            batch.weights,
            batch.group,
            lambdas=self.lambdas,
            norms=norms,
            bias=head.bias,
            z_loss=self.z_loss,
            reduction="sum",
        )


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
