"""The rollout-engine contract: token ids in, token ids out.

Trajectories are kept as the token ids the model generated; history is never decoded and
re-encoded (that drifts). Engines report how much of each prompt they served from a cache, so
prefix reuse is measured, not assumed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    n: int = 1


@dataclass
class GenerationRequest:
    input_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""


@dataclass
class GenerationResult:
    request_id: str
    output_ids: list[int]
    text: str
    finish_reason: str  # "stop" (a stop id or EOS, included in output_ids) | "length"
    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose KV was reused, not recomputed; 0 unless really reused
    output_tokens: int


@runtime_checkable
class RolloutEngine(Protocol):
    """Batched generation. ``generate`` returns ``sum(r.sampling.n for r in requests)`` results,
    those of request i contiguous and in order."""

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]: ...

    def update_weights(self, source: object) -> None:
        """Load new policy weights in place between rounds (a state dict or a local path)."""

    def close(self) -> None: ...
