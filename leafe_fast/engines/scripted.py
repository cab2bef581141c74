"""A deterministic engine for tests: scripted replies, every request recorded.

``ScriptedEngine`` implements ``RolloutEngine`` without a model. Each request is answered by the
``respond`` callback if it returns something, else by the next item of ``queue``; a request that
neither answers is an error naming the request, so a test never silently runs off its script.
Replies are token ids or text (encoded with ``encode``); sampling limits are honoured the way a real
engine would (cut at the first stop id, truncated at ``max_new_tokens``), and by default a stop id is
appended to a reply that has none, as a model ending its turn would.

``cached_tokens`` imitates a radix cache of unbounded size: the longest prefix a prompt shares with
any sequence (prompt + output) seen in an earlier request, or earlier in the same batch. It is a
model of SGLang's behaviour for testing the exploration loop's accounting, not a measurement.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence, Union

from leafe_fast.engines.base import GenerationRequest, GenerationResult


@dataclass(frozen=True)
class ScriptedReply:
    """A reply with explicit control; ``append_stop`` overrides the engine's default."""

    output: Union[str, Sequence[int]]
    append_stop: bool | None = None


Reply = Union[str, Sequence[int], ScriptedReply]
Responder = Callable[[GenerationRequest], "Reply | None"]


class ScriptedEngine:
    """Answers requests from a callback and/or a queue; records requests and batches.

    Attributes a test reads: ``requests`` (every request, in order), ``batches`` (the requests of
    each ``generate`` call), ``results`` (every result), ``weight_updates`` (sources passed to
    ``update_weights``).
    """

    def __init__(
        self,
        respond: Responder | None = None,
        queue: Iterable[Reply] = (),
        *,
        encode: Callable[[str], list[int]] | None = None,
        decode: Callable[[Sequence[int]], str] | None = None,
        append_stop: bool = True,
        simulate_cache: bool = True,
    ):
        self.respond = respond
        self.queue: deque[Reply] = deque(queue)
        self.encode = encode
        self.decode = decode
        self.append_stop = append_stop
        self.simulate_cache = simulate_cache
        self.requests: list[GenerationRequest] = []
        self.batches: list[list[GenerationRequest]] = []
        self.results: list[GenerationResult] = []
        self.weight_updates: list[object] = []
        self.closed = False
        self._trie: dict = {}

    # --- RolloutEngine ------------------------------------------------------------------------
    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        if self.closed:
            raise RuntimeError("ScriptedEngine.generate: the engine is closed")
        batch = list(requests)
        self.batches.append(batch)
        out: list[GenerationResult] = []
        for req in batch:
            self.requests.append(req)
            for _ in range(max(1, req.sampling.n)):
                result = self._answer(req)
                out.append(result)
                self.results.append(result)
        return out

    def update_weights(self, source: object) -> None:
        self.weight_updates.append(source)

    def close(self) -> None:
        self.closed = True

    # --- internals ----------------------------------------------------------------------------
    def _next_reply(self, req: GenerationRequest) -> Reply:
        if self.respond is not None:
            reply = self.respond(req)
            if reply is not None:
                return reply
        if self.queue:
            return self.queue.popleft()
        raise LookupError(
            f"ScriptedEngine: no scripted reply for request {req.request_id!r} "
            f"(prompt of {len(req.input_ids)} tokens): the callback returned None and the queue is empty"
        )

    def _to_ids(self, output: Union[str, Sequence[int]]) -> list[int]:
        if isinstance(output, str):
            if self.encode is None:
                raise TypeError("ScriptedEngine: a text reply needs `encode` (text -> token ids)")
            return list(self.encode(output))
        return [int(t) for t in output]

    def _answer(self, req: GenerationRequest) -> GenerationResult:
        reply = self._next_reply(req)
        append_stop = self.append_stop
        if isinstance(reply, ScriptedReply):
            if reply.append_stop is not None:
                append_stop = reply.append_stop
            reply = reply.output
        ids = self._to_ids(reply)
        stops = set(req.sampling.stop_token_ids)
        cut = next((i for i, t in enumerate(ids) if t in stops), None)
        if cut is not None:
            ids = ids[: cut + 1]
        elif append_stop and req.sampling.stop_token_ids:
            ids = ids + [req.sampling.stop_token_ids[0]]
        finish = "stop" if ids and ids[-1] in stops else "length"
        limit = max(0, req.sampling.max_new_tokens)
        if len(ids) > limit:
            ids, finish = ids[:limit], "length"
        prompt = list(req.input_ids)
        cached = self._cached_prefix(prompt) if self.simulate_cache else 0
        if self.simulate_cache:
            self._insert(prompt + ids)
        return GenerationResult(
            request_id=req.request_id,
            output_ids=ids,
            text=self.decode(ids) if self.decode is not None else "",
            finish_reason=finish,
            prompt_tokens=len(prompt),
            cached_tokens=cached,
            output_tokens=len(ids),
        )

    def _cached_prefix(self, ids: list[int]) -> int:
        node, n = self._trie, 0
        for t in ids:
            node = node.get(t)
            if node is None:
                break
            n += 1
        # a real engine recomputes at least the last prompt token to get logits
        return min(n, max(0, len(ids) - 1))

    def _insert(self, ids: list[int]) -> None:
        node = self._trie
        for t in ids:
            node = node.setdefault(t, {})
