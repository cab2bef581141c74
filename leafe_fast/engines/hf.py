"""The embedded rollout engine: a transformers model, a small decode loop, and a prefix KV cache.

Why our own loop instead of ``model.generate``: it lets a prompt start from KV tensors computed
for an earlier prompt (exploration branches share long prefixes), gives each sample its own random
stream (so a seed fixes a sample's output whatever else is in the batch), and lets finished rows
leave the batch.

How a call runs: requests are cut into chunks of at most ``max_batch_size`` samples. Each distinct
prompt of a chunk is prefilled once, batch size 1, starting from the longest prefix found in the
prefix cache; its ``n`` samples then decode together with the other rows of the chunk in one
left-padded batch (explicit position ids, so padding never shifts RoPE positions). When a row
finishes, the KV of its prompt plus output goes back into the prefix cache, so the next turn of a
trajectory (prompt + action + observation + header) reuses it.

What is reported, honestly:

- ``cached_tokens`` of a sample = prompt tokens whose KV came from the prefix cache instead of being
  computed in this call. The first sample of a request gets the looked-up prefix length; the other
  ``n - 1`` samples share that sample's prefill, so all their prompt tokens count as cached.
  With ``prefix_cache=False`` nothing is stored and n=1 requests report 0.
- ``stats`` accumulates prompt, cached, computed-prefill and output tokens, and wall times.

Determinism: greedy decoding is deterministic. With sampling, a sample's random numbers come only
from ``(seed, sample index)``; the same request alone always gives the same output, and inside a
different batch it gives the same output unless float noise from a different padding/batch shape
moves a logit across a sampling boundary (not seen in tests; float64 would rule it out).
A request without a seed draws one from the engine's own generator (``seed`` argument).

Bad requests (empty, token ids outside the vocabulary, a prompt that fills the model's positions)
get a ValueError naming the request; generation that would run past the model's position limit
stops there with finish reason "length".

Limits: the prefill is per prompt (no batched prefill); KV for cached prefixes lives on the model's
device and is bounded by ``max_cached_tokens`` (tokens, all entries together); models with
sliding-window layers are refused with a clear error (KV slicing would be wrong for them).
"""

from __future__ import annotations

import inspect
import os
import random
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from leafe_fast.engines.base import GenerationRequest, GenerationResult, SamplingParams
from leafe_fast.trajectory import common_prefix_length

__all__ = ["HFEngine", "PrefixKVCache", "EngineStats"]

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), each [heads, tokens, head_dim]


class PrefixKVCache:
    """LRU store of per-sequence KV tensors, looked up by longest common token prefix.

    Any stored sequence that shares the first ``m`` tokens with a new prompt holds valid KV for
    those ``m`` positions (a position's KV depends only on the tokens up to it), so lookup takes
    the longest common prefix over all entries, not only entries that are whole prefixes.
    A linear scan over entries (numpy compares) is enough: the budget keeps them to dozens.
    """

    def __init__(self, max_tokens: int):
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        self.max_tokens = max_tokens
        self._entries: OrderedDict[int, tuple[np.ndarray, KV]] = OrderedDict()
        self._next_key = 0
        self.total_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, ids: Sequence[int]) -> tuple[int, KV | None]:
        """(length, KV) of the longest cached prefix of ``ids``; (0, None) if none."""
        arr = np.asarray(ids, dtype=np.int64)
        best_key, best_len = None, 0
        for key, (stored, _) in self._entries.items():
            n = common_prefix_length(arr, stored)
            if n > best_len:
                best_key, best_len = key, n
        if best_key is None:
            return 0, None
        self._entries.move_to_end(best_key)
        return best_len, self._entries[best_key][1]

    def insert(self, ids: Sequence[int], kv: KV) -> None:
        """Store KV for ``ids`` (``kv`` tensors hold exactly ``len(ids)`` positions)."""
        n = len(ids)
        if n == 0 or n > self.max_tokens:
            return
        if kv[0][0].shape[-2] != n:
            raise ValueError(f"KV holds {kv[0][0].shape[-2]} positions for {n} tokens")
        arr = np.asarray(ids, dtype=np.int64)
        for key, (stored, _) in list(self._entries.items()):
            lcp = common_prefix_length(arr, stored)
            if lcp == n:  # already covered by a longer (or equal) entry
                self._entries.move_to_end(key)
                return
            if lcp == len(stored):  # the new entry supersedes a prefix of it
                del self._entries[key]
                self.total_tokens -= len(stored)
        self._entries[self._next_key] = (arr, kv)
        self._next_key += 1
        self.total_tokens += n
        while self.total_tokens > self.max_tokens:
            _, (stored, _) = self._entries.popitem(last=False)
            self.total_tokens -= len(stored)

    def clear(self) -> None:
        self._entries.clear()
        self.total_tokens = 0


@dataclass
class EngineStats:
    requests: int = 0
    samples: int = 0
    prompt_tokens: int = 0  # summed over samples, as in the results
    cached_tokens: int = 0  # summed over samples, as in the results
    prefill_tokens: int = 0  # prompt tokens actually run through the model
    output_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "extra"} | self.extra


@dataclass
class _Row:
    req: int  # index of the request in the call
    sample: int  # sample index within the request
    prompt: list[int]
    params: SamplingParams
    stops: frozenset[int]
    gen: torch.Generator
    cached: int
    max_new: int  # max_new_tokens, capped by the model's position limit
    out: list[int] = field(default_factory=list)
    finish: str = ""


def _seed_for(seed: int, sample: int) -> int:
    # Distinct, reproducible streams per (seed, sample); sample 0 uses the seed itself.
    return (seed + sample * 0x9E3779B97F4A7C15) % (2**63)


class HFEngine:
    """Token-in/token-out generation with a transformers causal LM (CPU or GPU).

    ``model`` is a loaded ``PreTrainedModel`` or a local path; ``tokenizer`` (optional) only
    fills ``GenerationResult.text``.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        max_batch_size: int = 32,
        prefix_cache: bool = True,
        max_cached_tokens: int = 65536,
        seed: int = 0,
    ):
        if isinstance(model, (str, os.PathLike)):
            from transformers import AutoModelForCausalLM, AutoTokenizer

            path = str(model)
            if not Path(path).exists():
                raise FileNotFoundError(f"HFEngine: model path {path!r} does not exist (local paths only)")
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto")
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(path)
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if device is not None:
            model = model.to(device)
        if dtype is not None:
            model = model.to(dtype)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.max_batch_size = max_batch_size
        self.prefix_cache = prefix_cache
        self.store = PrefixKVCache(max_cached_tokens if prefix_cache else 0)
        self.stats = EngineStats()
        self._rng = random.Random(seed)
        self._check_full_attention()
        self._max_positions = getattr(model.config, "max_position_embeddings", None)
        self._vocab_size = model.get_input_embeddings().num_embeddings
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        eos = getattr(model.generation_config, "eos_token_id", None) if hasattr(model, "generation_config") else None
        if eos is None:
            eos = getattr(model.config, "eos_token_id", None)
        self._eos = frozenset(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None)

    # --- public API --------------------------------------------------------------------------
    @property
    def max_positions(self) -> int | None:
        """The model's ``max_position_embeddings`` (prompt + generated tokens of one request), if known."""
        return self._max_positions

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        for i, r in enumerate(requests):
            _validate(r, i)
            self._check_fits(r, i)
        rows = [
            self._make_row(i, k, r)
            for i, r in enumerate(requests)
            for k in range(r.sampling.n)
        ]
        with torch.inference_mode():
            for start in range(0, len(rows), self.max_batch_size):
                self._run_chunk(rows[start : start + self.max_batch_size])
        self.stats.requests += len(requests)
        out = []
        for row in rows:
            res = self._result(row, requests[row.req].request_id)
            self.stats.samples += 1
            self.stats.prompt_tokens += res.prompt_tokens
            self.stats.cached_tokens += res.cached_tokens
            self.stats.output_tokens += res.output_tokens
            out.append(res)
        return out

    def update_weights(self, source: object) -> None:
        """Load a (possibly partial) state dict, or weights from a local file/directory
        (``*.safetensors`` or ``*.bin``). Drops the prefix cache: its KV came from old weights."""
        if isinstance(source, Mapping):
            state = source
        elif isinstance(source, (str, os.PathLike)):
            state = _load_state_dict(Path(source))
        else:
            raise TypeError(f"update_weights: expected a state dict or a local path, got {type(source).__name__}")
        unknown = sorted(set(state) - set(self.model.state_dict()))
        if unknown:  # checked before loading, so a bad update changes nothing
            raise ValueError(f"update_weights: unknown parameter names {unknown[:5]}")
        self.store.clear()
        self.model.load_state_dict(state, strict=False)

    def clear_cache(self) -> None:
        self.store.clear()

    def close(self) -> None:
        self.store.clear()

    # --- internals ---------------------------------------------------------------------------
    def _check_full_attention(self) -> None:
        # Cropping and left-padding KV by slicing is only right when every layer keeps all
        # positions; sliding-window and recurrent layers do not.
        sliding = getattr(self._new_cache(None), "is_sliding", None) or []
        if any(sliding):
            raise NotImplementedError(
                "HFEngine supports full-attention models only; this model has sliding-window layers "
                "(use the SGLang backend for it)"
            )

    def _make_row(self, i: int, k: int, r: GenerationRequest) -> _Row:
        seed = r.sampling.seed if r.sampling.seed is not None else self._rng.getrandbits(62)
        gen = torch.Generator().manual_seed(_seed_for(seed, k))
        stops = frozenset(int(s) for s in r.sampling.stop_token_ids) | self._eos
        max_new = r.sampling.max_new_tokens
        if self._max_positions is not None:
            max_new = min(max_new, self._max_positions - len(r.input_ids))
        return _Row(i, k, list(r.input_ids), r.sampling, stops, gen, cached=0, max_new=max_new)

    def _check_fits(self, r: GenerationRequest, i: int) -> None:
        lo, hi = min(r.input_ids), max(r.input_ids)
        if lo < 0 or hi >= self._vocab_size:
            raise ValueError(f"request {i} ({r.request_id!r}): token id {lo if lo < 0 else hi} outside the vocabulary [0, {self._vocab_size})")
        if self._max_positions is not None and len(r.input_ids) >= self._max_positions:
            raise ValueError(
                f"request {i} ({r.request_id!r}): prompt of {len(r.input_ids)} tokens does not fit the model's "
                f"{self._max_positions} positions (generation needs at least one more)"
            )

    def _forward(self, ids: torch.Tensor, cache: Any, **kw: Any) -> torch.Tensor:
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **{self._cache_kw: cache}, **kw)
        return out.logits[:, -1, :].float()

    def _new_cache(self, kv: KV | None, batched: bool = False) -> Any:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        if kv is not None:
            for layer, (k, v) in enumerate(kv):
                cache.update(k if batched else k.unsqueeze(0), v if batched else v.unsqueeze(0), layer)
        return cache

    @staticmethod
    def _cache_kv(cache: Any) -> KV:
        if hasattr(cache, "layers"):
            return [(layer.keys, layer.values) for layer in cache.layers]
        return list(zip(cache.key_cache, cache.value_cache))  # transformers 4.x

    def _prefill(self, prompt: list[int]) -> tuple[torch.Tensor, KV, int]:
        """Logits after ``prompt``, its KV [heads, len, dim] per layer, and the reused length."""
        reused, kv = self.store.lookup(prompt) if self.prefix_cache else (0, None)
        reused = min(reused, len(prompt) - 1)  # the last token must run to give logits
        past = [(k[:, :reused], v[:, :reused]) for k, v in kv] if kv is not None and reused > 0 else None
        cache = self._new_cache(past)
        ids = torch.tensor([prompt[reused:]], dtype=torch.long, device=self.device)
        logits = self._forward(ids, cache)
        full = [(k[0], v[0]) for k, v in self._cache_kv(cache)]
        self.stats.prefill_tokens += len(prompt) - reused
        if self.prefix_cache:
            self.store.insert(prompt, full)
        return logits[0], full, reused

    def _run_chunk(self, rows: list[_Row]) -> None:
        t0 = time.perf_counter()
        prefills: dict[int, tuple[torch.Tensor, KV]] = {}
        for row in rows:
            if row.req in prefills:
                row.cached = len(row.prompt)  # shares the prefill of an earlier sample
                continue
            logits, kv, reused = self._prefill(row.prompt)
            prefills[row.req] = (logits, kv)
            row.cached = reused
        t1 = time.perf_counter()
        self.stats.prefill_s += t1 - t0

        active = [r for r in rows if r.max_new > 0]
        for r in rows:
            if r.max_new == 0:
                r.finish = "length"
        if not active:
            return
        # Left-padded batch cache from the per-prompt KV.
        lens = [len(r.prompt) for r in active]
        width = max(lens)
        first_kv = prefills[active[0].req][1]
        batch_kv: KV = []
        for layer in range(len(first_kv)):
            k0, v0 = first_kv[layer]
            ks = k0.new_zeros((len(active), k0.shape[0], width, k0.shape[2]))
            vs = v0.new_zeros((len(active), v0.shape[0], width, v0.shape[2]))
            for b, r in enumerate(active):
                k, v = prefills[r.req][1][layer]
                ks[b, :, width - lens[b] :] = k
                vs[b, :, width - lens[b] :] = v
            batch_kv.append((ks, vs))
        mask = torch.zeros((len(active), width), dtype=torch.long, device=self.device)
        for b, n in enumerate(lens):
            mask[b, width - n :] = 1
        logits = torch.stack([prefills[r.req][0] for r in active])
        positions = torch.tensor(lens, dtype=torch.long, device=self.device)
        cache = self._new_cache(batch_kv, batched=True)

        while True:
            tokens = _sample(logits, active)
            keep: list[int] = []
            for b, (r, tok) in enumerate(zip(active, tokens)):
                r.out.append(tok)
                if tok in r.stops:
                    r.finish = "stop"
                elif len(r.out) >= r.max_new:
                    r.finish = "length"
                else:
                    keep.append(b)
                    continue
                if self.prefix_cache and len(r.out) > 1:
                    # KV of prompt + out[:-1] (the last token was never fed) for the next turn.
                    pad = int(mask.shape[1] - mask[b].sum())
                    kv = [(k[b, :, pad:].clone(), v[b, :, pad:].clone()) for k, v in self._cache_kv(cache)]
                    self.store.insert(r.prompt + r.out[:-1], kv)
            if not keep:
                break
            if len(keep) < len(active):
                idx = torch.tensor(keep, device=self.device)
                mask = mask[idx]
                first = int((mask.sum(0) == 0).sum())  # leading columns now padding in every row
                mask = mask[:, first:]
                kv = [(k[idx, :, first:], v[idx, :, first:]) for k, v in self._cache_kv(cache)]
                cache = self._new_cache(kv, batched=True)
                positions = positions[idx]
                active = [active[b] for b in keep]
            step = torch.tensor([[r.out[-1]] for r in active], dtype=torch.long, device=self.device)
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
            logits = self._forward(step, cache, attention_mask=mask, position_ids=positions[:, None])
            positions = positions + 1
        self.stats.decode_s += time.perf_counter() - t1

    def _result(self, row: _Row, request_id: str) -> GenerationResult:
        text = ""
        if self.tokenizer is not None:
            ids = row.out[:-1] if row.finish == "stop" else row.out
            text = self.tokenizer.decode(ids, skip_special_tokens=False)
        return GenerationResult(
            request_id=request_id,
            output_ids=list(row.out),
            text=text,
            finish_reason=row.finish,
            prompt_tokens=len(row.prompt),
            cached_tokens=row.cached,
            output_tokens=len(row.out),
        )


def _validate(r: GenerationRequest, i: int) -> None:
    s = r.sampling
    where = f"request {i} ({r.request_id!r})" if r.request_id else f"request {i}"
    if not r.input_ids:
        raise ValueError(f"{where}: input_ids is empty")
    if s.n < 1:
        raise ValueError(f"{where}: n must be >= 1, got {s.n}")
    if s.max_new_tokens < 0:
        raise ValueError(f"{where}: max_new_tokens must be >= 0, got {s.max_new_tokens}")
    if s.temperature < 0:
        raise ValueError(f"{where}: temperature must be >= 0, got {s.temperature}")
    if not 0 < s.top_p <= 1:
        raise ValueError(f"{where}: top_p must be in (0, 1], got {s.top_p}")


def _sample(logits: torch.Tensor, rows: Sequence[_Row]) -> list[int]:
    """One token per row: argmax when temperature is 0, else top-p sampling by inverse CDF with
    one uniform number from the row's own generator (so rows never share random state)."""
    greedy = logits.argmax(dim=-1)
    temps = [r.params.temperature for r in rows]
    if all(t == 0 for t in temps):
        return greedy.tolist()
    dev = logits.device
    t = torch.tensor([max(x, 1e-6) for x in temps], device=dev)[:, None]
    top_p = torch.tensor([r.params.top_p for r in rows], device=dev)[:, None]
    u = torch.cat([torch.rand(1, generator=r.gen, dtype=torch.float64) for r in rows]).to(dev)[:, None]
    probs = torch.softmax(logits.double() / t, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(-1) - sorted_p
    sorted_p = torch.where(before < top_p, sorted_p, torch.zeros_like(sorted_p))
    cdf = sorted_p.cumsum(-1)
    pick = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_max(cdf.shape[1] - 1)
    sampled = order.gather(1, pick)[:, 0]
    return [int(g) if x == 0 else int(s) for x, g, s in zip(temps, greedy.tolist(), sampled.tolist())]


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise FileNotFoundError(f"update_weights: {path} does not exist")
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"update_weights: no *.safetensors or *.bin files in {path}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            state.update(load_file(str(f)))
        else:
            state.update(torch.load(f, map_location="cpu", weights_only=True))
    return state
