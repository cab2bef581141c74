"""Packed varlen and tree attention: packed logits equal one-sample-at-a-time logits, backend selection."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_train_utils import tiny  # noqa: E402

from leafe_fast.train import attention as A  # noqa: E402
from leafe_fast.train.model import load_model, packed_logits  # noqa: E402

LENGTHS = [7, 1, 13, 4, 2]  # includes a 1-token sample


def _pack(seqs):
    ids = torch.cat(seqs)
    pos = torch.cat([torch.arange(len(s)) for s in seqs])
    cu = torch.tensor([0, *torch.tensor([len(s) for s in seqs]).cumsum(0).tolist()], dtype=torch.int32)
    return ids, pos, cu, max(len(s) for s in seqs)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("backend", ["sdpa_mask", "loop"])
def test_packed_logits_equal_one_sample_at_a_time(family, backend):
    tok, cfg = tiny(family)
    packed_model = load_model(cfg, dtype="float32", device="cpu", attn=backend, seed=1).eval()
    plain = load_model(cfg, dtype="float32", device="cpu", attn="sdpa", seed=1).eval()
    g = torch.Generator().manual_seed(11)
    seqs = [torch.randint(0, len(tok), (L,), generator=g) for L in LENGTHS]
    ids, pos, cu, mx = _pack(seqs)
    with torch.no_grad():
        got = packed_logits(packed_model, ids, pos, cu, mx)
        want = torch.cat([plain(s[None]).logits[0] for s in seqs])
        # without the varlen kwargs, boundaries come from position_ids restarting at 0
        via_pos = packed_model(input_ids=ids[None], position_ids=pos[None]).logits[0]
    assert got.shape == (sum(LENGTHS), len(tok))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(via_pos, want, rtol=1e-5, atol=1e-5)
    # and the packing really matters: full causal attention over the row gives different logits
    full = plain(ids[None]).logits[0]
    assert (full - want).abs().max() > 1e-3


def test_packed_gradients_equal_one_sample_at_a_time():
    tok, cfg = tiny("qwen2")
    a = load_model(cfg, dtype="float32", device="cpu", seed=2)
    b = load_model(cfg, dtype="float32", device="cpu", attn="sdpa", seed=2)
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, len(tok), (L,), generator=g) for L in LENGTHS]
    ids, pos, cu, mx = _pack(seqs)
    w = torch.randn(sum(LENGTHS), len(tok), generator=g)
    (packed_logits(a, ids, pos, cu, mx) * w).sum().backward()
    (torch.cat([b(s[None]).logits[0] for s in seqs]) * w).sum().backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("window", [None, 3])
def test_backends_agree_on_random_inputs(window):
    g = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 5, 6, 17, 20], dtype=torch.int32)
    q = torch.randn(20, 4, 8, generator=g)
    k = torch.randn(20, 2, 8, generator=g)
    v = torch.randn(20, 2, 8, generator=g)
    # plain reference: an explicit softmax per sample, GQA by repetition
    ref = torch.empty_like(q)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        kk, vv = k[a:b].repeat_interleave(2, 1), v[a:b].repeat_interleave(2, 1)
        s = torch.einsum("qhd,khd->hqk", q[a:b], kk) * 8**-0.5
        i = torch.arange(b - a)
        allowed = i[None, :] <= i[:, None]
        if window:
            allowed &= i[:, None] - i[None, :] < window
        s = s.masked_fill(~allowed, float("-inf"))
        ref[a:b] = torch.einsum("hqk,khd->qhd", s.softmax(-1), vv)
    for backend in ("sdpa_mask", "loop"):
        out = A.varlen_attention_packed(q, k, v, cu, 11, sliding_window=window, backend=backend)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=backend)


def test_cpu_backend_selection(monkeypatch):
    assert A.available_backends("cpu") == ["sdpa_mask", "loop"]
    assert A.select_backend("cpu", num_tokens=100) == "auto"  # measured on the real inputs
    monkeypatch.setattr(A, "MASK_MAX_TOKENS", 64)
    assert A.select_backend("cpu", num_tokens=100) == "loop"  # a dense mask this big is never tried
    assert A.select_backend("cpu", "loop") == "loop"
    with pytest.raises(ValueError, match="not available on cpu"):
        A.select_backend("cpu", "torch_varlen")
    with pytest.raises(ValueError, match="unknown"):
        A.select_backend("cpu", "magic")


def test_fp32_never_reaches_the_flash_kernels(monkeypatch):
    """precision='fp32' on CUDA: 'auto' must not hand fp32 to flash kernels (16-bit only); it takes SDPA."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(11, 4, 8, generator=g) for _ in range(3))
    cu = torch.tensor([0, 4, 11], dtype=torch.int32)
    ref = A.varlen_attention_packed(q, k, v, cu, 7, backend="loop")
    monkeypatch.setattr(A, "select_backend", lambda *a, **kw: "torch_varlen")  # as on a CUDA machine
    torch.testing.assert_close(A.varlen_attention_packed(q, k, v, cu, 7), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs float16/bfloat16 inputs"):
        A.varlen_attention_packed(q, k, v, cu, 7, backend="torch_varlen")


def test_cu_seqlens_from_position_ids():
    pos = torch.tensor([[0, 1, 2, 0, 0, 1]])
    assert A.cu_seqlens_from_position_ids(pos).tolist() == [0, 3, 4, 6]


def test_registered_in_transformers():
    from transformers import AttentionInterface

    name = A.register_varlen_attention()
    assert AttentionInterface._global_mapping[name] is A.leafe_varlen_attention


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_stock_sdpa(side):
    """Evaluation with a padded [B, T] batch through the same model must match stock SDPA."""
    tok, cfg = tiny("llama")
    m = load_model(cfg, dtype="float32", device="cpu", seed=4).eval()
    ref = load_model(cfg, dtype="float32", device="cpu", attn="sdpa", seed=4).eval()
    ids = torch.randint(0, len(tok), (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    pad = slice(0, 2) if side == "left" else slice(4, 6)
    mask[1, pad] = 0
    with torch.no_grad():
        got = m(input_ids=ids, attention_mask=mask).logits
        want = ref(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)


def test_kv_cached_generation_matches_stock_sdpa():
    tok, cfg = tiny("qwen2")
    m = load_model(cfg, dtype="float32", device="cpu", seed=6).eval()
    ref = load_model(cfg, dtype="float32", device="cpu", attn="sdpa", seed=6).eval()
    ids = torch.randint(0, len(tok), (2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, :2] = 0  # left padding, as batched generation uses
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        got = m.generate(input_ids=ids, attention_mask=mask, **kw)
        want = ref.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash_attn", "torch_varlen"])
def test_gpu_varlen_backends_match_loop(backend):
    if backend not in A.available_backends("cuda"):
        pytest.skip(f"{backend} not available")
    g = torch.Generator(device="cuda").manual_seed(0)
    cu = torch.tensor([0, 100, 101, 357, 512], dtype=torch.int32, device="cuda")
    q = torch.randn(512, 8, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(512, 2, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(512, 2, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    ref = A.varlen_attention_packed(q.float(), k.float(), v.float(), cu, 256, backend="loop")
    out = A.varlen_attention_packed(q, k, v, cu, 256, backend=backend)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)  # bf16 inputs vs an fp32 reference


# ----------------------------------------------------------------------------------- tree attention
def _random_tree(g: torch.Generator, chunks: int = 3):
    """A random forest in pre-order: subtree_end, depth and chunk bounds (several roots per chunk)."""
    ends, depth, cu = [], [], [0]
    for _ in range(chunks):
        base = len(ends)
        stack = []  # open nodes: index
        n = int(torch.randint(1, 12, (1,), generator=g))
        for i in range(n):
            # close a random number of open nodes, then open a child of the top (or a new root)
            pops = int(torch.randint(0, len(stack) + 1, (1,), generator=g)) if stack else 0
            for _ in range(pops):
                ends[stack.pop()] = base + i
            depth.append(len(stack))
            ends.append(-1)
            stack.append(base + i)
        for j in stack:
            ends[j] = base + n
        cu.append(base + n)
    return (torch.tensor(ends, dtype=torch.int32), torch.tensor(depth, dtype=torch.int32),
            torch.tensor(cu, dtype=torch.int32))


def _tree_reference(q, k, v, ends, depth, window=None):
    """Explicit softmax over each query's ancestors (found by walking the pre-order), GQA by repetition."""
    T, H, D = q.shape
    kk, vv = k.repeat_interleave(H // k.shape[1], 1), v.repeat_interleave(H // k.shape[1], 1)
    out = torch.empty_like(q)
    for j in range(T):
        anc = [i for i in range(j + 1) if j < ends[i]]
        if window is not None:
            anc = [i for i in anc if depth[j] - depth[i] < window]
        s = torch.einsum("hd,khd->hk", q[j], kk[anc]) * D**-0.5
        out[j] = torch.einsum("hk,khd->hd", s.softmax(-1), vv[anc])
    return out


@pytest.mark.parametrize("window", [None, 2])
@pytest.mark.parametrize("backend", ["tree_sdpa", "tree_chunks", "tree_paths"])
def test_tree_backends_match_reference(backend, window):
    g = torch.Generator().manual_seed(7)
    for _ in range(5):
        ends, depth, cu = _random_tree(g)
        T = len(ends)
        q, k, v = torch.randn(T, 4, 8, generator=g), torch.randn(T, 2, 8, generator=g), torch.randn(T, 2, 8, generator=g)
        tm = A.TreeMask(ends, depth, cu)
        out = A.tree_attention(q, k, v, tm, sliding_window=window, backend=backend)
        torch.testing.assert_close(out, _tree_reference(q, k, v, ends.tolist(), depth.tolist(), window),
                                   rtol=1e-5, atol=1e-5)


def test_flat_attention_is_the_chain_special_case():
    """subtree_end = end of each sample reproduces the varlen (flat) attention: one contract for both."""
    g = torch.Generator().manual_seed(1)
    cu = torch.tensor([0, 5, 6, 17, 20], dtype=torch.int32)
    q, k, v = torch.randn(20, 4, 8, generator=g), torch.randn(20, 2, 8, generator=g), torch.randn(20, 2, 8, generator=g)
    ends = torch.repeat_interleave(cu[1:], torch.diff(cu))
    depth = torch.cat([torch.arange(int(n)) for n in torch.diff(cu)]).int()
    out = A.tree_attention(q, k, v, A.TreeMask(ends, depth, cu), backend="tree_sdpa")
    torch.testing.assert_close(out, A.varlen_attention_packed(q, k, v, cu, 11, backend="loop"), rtol=1e-5, atol=1e-5)


def test_tree_mask_built_once_per_micro_batch(monkeypatch):
    """All layers share the micro-batch's TreeMask: the dense mask is built once, not once per layer."""
    tok, cfg = tiny("qwen2")
    m = load_model(cfg, dtype="float32", device="cpu", tree_attn="tree_sdpa", seed=1).eval()
    assert cfg.num_hidden_layers > 1
    calls, masks, real = [], [], A.TreeMask.dense

    def counting(self, *a, **kw):
        calls.append(len(self._cache))
        masks.append(self)
        return real(self, *a, **kw)

    monkeypatch.setattr(A.TreeMask, "dense", counting)
    ends = torch.tensor([6, 3, 3, 6, 6, 6], dtype=torch.int32)  # root, child chain of 2, sibling chain of 2
    depth = torch.tensor([0, 1, 2, 1, 2, 3], dtype=torch.int32)
    ids = torch.randint(0, len(tok), (6,))
    with torch.no_grad():
        packed_logits(m, ids, depth, torch.tensor([0, 6], dtype=torch.int32), 6, ends)
    assert len(calls) == cfg.num_hidden_layers  # every layer asked for the mask ...
    assert len({id(t) for t in masks}) == 1  # ... of one TreeMask ...
    assert calls[0] == 0 and all(c == 1 for c in calls[1:])  # ... built by the first layer, reused by the rest


def test_backend_is_chosen_per_model():
    """Loading a second model with another backend must not change the first model's backend."""
    _, cfg = tiny("qwen2")
    a = load_model(cfg, dtype="float32", device="cpu", attn="loop", tree_attn="tree_chunks", seed=1)
    b = load_model(cfg, dtype="float32", device="cpu", attn="sdpa_mask", tree_attn="tree_sdpa", seed=1)
    assert A.model_backend(a) == ("loop", "tree_chunks")
    assert A.model_backend(b) == ("sdpa_mask", "tree_sdpa")
    attn_a = next(mod for name, mod in a.named_modules() if name.endswith("self_attn"))
    assert getattr(attn_a, "leafe_attn_backend") == "loop"
    assert not hasattr(A, "_forced_backend") and not hasattr(A, "set_backend")
    with pytest.raises(ValueError, match="tree_attn"):
        load_model(cfg, dtype="float32", device="cpu", tree_attn="magic")


def test_measured_choice_picks_the_fastest_and_caches():
    import time as _t

    calls = []

    def slow():
        calls.append("slow")
        _t.sleep(0.02)

    def fast():
        calls.append("fast")

    def broken():
        raise RuntimeError("cannot run here")

    key = ("test", object())
    assert A.measured_choice(key, {"slow": slow, "broken": broken, "fast": fast}) == "fast"
    n = len(calls)
    assert A.measured_choice(key, {"slow": slow, "fast": fast}) == "fast" and len(calls) == n  # cached
    assert A.measured_backends()[key] == "fast"


def test_no_hf_mask_is_built_for_packed_rows(monkeypatch):
    """The packed forward hands transformers a precomputed (empty) mask: its mask code never runs."""
    import transformers.masking_utils as mu

    tok, cfg = tiny("qwen2")
    m = load_model(cfg, dtype="float32", device="cpu", attn="loop", seed=1).eval()

    def boom(*a, **kw):
        raise AssertionError("transformers built a mask for a packed row")

    monkeypatch.setattr(mu, "find_packed_sequence_indices", boom)  # the host sync of transformers' mask code
    monkeypatch.setitem(mu.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, A.VARLEN_ATTENTION, boom)
    ids, pos, cu, mx = _pack([torch.randint(0, len(tok), (L,)) for L in LENGTHS])
    with torch.no_grad():
        packed_logits(m, ids, pos, cu, mx)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 64])
def test_gpu_flex_tree_mask_matches_dense(window):
    """CUDA: the compiled flex BlockMask path equals the dense tree mask (forward and gradients)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    g = torch.Generator().manual_seed(3)
    ends, depth, cu = _random_tree(g, chunks=40)
    ends, depth, cu = ends.cuda(), depth.cuda(), cu.cuda()
    T = len(ends)
    q, k, v = (torch.randn(T, h, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for h in (8, 2, 2))
    tm = A.TreeMask(ends, depth, cu)
    out = A.tree_attention(q, k, v, tm, sliding_window=window, backend="flex")
    ref = A.tree_attention(q.float(), k.float(), v.float(), tm, sliding_window=window, backend="tree_sdpa")
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    gq = torch.autograd.grad(out.float().sum(), q)[0]
    rq = torch.autograd.grad(ref.sum(), q)[0]
    torch.testing.assert_close(gq.float(), rq.float(), rtol=5e-2, atol=5e-2)
