"""SGLang rollout backend: a thin mapping onto ``sglang.Engine`` or an SGLang server's HTTP API.

SGLang's radix cache is what makes LEAFE's branching cheap: a branch prompt is its parent's prefix
plus new tokens, so with the radix cache on and longest-prefix-match scheduling (``lpm``) the
shared prefix is served from KV memory. This module only maps our requests onto SGLang's API and
its ``meta_info`` back (``prompt_tokens``, ``cached_tokens``, ``completion_tokens``,
``finish_reason``); SGLang does the work and does the counting.

Status: the argument mapping is unit-tested with a fake ``sglang`` module and a local HTTP stub;
it has not been run against a real SGLang install in this project (not in CI, not on the H100
image used for measurements). ``sglang`` is imported lazily, only when an in-process engine is
built: ``pip install 'leafe-fast[sglang]'``.

Mapping details:
- each of a request's ``n`` samples is sent as its own entry (same ``input_ids``), so the result
  order is ours, not SGLang's; the radix cache shares their prefill.
- ``seed`` goes to SGLang's ``sampling_seed`` (only when set; older SGLang versions reject it).
- SGLang stops on EOS as well as ``stop_token_ids``; when it reports the matched stop id but
  the returned ids omit it, it is appended, so ``output_ids`` always ends with the stop id as in
  the ``RolloutEngine`` contract.
- weight updates: a state dict goes through ``update_weights_from_tensor`` (in-process only), a
  local path through ``update_weights_from_disk``; the radix cache is flushed afterwards, since
  KV computed with old weights is stale.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any, Sequence

from leafe_fast.engines.base import GenerationRequest, GenerationResult, SamplingParams

__all__ = ["SGLangEngine", "import_sglang"]

_INSTALL_HINT = "the SGLang backend needs the 'sglang' package: pip install 'leafe-fast[sglang]'"


def import_sglang() -> Any:
    try:
        import sglang
    except ImportError as e:
        raise ImportError(f"{_INSTALL_HINT} ({e})") from e
    return sglang


def sampling_to_sglang(s: SamplingParams, sample: int = 0) -> dict[str, Any]:
    """Our sampling settings for one sample as SGLang's ``sampling_params`` dict."""
    out: dict[str, Any] = {
        "max_new_tokens": s.max_new_tokens,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "n": 1,
    }
    if s.stop_token_ids:
        out["stop_token_ids"] = [int(t) for t in s.stop_token_ids]
    if s.seed is not None:
        out["sampling_seed"] = int(s.seed) + sample  # distinct, reproducible per sample
    return out


class SGLangEngine:
    """``RolloutEngine`` over SGLang. Give ``model_path`` (in-process ``sglang.Engine``) or ``url``
    (a running server, e.g. ``http://127.0.0.1:30000``). ``engine_kwargs`` go to
    ``sglang.Engine`` (``mem_fraction_static``, ``tp_size``, ``dtype``, ...); radix cache on and
    ``schedule_policy="lpm"`` are the defaults set here."""

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        *,
        url: str | None = None,
        tokenizer: Any = None,
        timeout: float = 600.0,
        **engine_kwargs: Any,
    ):
        if (model_path is None) == (url is None):
            raise ValueError("SGLangEngine: give exactly one of model_path (in-process) or url (server)")
        self.tokenizer = tokenizer
        self.timeout = timeout
        self.url = url.rstrip("/") if url else None
        self._engine = None
        if model_path is not None:
            sglang = import_sglang()
            kwargs = {
                "model_path": str(model_path),
                "disable_radix_cache": False,
                "schedule_policy": "lpm",
                "skip_tokenizer_init": True,  # token ids in and out; we decode ourselves
                **engine_kwargs,
            }
            self._engine = sglang.Engine(**kwargs)

    # --- RolloutEngine -----------------------------------------------------------------------
    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        ids: list[list[int]] = []
        params: list[dict[str, Any]] = []
        owners: list[GenerationRequest] = []
        for i, r in enumerate(requests):
            if not r.input_ids:
                raise ValueError(f"request {i} ({r.request_id!r}): input_ids is empty")
            if r.sampling.n < 1:
                raise ValueError(f"request {i} ({r.request_id!r}): n must be >= 1, got {r.sampling.n}")
            for k in range(r.sampling.n):
                ids.append([int(t) for t in r.input_ids])
                params.append(sampling_to_sglang(r.sampling, k))
                owners.append(r)
        if not ids:
            return []
        if self._engine is not None:
            outs = self._engine.generate(input_ids=ids, sampling_params=params)
        else:
            outs = self._post("/generate", {"input_ids": ids, "sampling_params": params})
        if isinstance(outs, Mapping):
            outs = [outs]
        outs = list(outs)
        if len(outs) != len(ids):
            raise RuntimeError(f"SGLang returned {len(outs)} outputs for {len(ids)} prompts")
        return [self._to_result(o, r) for o, r in zip(outs, owners)]

    def update_weights(self, source: object) -> None:
        if isinstance(source, Mapping):
            if self._engine is None:
                raise TypeError(
                    "SGLangEngine(url=...): a state dict cannot be sent over HTTP; save it "
                    "(safetensors) and pass the directory, or use the in-process engine"
                )
            _check(self._engine.update_weights_from_tensor(named_tensors=list(source.items()), flush_cache=True))
        elif isinstance(source, (str, os.PathLike)):
            path = os.fspath(source)
            if self._engine is not None:
                _check(self._engine.update_weights_from_disk(model_path=path))
            else:
                _check(self._post("/update_weights_from_disk", {"model_path": path}))
            self.flush_cache()
        else:
            raise TypeError(f"update_weights: expected a state dict or a local path, got {type(source).__name__}")

    def flush_cache(self) -> None:
        if self._engine is not None:
            self._engine.flush_cache()
        else:
            self._post("/flush_cache", None)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None

    # --- internals ---------------------------------------------------------------------------
    def _to_result(self, out: Mapping[str, Any], req: GenerationRequest) -> GenerationResult:
        meta = out.get("meta_info")
        if not isinstance(meta, Mapping):
            raise RuntimeError(f"SGLang output without meta_info (keys: {sorted(out)})")
        ids = out.get("output_ids", out.get("token_ids"))
        if ids is None:
            raise RuntimeError(f"SGLang output without output_ids/token_ids (keys: {sorted(out)})")
        ids = [int(t) for t in ids]
        finish = meta.get("finish_reason")
        kind = finish.get("type") if isinstance(finish, Mapping) else finish
        if kind == "abort":
            msg = finish.get("message", "") if isinstance(finish, Mapping) else ""
            raise RuntimeError(f"SGLang aborted request {req.request_id!r}: {msg}")
        if kind == "stop":
            matched = finish.get("matched") if isinstance(finish, Mapping) else None
            if isinstance(matched, int) and (not ids or ids[-1] != matched):
                ids.append(matched)
        elif kind != "length":
            raise RuntimeError(f"SGLang request {req.request_id!r}: unexpected finish_reason {finish!r}")
        if self.tokenizer is not None:
            body = ids[:-1] if kind == "stop" else ids
            text = self.tokenizer.decode(body, skip_special_tokens=False)
        else:
            text = str(out.get("text", ""))
        return GenerationResult(
            request_id=req.request_id,
            output_ids=ids,
            text=text,
            finish_reason="stop" if kind == "stop" else "length",
            prompt_tokens=int(meta.get("prompt_tokens", len(req.input_ids))),
            cached_tokens=int(meta.get("cached_tokens", 0)),
            output_tokens=len(ids),
        )

    def _post(self, route: str, payload: Any) -> Any:
        assert self.url is not None
        data = json.dumps(payload).encode() if payload is not None else b"{}"
        req = urllib.request.Request(
            self.url + route, data=data, headers={"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                body = resp.read()
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"SGLang server {self.url}{route}: HTTP {e.code}: {e.read()[:500]!r}") from e
        except urllib.error.URLError as e:
            raise ConnectionError(f"SGLang server {self.url} not reachable: {e.reason}") from e
        return json.loads(body) if body.strip() else None


def _check(result: Any) -> None:
    """SGLang weight updates answer (success, message, ...) or {"success": ..., "message": ...}."""
    ok, msg = True, ""
    if isinstance(result, tuple) and result and isinstance(result[0], bool):
        ok, msg = result[0], (result[1] if len(result) > 1 else "")
    elif isinstance(result, Mapping) and "success" in result:
        ok, msg = bool(result["success"]), result.get("message", "")
    if not ok:
        raise RuntimeError(f"SGLang weight update failed: {msg}")
