"""The scripted test engine follows its script exactly and honours sampling limits like a real one."""

from __future__ import annotations

import pytest

from leafe_fast.engines.base import GenerationRequest, RolloutEngine, SamplingParams
from leafe_fast.engines.scripted import ScriptedEngine, ScriptedReply

STOP = 99


def req(ids, rid="r", max_new=16, stops=(STOP,), n=1):
    return GenerationRequest(list(ids), SamplingParams(max_new_tokens=max_new, stop_token_ids=stops, n=n), rid)


def test_callback_first_then_queue_and_everything_recorded():
    engine = ScriptedEngine(lambda r: [7, 8] if r.input_ids[0] == 1 else None, queue=[[5], [6]])
    assert isinstance(engine, RolloutEngine)
    out = engine.generate([req([1, 2], "a"), req([3], "b")])
    assert [(r.request_id, r.output_ids) for r in out] == [("a", [7, 8, STOP]), ("b", [5, STOP])]
    out = engine.generate([req([4], "c")])
    assert out[0].output_ids == [6, STOP]
    assert [r.request_id for r in engine.requests] == ["a", "b", "c"]
    assert [len(b) for b in engine.batches] == [2, 1]
    with pytest.raises(LookupError, match="'d'"):
        engine.generate([req([4], "d")])


def test_stop_ids_cut_and_length_limit_and_finish_reasons():
    engine = ScriptedEngine(queue=[[1, STOP, 2, 3], [1, 2, 3, 4, 5], ScriptedReply([4, 5], append_stop=False), [1]])
    a, b, c, d = engine.generate([req([0]), req([0], max_new=3), req([0]), req([0], stops=())])
    assert (a.output_ids, a.finish_reason) == ([1, STOP], "stop")
    assert (b.output_ids, b.finish_reason) == ([1, 2, 3], "length")
    assert (c.output_ids, c.finish_reason) == ([4, 5], "length")
    assert (d.output_ids, d.finish_reason) == ([1], "length")
    assert [r.output_tokens for r in (a, b, c, d)] == [2, 3, 2, 1]


def test_text_replies_use_the_codec_and_n_samples_are_contiguous():
    enc = lambda s: [ord(c) for c in s]  # noqa: E731
    dec = lambda ids: "".join(chr(i) for i in ids if i != STOP)  # noqa: E731
    engine = ScriptedEngine(queue=["hi", "yo", "ok"], encode=enc, decode=dec)
    out = engine.generate([req([0], "x", n=2), req([0], "y")])
    assert [(r.request_id, r.text) for r in out] == [("x", "hi"), ("x", "yo"), ("y", "ok")]
    with pytest.raises(TypeError, match="encode"):
        ScriptedEngine(queue=["text"]).generate([req([0])])


def test_cached_tokens_model_a_radix_cache():
    engine = ScriptedEngine(lambda r: [50, 51])
    (a,) = engine.generate([req([1, 2, 3, 4])])
    assert (a.prompt_tokens, a.cached_tokens) == (4, 0)
    # the next turn extends prompt + output: all of it is cached
    (b,) = engine.generate([req([1, 2, 3, 4, 50, 51, STOP, 9, 9])])
    assert b.cached_tokens == 7
    # a branch off the first prompt shares 3 tokens; an identical prompt still recomputes its last token
    c, d = engine.generate([req([1, 2, 3, 8]), req([1, 2, 3, 8])])
    assert (c.cached_tokens, d.cached_tokens) == (3, 3)
    assert ScriptedEngine(lambda r: [1], simulate_cache=False).generate([req([1])])[0].cached_tokens == 0


def test_update_weights_and_close_are_recorded():
    engine = ScriptedEngine(queue=[[1]])
    engine.update_weights({"w": 1})
    engine.close()
    assert engine.weight_updates == [{"w": 1}] and engine.closed
    with pytest.raises(RuntimeError, match="closed"):
        engine.generate([req([0])])
