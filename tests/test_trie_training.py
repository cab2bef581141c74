"""Trie batches train exactly like flat batches: same loss, same gradient for every parameter, same logits.

A token of the trie attends to its ancestors only (``subtree_end``), which are exactly the tokens before it
in every sample that contains it, so hidden states, losses and gradients must match the flat layout up to
summation order: relative error <= 1e-5 in fp32 (and far below in float64).
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_packing_trie import random_forest  # noqa: E402
from test_train_utils import tiny  # noqa: E402

from leafe_fast.loss import LossOptions, group_norms  # noqa: E402
from leafe_fast.packing import pack  # noqa: E402
from leafe_fast.train.model import LeafeCausalLM, as_batch, load_model, packed_logits  # noqa: E402


def _forest(seed: int, vocab: int, trees: int = 5):
    """random_forest with token ids spread over the tiny vocabulary (collisions kept: ids from a small set)."""
    samples = random_forest(seed, trees, vocab=5)
    remap = np.random.default_rng(seed).choice(np.arange(3, vocab), 7, replace=False)
    for s in samples:
        s.input_ids = remap[s.input_ids].astype(np.int32)
    return samples


def _step_grads(model, wrapper, micro_batches):
    model.zero_grad(set_to_none=True)
    batches = [as_batch(mb.to_torch()) for mb in micro_batches]
    norms = group_norms([b.group for b in batches], num_groups=2)
    total = 0.0
    for b in batches:
        out = wrapper(b, norms)
        out.loss.backward()
        total += float(out.loss.detach())
    return total, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# float64: transformers' RMSNorm computes in float32 whatever the model dtype, so float64 runs agree to ~1e-8,
# not to 1e-15; still two orders tighter than the fp32 bound.
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-7)])
@pytest.mark.parametrize("tree_attn", ["tree_sdpa", "tree_chunks", "tree_paths"])
def test_trie_step_has_the_flat_loss_and_gradients(dtype, tol, tree_attn):
    tok, cfg = tiny("qwen2")
    model = load_model(cfg, dtype=dtype, device="cpu", attn="loop", tree_attn=tree_attn, seed=3)
    wrapper = LeafeCausalLM(model, LossOptions(impl="torch", lambdas=(1.0, 0.7)))
    checked = 0
    for seed in range(4):
        samples = _forest(seed, len(tok))
        flat = pack(samples, 96, layout="flat", truncation="left", shuffle=False)
        trie = pack(samples, 96, layout="trie", truncation="left", shuffle=False)
        assert trie.stats.trie_tokens <= flat.stats.flat_tokens
        loss_f, g_f = _step_grads(model, wrapper, flat.micro_batches)
        loss_t, g_t = _step_grads(model, wrapper, trie.micro_batches)
        assert abs(loss_t - loss_f) <= tol * abs(loss_f)
        assert g_f.keys() == g_t.keys() and len(g_f) == len(list(model.parameters()))
        for name in g_f:
            assert _rel(g_t[name], g_f[name]) <= tol, (seed, name, _rel(g_t[name], g_f[name]))
        checked += trie.stats.flat_tokens - trie.stats.trie_tokens
    assert checked > 0, "the random trees must actually share tokens"


def test_trie_optimizer_step_reaches_the_flat_weights():
    tok, cfg = tiny("llama")
    samples = _forest(7, len(tok), trees=6)
    weights = []
    for layout in ("flat", "trie"):
        model = load_model(cfg, dtype=torch.float64, device="cpu", attn="loop", tree_attn="tree_sdpa", seed=5)
        wrapper = LeafeCausalLM(model, LossOptions(impl="torch"))
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)  # linear in the gradient: exactness carries over
        packing = pack(samples, 64, layout=layout, truncation="left", seed=1)
        for _ in range(2):
            _step_grads(model, wrapper, packing.micro_batches)
            opt.step()
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name], weights[0][name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_each_target_logit_equals_the_one_sample_forward(family):
    tok, cfg = tiny(family)
    packed = load_model(cfg, dtype="float32", device="cpu", tree_attn="tree_sdpa", seed=1).eval()
    plain = load_model(cfg, dtype="float32", device="cpu", attn="sdpa", seed=1).eval()
    samples = _forest(3, len(tok), trees=4)
    trie = pack(samples, 128, layout="trie", truncation="left", shuffle=False)
    n_rows = 0
    with torch.no_grad():
        for mb in trie.micro_batches:
            t = mb.to_torch()
            logits = packed_logits(packed, t["input_ids"], t["position_ids"], t["cu_seqlens"], mb.max_seqlen,
                                   t["subtree_end"])
            # rows of sample s, in position order: the sample's targets
            m = 0
            for s in mb.sample_ids.tolist():
                ids = torch.as_tensor(samples[s].input_ids[-128:], dtype=torch.long)
                want = plain(ids[None]).logits[0]
                pos = np.flatnonzero(samples[s].target_mask[-128:][1:]) + 1
                got_rows = mb.rows[m : m + len(pos)]
                assert (mb.targets[m : m + len(pos)] == ids[pos].numpy()).all()
                torch.testing.assert_close(logits[torch.as_tensor(got_rows)], want[torch.as_tensor(pos - 1)],
                                           rtol=1e-5, atol=1e-5)
                m += len(pos)
                n_rows += len(pos)
            assert m == mb.num_targets
    assert n_rows > 0


def test_trainer_trie_and_flat_layouts_reach_the_same_weights():
    """N optimizer steps through the Trainer: layout='trie' and 'flat' give the same weights.

    Every step covers the whole data (grad_accum >= micro-batches), so both layouts take the same steps;
    AdamW's eps is raised so that its update is Lipschitz in the gradient (with eps=1e-8 an entry whose
    gradient is ~1e-9 turns fp32 rounding noise into an O(lr) update difference).
    """
    from leafe_fast.train.trainer import TrainConfig, Trainer

    tok, cfg = tiny("qwen2")
    samples = _forest(21, len(tok), trees=6)
    weights = {}
    for layout in ("flat", "trie"):
        model = load_model(cfg, dtype="float32", device="cpu", attn="loop", tree_attn="tree_sdpa", seed=9)
        t = Trainer(model, samples, TrainConfig(max_steps=3, token_budget=64, grad_accum=64, lr=1e-3, eps=1e-3,
                                                truncation="left", layout=layout, progress=False, peak_flops=None,
                                                precision="fp32"))
        t.train()
        weights[layout] = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name in weights["flat"]:
        torch.testing.assert_close(weights["trie"][name], weights["flat"][name], rtol=1e-5, atol=1e-7, msg=name)
    moved = max(float((weights["flat"][n] - p0.detach()).abs().max()) for n, p0 in
                load_model(cfg, dtype="float32", device="cpu", seed=9).named_parameters())
    assert moved > 1e-4, "the steps must actually change the weights"
