"""Settings of a Stage-1 exploration run: one dataclass, loadable from JSON, overridable by flags.

Budgets are per task. ``max_steps`` counts env steps over the whole tree, ``max_depth`` the steps
of one trajectory (root to leaf), ``max_tokens`` the tokens generated for the task (actions and
reflections), ``max_branches`` the rollbacks. A JSON config file uses the field names below; unknown
keys are an error (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

REFLECTORS = ("llm", "grounded")
INVALID_STEP_POLICIES = ("clamp", "retry")


@dataclass
class ExploreConfig:
    # reflection
    reflector: str = "llm"  # "llm": the policy reflects in strict JSON; "grounded": env.ground_reflection
    reflect_every: int = 0  # reflect every k steps of a branch (0: only on failed termination)
    reflect_retries: int = 2  # extra attempts after a malformed reply (each counted)
    invalid_step: str = "clamp"  # out-of-range rollback_step: "clamp" into range, or "retry" (malformed)
    reflect_max_new_tokens: int = 256
    reflect_temperature: float | None = None  # None: the action temperature
    # budgets per task
    max_branches: int = 4
    max_steps: int = 64
    max_tokens: int = 32768
    max_depth: int = 16
    stop_on_success: bool = True
    max_context_tokens: int | None = None  # prompt + new tokens per request; None: unbounded
    # sampling of actions
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    seed: int = 0
    # scheduling
    concurrency: int = 8  # tasks in flight; their requests go to the engine as one batch per round
    env_workers: int = 1  # threads stepping envs between rounds (useful for the code sandbox)
    progress: bool = True
    env_kwargs: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> "ExploreConfig":
        def bad(msg: str) -> None:
            raise ValueError(f"ExploreConfig: {msg}")

        if self.reflector not in REFLECTORS:
            bad(f"reflector is {self.reflector!r}; choose one of {REFLECTORS}")
        if self.invalid_step not in INVALID_STEP_POLICIES:
            bad(f"invalid_step is {self.invalid_step!r}; choose one of {INVALID_STEP_POLICIES}")
        for name in ("reflect_every", "reflect_retries", "max_branches"):
            if getattr(self, name) < 0:
                bad(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("max_steps", "max_tokens", "max_depth", "concurrency", "env_workers",
                     "max_new_tokens", "reflect_max_new_tokens"):
            if getattr(self, name) < 1:
                bad(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_context_tokens is not None and self.max_context_tokens < 2:
            bad(f"max_context_tokens must be >= 2 or null, got {self.max_context_tokens}")
        if not 0.0 < self.top_p <= 1.0:
            bad(f"top_p must be in (0, 1], got {self.top_p}")
        if self.temperature < 0:
            bad(f"temperature must be >= 0, got {self.temperature}")
        if not isinstance(self.env_kwargs, dict):
            bad(f"env_kwargs must be a JSON object, got {type(self.env_kwargs).__name__}")
        return self

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "config") -> "ExploreConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**dict(data)).validate()

    @classmethod
    def from_json(cls, path: str | Path) -> "ExploreConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"explore config {path} does not exist") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the config must be a JSON object, got {type(data).__name__}")
        return cls.from_dict(data, source=str(path))

    def with_overrides(self, overrides: Mapping[str, Any]) -> "ExploreConfig":
        """A copy with the given fields replaced (``None`` values are ignored: flag not given)."""
        data = self.to_dict()
        data.update({k: v for k, v in overrides.items() if v is not None})
        return type(self).from_dict(data, source="overrides")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
