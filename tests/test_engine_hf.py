"""HF engine: matches transformers generate, prefix reuse changes nothing but cost, counts are exact."""

from __future__ import annotations

import random

import pytest
import torch

from leafe_fast.engines import GenerationRequest, SamplingParams, make_engine
from leafe_fast.engines.hf import HFEngine, PrefixKVCache, _Row, _sample
from leafe_fast.tiny import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer("qwen2")


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok, "qwen2", seed=0)


def _rand_ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 500) for _ in range(n)]


def _greedy(max_new: int = 8, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=max_new, **kw)


def _lcp(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_greedy_matches_transformers_generate_alone_and_batched(model, tok):
    rng = random.Random(0)
    prompts = [_rand_ids(rng, n) for n in (1, 7, 23, 40)]
    eng = HFEngine(model, tok, prefix_cache=False)
    batched = eng.generate([GenerationRequest(p, _greedy(10)) for p in prompts])
    for p, res in zip(prompts, batched):
        ref = model.generate(
            torch.tensor([p]), max_new_tokens=10, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=0
        )[0, len(p) :].tolist()
        if tok.eos_token_id in ref:  # generate pads after EOS; we stop there
            ref = ref[: ref.index(tok.eos_token_id) + 1]
        assert res.output_ids == ref
        assert res.output_tokens == len(ref) and res.prompt_tokens == len(p) and res.cached_tokens == 0


def test_prefix_reuse_on_vs_off_identical_and_cached_counts_exact(model, tok):
    """Exploration-shaped traffic: a root prompt, turns that extend it, branches at random points."""
    rng = random.Random(1)
    on, off = HFEngine(model, tok, prefix_cache=True), HFEngine(model, tok, prefix_cache=False)
    seen: list[list[int]] = []  # sequences whose KV the engine with reuse has computed
    traj = [_rand_ids(rng, 30)]
    for turn in range(3):
        prompts = []
        for t in traj:  # continue each trajectory, and branch one at a random earlier point
            prompts.append(t)
        cut = rng.randrange(1, len(traj[0]))
        prompts.append(traj[0][:cut] + _rand_ids(rng, rng.randint(1, 6)))  # "experience" inserted at cut
        if turn == 0:
            prompts.append(_rand_ids(rng, 12))  # unrelated prompt: nothing to reuse
        reqs = [GenerationRequest(p, _greedy(rng.randint(2, 9)), request_id=str(i)) for i, p in enumerate(prompts)]
        a, b = on.generate(reqs), off.generate(reqs)
        for req, ra, rb in zip(reqs, a, b):
            assert ra.output_ids == rb.output_ids
            assert ra.finish_reason == rb.finish_reason and ra.request_id == req.request_id
            assert rb.cached_tokens == 0
            p = req.input_ids
            expected = min(max((_lcp(p, s) for s in seen), default=0), len(p) - 1)
            assert ra.cached_tokens == expected
            seen.append(p)
        for req, ra in zip(reqs, a):
            seen.append(req.input_ids + ra.output_ids[:-1])
        traj = [req.input_ids + ra.output_ids + _rand_ids(rng, 5) for req, ra in zip(reqs[:2], a[:2])]
    assert on.stats.cached_tokens > 0
    assert on.stats.prefill_tokens == on.stats.prompt_tokens - on.stats.cached_tokens
    assert off.stats.prefill_tokens == off.stats.prompt_tokens


def test_seeded_sampling_independent_of_batch_and_n_shares_prefill(model, tok):
    rng = random.Random(2)
    prompt = _rand_ids(rng, 25)
    req = GenerationRequest(prompt, SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=12, seed=7))
    alone = HFEngine(model, tok, prefix_cache=False).generate([req])[0].output_ids
    again = HFEngine(model, tok, prefix_cache=False).generate([req])[0].output_ids
    others = [GenerationRequest(_rand_ids(rng, n), SamplingParams(temperature=0.8, max_new_tokens=20, seed=n)) for n in (3, 50)]
    mixed = HFEngine(model, tok, max_batch_size=3).generate([others[0], req, others[1]])[1].output_ids
    assert alone == again == mixed

    eng = HFEngine(model, tok)
    multi = eng.generate([GenerationRequest(prompt, SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=12, seed=7, n=3))])
    assert len(multi) == 3 and multi[0].output_ids == alone  # sample 0 uses the seed itself
    assert len({tuple(r.output_ids) for r in multi}) == 3
    assert [r.cached_tokens for r in multi] == [0, len(prompt), len(prompt)]
    assert eng.stats.prefill_tokens == len(prompt)


def test_n_larger_than_batch_and_results_in_request_order(model, tok):
    rng = random.Random(3)
    reqs = [GenerationRequest(_rand_ids(rng, 9), SamplingParams(temperature=1.0, max_new_tokens=4, seed=i, n=i + 1), str(i)) for i in range(3)]
    res = HFEngine(model, tok, max_batch_size=2).generate(reqs)
    assert [r.request_id for r in res] == ["0", "1", "1", "2", "2", "2"]
    ref = HFEngine(model, tok, max_batch_size=8).generate(reqs)
    assert [r.output_ids for r in res] == [r.output_ids for r in ref]


def test_stop_ids_length_and_zero_tokens(model, tok):
    rng = random.Random(4)
    prompt = _rand_ids(rng, 10)
    eng = HFEngine(model, tok)
    free = eng.generate([GenerationRequest(prompt, _greedy(6))])[0]
    assert free.finish_reason == "length" and len(free.output_ids) == 6
    stop_at = free.output_ids[2]
    first = free.output_ids.index(stop_at)
    stopped = eng.generate([GenerationRequest(prompt, _greedy(6, stop_token_ids=(stop_at,)))])[0]
    assert stopped.output_ids == free.output_ids[: first + 1] and stopped.finish_reason == "stop"
    assert stopped.text == tok.decode(free.output_ids[:first])
    none = eng.generate([GenerationRequest(prompt, _greedy(0))])[0]
    assert none.output_ids == [] and none.finish_reason == "length"
    short = HFEngine(tiny_model(tok, "qwen2", max_position_embeddings=len(prompt) + 3), tok)
    capped = short.generate([GenerationRequest(prompt, _greedy(6, stop_token_ids=()))])[0]
    assert len(capped.output_ids) <= 3 and (capped.finish_reason == "stop" or len(capped.output_ids) == 3)


def test_update_weights_from_state_dict_and_path_drops_cache(model, tok, tmp_path):
    from safetensors.torch import save_file

    other = tiny_model(tok, "qwen2", seed=1)
    rng = random.Random(5)
    prompt = _rand_ids(rng, 20)
    req = [GenerationRequest(prompt, _greedy(8))]
    want = HFEngine(other, tok).generate(req)[0].output_ids

    eng = HFEngine(tiny_model(tok, "qwen2", seed=0), tok)
    before = eng.generate(req)[0]
    assert eng.generate(req)[0].cached_tokens == len(prompt) - 1
    eng.update_weights(other.state_dict())
    after = eng.generate(req)[0]
    assert after.output_ids == want and after.cached_tokens == 0 and before.output_ids != want

    eng2 = HFEngine(tiny_model(tok, "qwen2", seed=0), tok)
    eng2.generate(req)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "model.safetensors"))
    eng2.update_weights(tmp_path)
    res = eng2.generate(req)[0]
    assert res.output_ids == want and res.cached_tokens == 0
    with pytest.raises(ValueError, match="unknown parameter names"):
        eng2.update_weights({"not.a.weight": torch.zeros(1), **tiny_model(tok, "qwen2", seed=2).state_dict()})
    assert eng2.generate(req)[0].output_ids == want  # the refused update changed nothing
    with pytest.raises(FileNotFoundError):
        eng2.update_weights(tmp_path / "missing")


def test_prefix_store_budget_lcp_supersede_and_lru():
    def kv(n):
        return [(torch.randn(2, n, 4), torch.randn(2, n, 4))]

    store = PrefixKVCache(max_tokens=10)
    store.insert([1, 2, 3], kv(3))
    store.insert([1, 2, 3, 4, 5], kv(5))  # supersedes [1, 2, 3]
    assert len(store) == 1 and store.total_tokens == 5
    store.insert([1, 2], kv(2))  # already covered
    assert len(store) == 1
    n, got = store.lookup([1, 2, 3, 9])
    assert n == 3 and got[0][0].shape == (2, 5, 4)
    store.insert([7, 8, 9, 10], kv(4))
    store.lookup([1, 2])  # [1..5] becomes most recent
    store.insert([5, 5, 5], kv(3))  # 12 > 10: evict the least recent, [7..10]
    assert store.total_tokens == 8 and store.lookup([7, 8])[0] == 0 and store.lookup([1])[0] == 1
    store.insert(list(range(11)), kv(11))  # larger than the budget: not stored
    assert store.total_tokens == 8
    with pytest.raises(ValueError, match="positions"):
        store.insert([1, 2], kv(3))


def test_engine_memory_stays_within_budget(model, tok):
    rng = random.Random(6)
    eng = HFEngine(model, tok, max_cached_tokens=60)
    for _ in range(4):
        eng.generate([GenerationRequest(_rand_ids(rng, 25), _greedy(5)) for _ in range(3)])
        assert eng.store.total_tokens <= 60


def _rows(n, temperature, top_p, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [_Row(0, 0, [1], SamplingParams(temperature=temperature, top_p=top_p), frozenset(), g, 0, 1) for _ in range(n)]


def test_sampler_matches_softmax_and_top_p_nucleus():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, 0.0])
    rows = _rows(4000, 1.0, 1.0)
    draws = torch.tensor(_sample(logits.expand(4000, -1).clone(), rows))
    freq = torch.bincount(draws, minlength=5).double() / 4000
    assert torch.allclose(freq, torch.softmax(logits.double(), 0), atol=0.03)
    p = torch.softmax(logits, 0)  # nucleus for top_p=0.6: tokens 0 (0.53) and 1 (0.20)
    assert p[0] < 0.6 < p[0] + p[1]
    draws = set(_sample(logits.expand(500, -1).clone(), _rows(500, 1.0, 0.6)))
    assert draws == {0, 1}
    assert set(_sample(logits.expand(50, -1).clone(), _rows(50, 1.0, 1e-6))) == {0}
    assert set(_sample(logits.expand(5, -1).clone(), _rows(5, 0.0, 1.0))) == {0}


def test_bad_requests_and_factory(model, tok):
    eng = make_engine("hf", model=model, tokenizer=tok)
    assert isinstance(eng, HFEngine)
    with pytest.raises(ValueError, match="input_ids is empty"):
        eng.generate([GenerationRequest([], _greedy())])
    with pytest.raises(ValueError, match="top_p"):
        eng.generate([GenerationRequest([5], SamplingParams(top_p=0.0))])
    with pytest.raises(ValueError, match="n must be"):
        eng.generate([GenerationRequest([5], SamplingParams(n=0))])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        eng.generate([GenerationRequest([5, 10**6], _greedy())])
    limit = model.config.max_position_embeddings
    with pytest.raises(ValueError, match="does not fit"):
        eng.generate([GenerationRequest([5] * limit, _greedy())])
    with pytest.raises(ValueError, match="unknown engine kind"):
        make_engine("vllm")


def test_sliding_window_models_are_refused(tok):
    from transformers import AutoModelForCausalLM

    from leafe_fast.tiny import tiny_config

    config = tiny_config(tok, "qwen2")
    config.use_sliding_window, config.sliding_window = True, 8
    config.layer_types = ["sliding_attention"] * config.num_hidden_layers
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(NotImplementedError, match="sliding-window"):
        HFEngine(model, tok)
