"""Varlen (packed) causal attention behind transformers' ``AttentionInterface``.

A packed micro-batch is one row ``[1, T]`` holding several samples back to back; ``cu_seqlens`` marks
where each starts. Attention must stay inside a sample. We register one attention function under the
name :data:`VARLEN_ATTENTION`; a model built with ``attn_implementation=VARLEN_ATTENTION`` keeps its stock
code, and its forward hands ``cu_seq_lens_q/k``, ``max_length_q/k`` and ``position_ids`` through
``**kwargs`` to us. A packed row never gets a [T, T] mask built for it: ``packed_hidden_states``
hands the model an empty 4-D placeholder (:func:`packed_row_mask`), which transformers passes through as already prepared,
so ``attention_mask`` arrives as that placeholder and we read it as "no mask". Called with a 2-D mask
instead, our mask builder (:func:`varlen_mask`) returns None unless the batch has padding.

Backends, fastest first (``select_backend``):

- ``flash_attn``   ``flash_attn.flash_attn_varlen_func`` (CUDA, the flash-attn package installed)
- ``torch_varlen`` ``torch.nn.attention.varlen.varlen_attn`` (CUDA, torch >= 2.10: flash kernels in torch)
- ``sdpa_mask``    SDPA with a block-diagonal causal mask built from ``cu_seqlens`` (any device; O(T^2)
  memory, so used for short packs on the CPU)
- ``loop``         one causal SDPA call per sample (any device; O(max_len^2) memory, slow for many samples)

The two flash backends take fp16/bf16 only: fp32 inputs (precision="fp32" on CUDA) go to the SDPA paths.

Trie (prefix-shared) batches (``leafe_fast.packing`` ``layout="trie"``) carry ``subtree_end``: token ``j``
attends to token ``i`` iff ``i <= j < subtree_end[i]``. :class:`TreeMask` is built once per micro-batch from it
and handed to every layer (the ``leafe_tree_mask`` keyword); its backends (``TREE_BACKENDS``):

- ``flex``        FlexAttention with a block-sparse ``BlockMask`` (compiled; CUDA, and on the CPU for inference
  only: torch has no CPU flex backward)
- ``tree_sdpa``   SDPA with a dense [T, T] tree mask (any device; O(T^2) memory)
- ``tree_chunks`` one dense-masked SDPA per tree chunk (``cu_seqlens`` bounds; O(chunk^2) memory)
- ``tree_paths``  one SDPA per branch segment (a run of tokens added by one sample) against its gathered
  ancestor path: attention work at most the flat layout's, the CPU analogue of flex's block sparsity

The backend is chosen per model (:func:`set_model_backend`, stored on the model's modules, never
process-wide). "auto" on CUDA: flash varlen for flat batches, ``flex`` for trie batches; on the CPU the
candidates are timed once per shape bucket on the real inputs and the fastest is kept (:func:`measured_choice`).

Without ``cu_seq_lens_*`` the boundaries come from ``position_ids`` restarting at 0, so a plain
``model(input_ids, position_ids=...)`` call on a packed row is also correct. Padded [B, T] batches and
KV-cached decoding (evaluation, generation) fall back to ordinary SDPA with transformers' padding mask.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from functools import lru_cache
from typing import Any, Literal

import torch
import torch.nn.functional as F

VARLEN_ATTENTION = "leafe_varlen"
Backend = Literal["flash_attn", "torch_varlen", "sdpa_mask", "loop"]
BACKENDS: tuple[str, ...] = ("flash_attn", "torch_varlen", "sdpa_mask", "loop")
TREE_BACKENDS: tuple[str, ...] = ("flex", "tree_sdpa", "tree_chunks", "tree_paths")
# Dense [T, T] masks above this many tokens are never tried (memory), whatever a measurement would say.
MASK_MAX_TOKENS = 16384
# Attribute names on a model's modules that hold its backend choice (see set_model_backend).
_FLAT_ATTR, _TREE_ATTR = "leafe_attn_backend", "leafe_tree_backend"


@lru_cache(maxsize=1)
def _flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:  # not installed, or built for another torch/CUDA: not usable
        return None
    return flash_attn_varlen_func


@lru_cache(maxsize=1)
def _torch_varlen():
    """(varlen_attn, causal kwargs, supports_gqa) or None when this torch has no varlen_attn."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:
        return None
    params = inspect.signature(varlen_attn).parameters
    # torch 2.10 spells causality is_causal=True; later versions use window_size=(-1, 0).
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    return varlen_attn, causal, "enable_gqa" in params


def available_backends(device: torch.device | str) -> list[str]:
    """Backends that can run on ``device`` in this environment, fastest first."""
    device = torch.device(device)
    out = []
    if device.type == "cuda":
        if _flash_attn_varlen() is not None:
            out.append("flash_attn")
        if _torch_varlen() is not None:
            out.append("torch_varlen")
    out += ["sdpa_mask", "loop"]
    return out


def select_backend(device: torch.device | str, prefer: str = "auto", num_tokens: int = 0) -> str:
    """The flat-batch backend: ``prefer`` if given (error if unavailable), else the fastest available.

    On CUDA "auto" is the first flash backend. On the CPU it returns "auto" unless the dense mask is too big
    (``num_tokens > MASK_MAX_TOKENS``: "loop"): the choice between the masked SDPA and the loop is then made
    by measurement on the real inputs (:func:`measured_choice`).
    """
    avail = available_backends(device)
    if prefer != "auto":
        if prefer not in BACKENDS:
            raise ValueError(f"attention backend {prefer!r} is unknown; choose 'auto' or one of {BACKENDS}")
        if prefer not in avail:
            raise ValueError(f"attention backend {prefer!r} is not available on {device}; available: {avail}")
        return prefer
    if avail[0] in ("flash_attn", "torch_varlen"):
        return avail[0]
    return "auto" if num_tokens <= MASK_MAX_TOKENS else "loop"


def set_model_backend(model: torch.nn.Module, flat: str = "auto", tree: str = "auto") -> None:
    """Record the attention backends of ``model`` (flat batches, trie batches) on its own modules.

    Why per model: a process may hold two models (a packed and a stock one, or two experiments); a global
    switch would let loading the second silently change the first.
    """
    if flat != "auto" and flat not in BACKENDS:
        raise ValueError(f"attention backend {flat!r} is unknown; choose 'auto' or one of {BACKENDS}")
    if tree != "auto" and tree not in TREE_BACKENDS:
        raise ValueError(f"tree attention backend {tree!r} is unknown; choose 'auto' or one of {TREE_BACKENDS}")
    for m in model.modules():
        setattr(m, _FLAT_ATTR, flat)
        setattr(m, _TREE_ATTR, tree)


def model_backend(model: torch.nn.Module) -> tuple[str, str]:
    """(flat, tree) backend names recorded on ``model`` ("auto" when none was set)."""
    return getattr(model, _FLAT_ATTR, "auto"), getattr(model, _TREE_ATTR, "auto")


# ------------------------------------------------------------------------------------ measured choice
_MEASURED: dict[tuple, str] = {}


def _bucket(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def measured_choice(key: tuple, candidates: dict[str, Callable[[], Any]], repeats: int = 2) -> str:
    """The fastest of ``candidates`` (name -> forward thunk), timed once per ``key`` and cached.

    Each candidate runs once untimed (warm-up, compilation) and then ``repeats`` timed times without
    gradients; the best time counts. Why: on the CPU the winner depends on the machine, the thread count,
    the number of segments and their lengths (a dense [T, T] mask measured 4x slower than a per-sample loop
    at 4096 tokens on one machine and faster on short packs), so no fixed threshold is right everywhere.
    """
    if key in _MEASURED:
        return _MEASURED[key]
    if len(candidates) == 1:
        _MEASURED[key] = next(iter(candidates))
        return _MEASURED[key]
    best, best_t, error = None, float("inf"), None
    with torch.no_grad():
        for name, fn in candidates.items():
            try:
                fn()
            except Exception as exc:  # a candidate that cannot run here (e.g. no compiler for flex) is not chosen
                error = exc
                continue
            t = min(_timed(fn) for _ in range(repeats))
            if t < best_t:
                best, best_t = name, t
    if best is None:
        raise RuntimeError(f"no attention backend among {list(candidates)} could run") from error
    _MEASURED[key] = best
    return best


def _training(*xs: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def _keep(t: torch.Tensor) -> torch.Tensor:
    return t


def _trial(attend: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           training: bool) -> Callable[[], Any]:
    """A thunk for :func:`measured_choice`: forward only, or (training) forward + backward on detached copies,
    since the backward of a dense mask costs far more than its forward on the CPU."""
    if not training:
        return lambda: attend(q, k, v)

    def fwd_bwd() -> None:
        # Identity saved-tensor hooks: inside an activation-checkpointed layer the checkpoint's own hooks
        # would otherwise pack the trial's tensors and recompute the whole layer in this trial's backward.
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
            qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
            attend(qq, kk, vv).sum().backward()

    return fwd_bwd


def _timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measured_backends() -> dict[tuple, str]:
    """The CPU choices made so far (key -> backend): logged by benchmarks, inspected by tests."""
    return dict(_MEASURED)


def packed_row_mask(device: torch.device | str) -> torch.Tensor:
    """An empty 4-D mask that stands for "packed row, no mask" (see ``packed_hidden_states``).

    transformers returns a 4-D ``attention_mask`` as-is instead of building one, for every model family, so
    passing this skips its mask code (and the host sync of its packed-sequence detection).
    """
    return torch.empty(1, 1, 0, 0, dtype=torch.bool, device=device)


def _is_packed_row_mask(mask: torch.Tensor | None) -> bool:
    return mask is not None and mask.dim() == 4 and mask.numel() == 0


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Sample boundaries of a packed row: a new sample starts wherever the position is 0."""
    pos = position_ids.reshape(-1)
    starts = torch.nonzero(pos == 0).flatten()
    if starts.numel() == 0 or starts[0] != 0:
        starts = torch.cat([torch.zeros(1, dtype=starts.dtype, device=pos.device), starts])
    end = torch.tensor([pos.numel()], dtype=starts.dtype, device=pos.device)
    return torch.cat([starts, end]).to(torch.int32)


def document_causal_mask(cu_seqlens: torch.Tensor, total: int, sliding_window: int | None = None) -> torch.Tensor:
    """Bool [T, T]: query i may see key j iff both are in one sample and j <= i (and within the window)."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    seg = torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths.long())
    idx = torch.arange(total, device=cu_seqlens.device)
    mask = (seg[:, None] == seg[None, :]) & (idx[None, :] <= idx[:, None])
    if sliding_window is not None:
        mask &= idx[:, None] - idx[None, :] < sliding_window
    return mask


def _repeat_kv(x: torch.Tensor, groups: int, head_dim: int = 1) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=head_dim)


def varlen_attention_packed(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    scale: float | None = None,
    sliding_window: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Causal attention of packed ``q [T, H, D]``, ``k, v [T, Hkv, D]`` -> ``[T, H, D]``, per sample."""
    total, heads, head_dim = q.shape
    groups = heads // k.shape[1]
    scale = head_dim**-0.5 if scale is None else scale
    name = select_backend(q.device, backend, total) if backend == "auto" or backend in BACKENDS else backend
    if name in ("flash_attn", "torch_varlen") and q.dtype not in (torch.float16, torch.bfloat16):
        # The flash kernels take 16-bit inputs only (precision="fp32" on CUDA): exact SDPA paths instead.
        if backend != "auto":
            raise ValueError(f"attention backend {name!r} needs float16/bfloat16 inputs, got {q.dtype}; "
                             "use 'sdpa_mask' or 'loop' (or 'auto') for fp32")
        name = "auto" if total <= MASK_MAX_TOKENS else "loop"
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    max_seqlen = int(max_seqlen)
    if name == "auto":  # sdpa_mask or loop: measured once per shape bucket on these inputs
        segments = cu.numel() - 1
        key = ("flat", q.device.type, q.dtype, _bucket(total), _bucket(segments), _bucket(max_seqlen), heads,
               head_dim, sliding_window is not None)
        training = _training(q, k, v)
        key = (*key, training)
        run = lambda b: _trial(lambda qq, kk, vv: _varlen_sdpa(b, qq, kk, vv, cu, groups, scale,  # noqa: E731
                                                                   sliding_window), q, k, v, training)
        name = measured_choice(key, {"sdpa_mask": run("sdpa_mask"), "loop": run("loop")})
    if name in ("flash_attn", "torch_varlen"):
        # [T, H, D] views of HF's [1, H, T, D] tensors; the flash kernels want dense [T, H, D] inputs.
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if name == "flash_attn":
        window = (-1, -1) if sliding_window is None else (sliding_window - 1, 0)
        return _flash_attn_varlen()(
            q, k, v, cu, cu, max_seqlen, max_seqlen, softmax_scale=scale, causal=True, window_size=window
        )
    if name == "torch_varlen":
        varlen_attn, causal, has_gqa = _torch_varlen()
        if sliding_window is not None:
            if "window_size" not in causal:
                raise NotImplementedError("torch 2.10 varlen_attn has no sliding window; install flash-attn")
            causal = {"window_size": (sliding_window - 1, 0)}
        if has_gqa:
            extra = {"enable_gqa": groups > 1}
        else:
            k, v, extra = _repeat_kv(k, groups), _repeat_kv(v, groups), {}
        return varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen, scale=scale, **causal, **extra)
    return _varlen_sdpa(name, q, k, v, cu, groups, scale, sliding_window)


def _varlen_sdpa(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, groups: int,
                 scale: float, sliding_window: int | None) -> torch.Tensor:
    """The two SDPA paths of :func:`varlen_attention_packed` (any device, exact in fp32)."""
    total = q.shape[0]
    # SDPA paths want [B, H, T, D]
    qh, kh, vh = q.transpose(0, 1), _repeat_kv(k, groups, 1).transpose(0, 1), _repeat_kv(v, groups, 1).transpose(0, 1)
    if name == "sdpa_mask":
        mask = document_causal_mask(cu, total, sliding_window)
        out = F.scaled_dot_product_attention(qh[None], kh[None], vh[None], attn_mask=mask, scale=scale)[0]
        return out.transpose(0, 1)
    if name == "loop":
        bounds = cu.tolist()
        pieces = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            if b == a:
                continue
            mask = None
            if sliding_window is not None:
                i = torch.arange(b - a, device=q.device)
                mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < sliding_window)
            pieces.append(
                F.scaled_dot_product_attention(
                    qh[:, a:b], kh[:, a:b], vh[:, a:b], attn_mask=mask, is_causal=mask is None, scale=scale
                )
            )
        return torch.cat(pieces, dim=1).transpose(0, 1)
    raise ValueError(f"attention backend {name!r} is unknown; choose one of {BACKENDS}")


def leafe_varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The ``AttentionInterface`` entry: ``query [B, H, T, D]`` -> ``([B, T, H, D], None)``."""
    if dropout:
        raise NotImplementedError("leafe_varlen attention has no dropout; set attention_dropout=0 in the config")
    batch, heads, total, head_dim = query.shape
    dev_type = query.device.type
    if torch.is_autocast_enabled(dev_type):
        # bf16-mixed: with fp32 parameters the RoPE tables are fp32, so q and k arrive fp32 next to a bf16 v.
        # The flash kernels take one 16-bit dtype; autocast does not reach them, so cast as it would.
        dt = torch.get_autocast_dtype(dev_type)
        query, key, value = query.to(dt), key.to(dt), value.to(dt)
    if _is_packed_row_mask(attention_mask):
        attention_mask = None
    tree = kwargs.get("leafe_tree_mask")
    if tree is not None and batch == 1 and key.shape[2] == total:
        out = tree_attention(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), tree,
                             scale=scaling, sliding_window=sliding_window, backend=getattr(module, _TREE_ATTR, "auto"))
        return out.unsqueeze(0), None
    if attention_mask is None and batch == 1 and key.shape[2] == total:
        cu = kwargs.get("cu_seq_lens_q")
        max_len = kwargs.get("max_length_q")
        if cu is None:
            position_ids = kwargs.get("position_ids")
            if position_ids is not None:
                cu = cu_seqlens_from_position_ids(position_ids)
            else:
                cu = torch.tensor([0, total], dtype=torch.int32, device=query.device)
        if max_len is None:
            max_len = int((cu[1:] - cu[:-1]).max())
        out = varlen_attention_packed(
            query[0].transpose(0, 1),
            key[0].transpose(0, 1),
            value[0].transpose(0, 1),
            cu,
            max_len,
            scale=scaling,
            sliding_window=sliding_window,
            backend=getattr(module, _FLAT_ATTR, "auto"),
        )
        return out.unsqueeze(0), None
    # Padded batches and KV-cached decoding (generation, evaluation): SDPA with the model's own mask
    # (built by :func:`varlen_mask` only when there is padding), else causal aligned to the newest key.
    groups = heads // key.shape[1]
    k, v = _repeat_kv(key, groups), _repeat_kv(value, groups)
    q_len, kv_len = total, k.shape[2]
    mask = None
    if attention_mask is not None:
        if attention_mask.dim() == 2:  # a raw [B, kv_len] padding mask from a direct call
            causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
            mask = causal[None, None] & attention_mask[:, None, None, -kv_len:].bool()
        else:
            mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask.to(query.dtype)
            mask = mask[..., :kv_len]
    elif kv_len != q_len:
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
        if sliding_window is not None:
            mask &= ~torch.ones_like(mask).tril(kv_len - q_len - sliding_window)
    elif sliding_window is not None:
        mask = document_causal_mask(torch.tensor([0, q_len], device=query.device), q_len, sliding_window)
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, is_causal=mask is None, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def varlen_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs):
    """Mask builder registered beside the attention: no mask at all unless the batch has padding.

    Packed rows need none (boundaries come from ``cu_seq_lens``/``position_ids``); a padded batch gets the
    same 4-D mask transformers builds for SDPA.
    """
    if attention_mask is None or bool(attention_mask.all()):
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register_varlen_attention() -> str:
    """Register :func:`leafe_varlen_attention` with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_ATTENTION, leafe_varlen_attention)
    AttentionMaskInterface.register(VARLEN_ATTENTION, varlen_mask)
    return VARLEN_ATTENTION


# ------------------------------------------------------------------------------------------ tree masks
class TreeMask:
    """The attention mask of one trie micro-batch, built once and shared by every layer.

    ``subtree_end [T]``: query q sees key k iff ``k <= q < subtree_end[k]`` (k is q or an ancestor of q).
    ``depth [T]`` (the position ids) serves sliding windows: q sees ancestor k only if ``depth[q] - depth[k]
    < window``. ``cu_seqlens`` bounds the tree chunks (no attention crosses them). The dense masks and the
    ``BlockMask`` are built on first use and cached here, so the layers after the first reuse them.
    """

    def __init__(self, subtree_end: torch.Tensor, depth: torch.Tensor, cu_seqlens: torch.Tensor | None = None):
        self.subtree_end = subtree_end.reshape(-1).to(torch.int32)
        self.depth = depth.reshape(-1).to(torch.int32)
        self.total = int(self.subtree_end.numel())
        self.cu_seqlens = (cu_seqlens.to(device=self.subtree_end.device, dtype=torch.int32) if cu_seqlens is not None
                           else torch.tensor([0, self.total], dtype=torch.int32, device=self.subtree_end.device))
        self._cache: dict[Any, Any] = {}

    @property
    def device(self) -> torch.device:
        return self.subtree_end.device

    def dense(self, window: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Bool [n, n] mask of tokens [start, stop) (a chunk: no key outside it is visible to its queries)."""
        stop = self.total if stop is None else stop
        key = ("dense", window, start, stop)
        if key not in self._cache:
            idx = torch.arange(start, stop, device=self.device)
            end = self.subtree_end[start:stop]
            mask = (idx[None, :] <= idx[:, None]) & (idx[:, None] < end[None, :])
            if window is not None:
                d = self.depth[start:stop]
                mask &= (d[:, None] - d[None, :]) < window
            self._cache[key] = mask
        return self._cache[key]

    def chunks(self) -> list[tuple[int, int]]:
        if "chunks" not in self._cache:
            b = self.cu_seqlens.tolist()
            self._cache["chunks"] = [(x, y) for x, y in zip(b[:-1], b[1:]) if y > x]
        return self._cache["chunks"]

    def segments(self) -> list[tuple[int, int, torch.Tensor]]:
        """Branch segments ``(start, stop, keys)``: tokens [start, stop) form a chain (each the child of the
        previous one) and ``keys`` indexes their ancestor path followed by the segment itself."""
        if "segments" not in self._cache:
            end, depth = self.subtree_end.tolist(), self.depth.tolist()
            starts = {a for a, b in self.chunks()}
            out, path = [], []  # path: the indices of the current root-to-token path
            j = 0
            while j < self.total:
                if j in starts:
                    path = []
                del path[depth[j]:]  # back up to the parent of j
                k = j + 1
                while k < self.total and k not in starts and depth[k] == depth[k - 1] + 1 and end[k - 1] > k:
                    k += 1
                path.extend(range(j, k))
                out.append((j, k, torch.tensor(path, dtype=torch.long, device=self.device)))
                j = k
            self._cache["segments"] = out
        return self._cache["segments"]

    def block_mask(self, window: int | None = None):
        """FlexAttention ``BlockMask`` (block-sparse: blocks with no visible pair are skipped)."""
        key = ("block", window)
        if key not in self._cache:
            from torch.nn.attention.flex_attention import create_block_mask

            end, depth = self.subtree_end, self.depth

            def tree_mod(b, h, q_idx, kv_idx):
                visible = (kv_idx <= q_idx) & (q_idx < end[kv_idx])
                if window is not None:
                    visible = visible & (depth[q_idx] - depth[kv_idx] < window)
                return visible

            self._cache[key] = create_block_mask(tree_mod, None, None, self.total, self.total, device=self.device,
                                                 _compile=self.device.type == "cuda")
        return self._cache[key]


@lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def _tree_candidates(device: torch.device, total: int) -> list[str]:
    """Tree backends worth trying on ``device`` for ``total`` tokens."""
    if device.type == "cuda":
        return ["flex"]
    out = ["tree_paths", "tree_chunks"]
    # compiling flex for the CPU takes tens of seconds: not worth it for tiny packs; and flex has no CPU
    # backward ("FlexAttention does not support backward on CPU"), so never while training
    if total >= 1024 and not torch.is_grad_enabled():
        out.append("flex")
    if total <= MASK_MAX_TOKENS:
        out.insert(0, "tree_sdpa")
    return out


def tree_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tree: TreeMask,
    *,
    scale: float | None = None,
    sliding_window: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Tree-masked attention of ``q [T, H, D]``, ``k, v [T, Hkv, D]`` -> ``[T, H, D]`` (see :class:`TreeMask`)."""
    total, heads, head_dim = q.shape
    groups = heads // k.shape[1]
    scale = head_dim**-0.5 if scale is None else scale
    if backend == "auto":
        cands = _tree_candidates(q.device, total)
        if len(cands) == 1:
            backend = cands[0]
        else:
            key = ("tree", q.device.type, q.dtype, _bucket(total), _bucket(len(tree.chunks())), heads, head_dim,
                   sliding_window is not None, torch.is_grad_enabled())
            run = lambda b: _trial(lambda qq, kk, vv: tree_attention(  # noqa: E731
                qq, kk, vv, tree, scale=scale, sliding_window=sliding_window, backend=b), q, k, v,
                _training(q, k, v))
            backend = measured_choice(key, {b: run(b) for b in cands})
    qh = q.transpose(0, 1)
    if backend == "flex":
        kh, vh = k.transpose(0, 1), v.transpose(0, 1)
        out = _compiled_flex()(qh[None].contiguous(), kh[None].contiguous(), vh[None].contiguous(),
                               block_mask=tree.block_mask(sliding_window), scale=scale, enable_gqa=groups > 1)
        return out[0].transpose(0, 1)
    kh, vh = _repeat_kv(k, groups, 1).transpose(0, 1), _repeat_kv(v, groups, 1).transpose(0, 1)
    if backend == "tree_sdpa":
        mask = tree.dense(sliding_window)
        out = F.scaled_dot_product_attention(qh[None], kh[None], vh[None], attn_mask=mask, scale=scale)[0]
        return out.transpose(0, 1)
    if backend == "tree_chunks":
        pieces = []
        for a, b in tree.chunks():
            mask = tree.dense(sliding_window, a, b)
            pieces.append(F.scaled_dot_product_attention(qh[None, :, a:b], kh[None, :, a:b], vh[None, :, a:b],
                                                         attn_mask=mask, scale=scale)[0])
        return torch.cat(pieces, dim=1).transpose(0, 1)
    if backend == "tree_paths":
        pieces = []
        for a, b, keys in tree.segments():
            n, m = b - a, keys.numel()
            # the segment's queries see the whole ancestor path and the segment causally (bottom-right aligned)
            mask = torch.ones(n, m, dtype=torch.bool, device=q.device).tril(m - n)
            if sliding_window is not None:
                d = tree.depth
                mask &= (d[a:b, None] - d[keys][None, :]) < sliding_window
            pieces.append(F.scaled_dot_product_attention(qh[None, :, a:b], kh[None][:, :, keys], vh[None][:, :, keys],
                                                         attn_mask=mask, scale=scale)[0])
        return torch.cat(pieces, dim=1).transpose(0, 1)
    raise ValueError(f"tree attention backend {backend!r} is unknown; choose 'auto' or one of {TREE_BACKENDS}")


# ------------------------------------------------------------------------------------------------ FA3
def flash_impls() -> list[str]:
    """Flash-attention implementations this torch can dispatch to besides its built-in FA2 (e.g. "FA3")."""
    try:
        from torch.nn.attention import list_flash_attention_impls
    except ImportError:
        return []
    return list(list_flash_attention_impls())


def prefer_fa3(device: torch.device | str = "cuda", tokens: int = 16384, heads: int = 14, kv_heads: int = 2,
               head_dim: int = 64) -> str:
    """On Hopper (sm_90) activate torch's FA3 for the flash paths if it measures faster than FA2 here.

    Times the flat varlen attention (forward + backward, bf16, documents of 2k tokens) under the built-in
    FA2 and under FA3 and keeps the faster; returns "FA3" or "FA2". Process-wide by nature (torch's
    dispatcher), which is why it is opt-in (benchmarks and the trainer's caller decide), never done on
    import or by ``load_model``. Not measured in this repository yet: no Hopper GPU was available.
    """
    device = torch.device(device)
    if device.type != "cuda" or torch.cuda.get_device_capability(device) != (9, 0) or "FA3" not in flash_impls():
        return "FA2"
    from torch.nn.attention import activate_flash_attention_impl, restore_flash_attention_impl

    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(tokens, heads, head_dim, device=device, dtype=torch.bfloat16, generator=g, requires_grad=True)
    k = torch.randn(tokens, kv_heads, head_dim, device=device, dtype=torch.bfloat16, generator=g, requires_grad=True)
    v = torch.randn(tokens, kv_heads, head_dim, device=device, dtype=torch.bfloat16, generator=g, requires_grad=True)
    cu = torch.arange(0, tokens + 1, 2048, device=device, dtype=torch.int32)

    def run() -> None:
        varlen_attention_packed(q, k, v, cu, 2048, backend="auto").sum().backward()

    def timed() -> float:
        for _ in range(3):
            run()
        torch.cuda.synchronize(device)
        t = time.perf_counter()
        for _ in range(10):
            run()
        torch.cuda.synchronize(device)
        return time.perf_counter() - t

    fa2 = timed()
    activate_flash_attention_impl("FA3")
    try:
        fa3 = timed()
    except Exception:  # FA3 registered but unusable with this build: keep FA2
        restore_flash_attention_impl()
        return "FA2"
    if fa3 < fa2:
        return "FA3"
    restore_flash_attention_impl()
    return "FA2"
