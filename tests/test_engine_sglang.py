"""SGLang backend: argument mapping checked against a fake ``sglang`` module and a local HTTP stub
(real SGLang is not installed in CI)."""

from __future__ import annotations

import json
import sys
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from leafe_fast.engines import GenerationRequest, SamplingParams, make_engine
from leafe_fast.engines.sglang import SGLangEngine

EOS = 2


def _fake_outputs(input_ids, sampling_params, cached_by_prompt):
    """Imitates SGLang: a few tokens, then EOS (dropped from ids, reported as matched) or length."""
    outs = []
    for ids, sp in zip(input_ids, sampling_params):
        n = sp["max_new_tokens"]
        gen = [(ids[-1] + j + 1) % 50 + 3 for j in range(min(n, 3))]
        if n > 3:
            finish, ids_out = {"type": "stop", "matched": EOS}, gen  # SGLang trims the stop id here
        else:
            finish, ids_out = {"type": "length", "length": n}, gen
        key = tuple(ids)
        cached = cached_by_prompt.get(key, 0)
        cached_by_prompt[key] = len(ids) - 1
        outs.append(
            {
                "output_ids": ids_out,
                "meta_info": {
                    "prompt_tokens": len(ids),
                    "cached_tokens": cached,
                    "completion_tokens": len(gen) + (finish["type"] == "stop"),
                    "finish_reason": finish,
                },
            }
        )
    return outs


class _FakeEngine:
    instances: list["_FakeEngine"] = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls: list[tuple[str, dict]] = []
        self.cached: dict = {}
        _FakeEngine.instances.append(self)

    # Parameter names as in sglang.Engine (python/sglang/srt/entrypoints/engine.py), so a renamed or
    # misspelt keyword fails here as it would against the real engine.
    def generate(self, prompt=None, sampling_params=None, input_ids=None, *, stream=False):
        kw = {"input_ids": input_ids, "sampling_params": sampling_params}
        assert prompt is None and not stream
        self.calls.append(("generate", kw))
        return _fake_outputs(input_ids, sampling_params, self.cached)

    def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True):
        assert load_format is None
        self.calls.append(("update_weights_from_tensor", {"named_tensors": named_tensors, "flush_cache": flush_cache}))
        return True, "ok"

    def update_weights_from_disk(self, model_path, load_format=None):
        assert load_format is None
        self.calls.append(("update_weights_from_disk", {"model_path": model_path}))
        return (not model_path.endswith("bad")), "cannot load", 0

    def flush_cache(self):
        self.calls.append(("flush_cache", {}))
        self.cached.clear()

    def shutdown(self):
        self.calls.append(("shutdown", {}))


@pytest.fixture
def fake_sglang(monkeypatch):
    mod = types.ModuleType("sglang")
    mod.Engine = _FakeEngine
    monkeypatch.setitem(sys.modules, "sglang", mod)
    _FakeEngine.instances.clear()
    return mod


def test_engine_arguments_and_request_mapping(fake_sglang):
    eng = make_engine("sglang", model_path="/models/x", mem_fraction_static=0.5)
    fake = _FakeEngine.instances[-1]
    assert fake.kwargs == {
        "model_path": "/models/x",
        "disable_radix_cache": False,
        "schedule_policy": "lpm",
        "skip_tokenizer_init": True,
        "mem_fraction_static": 0.5,
    }
    reqs = [
        GenerationRequest([5, 6, 7], SamplingParams(temperature=0.0, max_new_tokens=8, stop_token_ids=(9, EOS)), "a"),
        GenerationRequest([5, 6, 8], SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=2, seed=11, n=2), "b"),
    ]
    res = eng.generate(reqs)
    (name, kw), = fake.calls
    assert name == "generate"
    assert kw["input_ids"] == [[5, 6, 7], [5, 6, 8], [5, 6, 8]]
    assert kw["sampling_params"] == [
        {"max_new_tokens": 8, "temperature": 0.0, "top_p": 1.0, "n": 1, "stop_token_ids": [9, EOS]},
        {"max_new_tokens": 2, "temperature": 0.7, "top_p": 0.9, "n": 1, "sampling_seed": 11},
        {"max_new_tokens": 2, "temperature": 0.7, "top_p": 0.9, "n": 1, "sampling_seed": 12},
    ]
    assert [r.request_id for r in res] == ["a", "b", "b"]
    assert res[0].finish_reason == "stop" and res[0].output_ids[-1] == EOS and res[0].output_tokens == 4
    assert res[1].finish_reason == "length" and len(res[1].output_ids) == 2
    assert [r.prompt_tokens for r in res] == [3, 3, 3]
    assert [r.cached_tokens for r in res] == [0, 0, 2]  # read from meta_info, not computed here
    eng.close()
    assert fake.calls[-1][0] == "shutdown"


def test_weight_updates_and_errors(fake_sglang, tmp_path):
    eng = SGLangEngine(model_path="/models/x")
    fake = _FakeEngine.instances[-1]
    w = {"lm_head.weight": torch.ones(2, 2)}
    eng.update_weights(w)
    name, kw = fake.calls[-1]
    assert name == "update_weights_from_tensor" and kw["flush_cache"] is True
    assert kw["named_tensors"][0][0] == "lm_head.weight"
    eng.update_weights(tmp_path)
    assert [c[0] for c in fake.calls[-2:]] == ["update_weights_from_disk", "flush_cache"]
    assert fake.calls[-2][1] == {"model_path": str(tmp_path)}
    with pytest.raises(RuntimeError, match="cannot load"):
        eng.update_weights(str(tmp_path / "bad"))
    with pytest.raises(TypeError, match="state dict or a local path"):
        eng.update_weights(3)
    fake.generate = lambda **kw: [{"output_ids": [], "meta_info": {"finish_reason": {"type": "abort", "message": "oom"}}}]
    with pytest.raises(RuntimeError, match="aborted.*oom"):
        eng.generate([GenerationRequest([1], SamplingParams())])
    with pytest.raises(ValueError, match="input_ids is empty"):
        eng.generate([GenerationRequest([], SamplingParams())])


def test_missing_sglang_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sglang", None)  # import sglang -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'leafe-fast\[sglang\]'"):
        SGLangEngine(model_path="/models/x")
    with pytest.raises(ValueError, match="exactly one"):
        SGLangEngine()


class _Stub(BaseHTTPRequestHandler):
    seen: list = []
    cached: dict = {}

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        payload = json.loads(body)
        _Stub.seen.append((self.path, payload))
        if self.path == "/generate":
            out = _fake_outputs(payload["input_ids"], payload["sampling_params"], _Stub.cached)
        elif self.path == "/update_weights_from_disk":
            out = {"success": True, "message": ""}
        elif self.path == "/flush_cache":
            out = None
        else:
            self.send_error(404)
            return
        data = json.dumps(out).encode() if out is not None else b""
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_http_server_mapping():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        eng = SGLangEngine(url=f"http://127.0.0.1:{server.server_address[1]}/", timeout=10)
        req = GenerationRequest([4, 5, 6, 7], SamplingParams(temperature=0.0, max_new_tokens=5), "r")
        first, second = eng.generate([req]), eng.generate([req])
        assert _Stub.seen[0][0] == "/generate" and _Stub.seen[0][1]["input_ids"] == [[4, 5, 6, 7]]
        assert first[0].cached_tokens == 0 and second[0].cached_tokens == 3
        assert first[0].output_ids[-1] == EOS and first[0].finish_reason == "stop"
        eng.update_weights("/ckpt/step1")
        assert [p for p, _ in _Stub.seen[-2:]] == ["/update_weights_from_disk", "/flush_cache"]
        with pytest.raises(TypeError, match="cannot be sent over HTTP"):
            eng.update_weights({"w": torch.zeros(1)})
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(ConnectionError, match="not reachable"):
        SGLangEngine(url=f"http://127.0.0.1:{server.server_address[1]}", timeout=2).generate([req])
