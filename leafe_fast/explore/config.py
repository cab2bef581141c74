"""Settings of a Stage-1 exploration run: one dataclass, loadable from JSON, the source of the CLI flags.

Budgets are per task. ``max_steps`` counts env steps over the whole tree, ``max_depth`` the steps
of one trajectory (root to leaf), ``max_tokens`` the tokens generated for the task (actions and
reflections), ``max_branches`` the rollbacks. A JSON config file uses the field names below; unknown
keys and wrong types are a ``UserError`` naming the file and the key (a typo must not silently fall
back to a default). ``leafe-fast explore`` builds its flags from these fields (``leafe_fast.flags``).

Defaults follow the method: reflect every 3 steps of a branch (a stalled attempt is caught before
the episode ends), the depth cutoff is a trigger like a failure (the reflector diagnoses the stall),
an out-of-range rollback step is asked again rather than moved silently, and the action token limit
is the environment's own (``leafe_fast.envs.registry.action_token_limit``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from leafe_fast.errors import UserError
from leafe_fast.flags import read_json_object

REFLECTORS = ("llm", "grounded", "oracle")
ABLATION_REFLECTORS = ("oracle",)  # never reported as LEAFE
INVALID_STEP_POLICIES = ("retry", "clamp")
MODES = ("leafe", "independent")


@dataclass
class ExploreConfig:
    # what is run
    mode: str = field(default="leafe", metadata={
        "help": "leafe: reflect, roll back and branch; independent: k independent rollouts per task with no "
                "reflection (the rejection-sampling baseline's data), budgets as below",
        "choices": MODES})
    # reflection
    reflector: str = field(default="llm", metadata={
        "help": "llm: the policy reflects in strict JSON; grounded: the env's diagnosis (which step went wrong "
                "and why); oracle: the env's expert answer (an ablation, labelled as such)",
        "choices": REFLECTORS})
    summary: bool = field(default=True, metadata={
        "help": "insert the reflection's experience at the rollback point; --no-summary rolls back without "
                "it (the 'rollback without summary' ablation arm)"})
    reflect_every: int = field(default=3, metadata={
        "help": "reflect every K steps of a branch (0: only when an attempt ends or hits max_depth)", "min": 0})
    reflect_retries: int = field(default=2, metadata={
        "help": "retries after a malformed reflection reply (each counted)", "min": 0})
    invalid_step: str = field(default="retry", metadata={
        "help": "a rollback step outside the valid range: retry (ask again, counted as malformed) or clamp "
                "it into range (counted)", "choices": INVALID_STEP_POLICIES})
    reflect_max_new_tokens: int = field(default=256, metadata={"help": "token limit of one reflection reply",
                                                               "min": 1})
    reflect_temperature: float | None = field(default=None, metadata={
        "help": "sampling temperature of reflections (none: the action temperature)", "min": 0.0})
    # budgets per task
    max_branches: int = field(default=4, metadata={"help": "rollbacks per task", "min": 0})
    rollouts: int | None = field(default=None, metadata={
        "help": "independent mode: rollouts per task (none: max_branches + 1, as many attempts as LEAFE "
                "makes); the step and token budgets below bound them too", "min": 1})
    budget_from: str | None = field(default=None, metadata={
        "help": "independent mode: a LEAFE trees.jsonl; each task gets exactly the env steps and generated "
                "tokens that run spent on it (equal budgets per task)"})
    max_steps: int = field(default=160, metadata={"help": "env steps per task, all branches together", "min": 1})
    max_tokens: int = field(default=32768, metadata={
        "help": "generated tokens per task (actions and reflections)", "min": 1})
    max_depth: int = field(default=32, metadata={
        "help": "steps of one trajectory; reaching it ends the attempt and triggers a reflection", "min": 1})
    stop_on_success: bool = field(default=True, metadata={
        "help": "end a task at its first success (--no-stop-on-success keeps exploring and reflects on it)"})
    max_context_tokens: int | None = field(default=None, metadata={
        "help": "prompt + new tokens of one request (none: the hf model's max_position_embeddings)", "min": 2})
    # sampling of actions
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of actions", "min": 0.0})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling of actions, in (0, 1]", "max": 1.0})
    max_new_tokens: int | None = field(default=None, metadata={
        "help": "token limit of one action (none: the environment's limit, e.g. sokoban 32, code 1024)",
        "min": 1})
    seed: int = field(default=0, metadata={"help": "sampling seed (per task and request)"})
    # scheduling
    concurrency: int = field(default=8, metadata={
        "help": "tasks in flight; their requests go to the engine as one batch per round", "min": 1})
    env_workers: int = field(default=1, metadata={
        "help": "threads stepping envs between rounds (useful for the code sandbox)", "min": 1})
    progress: bool = field(default=True, metadata={"help": "progress bar (quiet when stderr is not a TTY)"})
    accept_inexact_restores: bool = field(default=False, metadata={
        "help": "branch even on an env whose restore_mode is 'inexact' (its replay is not checked, so a "
                "branch may start from a different state than the one reflected on)"})
    env_kwargs: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "environment constructor arguments (the CLI's repeatable --env-arg KEY=VALUE)", "cli": False})

    def validate(self) -> "ExploreConfig":
        """Checks values (types come from ``from_dict``); raises ``UserError`` naming the field."""

        def bad(name: str, msg: str, fix: str | None = None) -> None:
            raise UserError(f"ExploreConfig.{name}", msg, fix)

        for name, choices in (("mode", MODES), ("reflector", REFLECTORS), ("invalid_step", INVALID_STEP_POLICIES)):
            if getattr(self, name) not in choices:
                bad(name, f"is {getattr(self, name)!r}", f"choose one of {list(choices)}")
        ints = ("reflect_every", "reflect_retries", "max_branches", "max_steps", "max_tokens", "max_depth",
                "concurrency", "env_workers", "reflect_max_new_tokens", "seed")
        for name in ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                bad(name, f"must be an integer, got {value!r}")
        for name in ("reflect_every", "reflect_retries", "max_branches"):
            if getattr(self, name) < 0:
                bad(name, f"must be >= 0, got {getattr(self, name)}")
        for name in ("max_steps", "max_tokens", "max_depth", "concurrency", "env_workers", "reflect_max_new_tokens"):
            if getattr(self, name) < 1:
                bad(name, f"must be >= 1, got {getattr(self, name)}")
        for name, lo in (("max_new_tokens", 1), ("rollouts", 1), ("max_context_tokens", 2)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < lo):
                bad(name, f"must be an integer >= {lo} or null, got {value!r}")
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                bad(name, f"must be a number, got {value!r}")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.temperature < 0:
            bad("temperature", f"must be >= 0, got {self.temperature}")
        if self.reflect_temperature is not None and (
            isinstance(self.reflect_temperature, bool) or not isinstance(self.reflect_temperature, (int, float))
            or self.reflect_temperature < 0
        ):
            bad("reflect_temperature", f"must be a number >= 0 or null, got {self.reflect_temperature!r}")
        for name in ("summary", "stop_on_success", "progress", "accept_inexact_restores"):
            if not isinstance(getattr(self, name), bool):
                bad(name, f"must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.env_kwargs, dict):
            bad("env_kwargs", f"must be a JSON object, got {type(self.env_kwargs).__name__}")
        if self.budget_from is not None and self.mode != "independent":
            bad("budget_from", "applies to mode 'independent' only", "drop it or set mode independent")
        return self

    @property
    def ablation(self) -> bool:
        """True when the run is an ablation that must never be reported as LEAFE (the oracle reflector)."""
        return self.reflector in ABLATION_REFLECTORS

    @property
    def num_rollouts(self) -> int:
        """Independent mode: rollouts per task."""
        return self.rollouts if self.rollouts is not None else self.max_branches + 1

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "config") -> "ExploreConfig":
        """From a JSON object: unknown keys, wrong types and bad values raise ``UserError`` naming ``source``."""
        from leafe_fast.flags import config_from_dict

        config = config_from_dict(cls, data, source=source)
        try:
            return config.validate()
        except UserError as e:
            raise UserError(f"{source}: {e.where.split('.', 1)[-1]}", e.problem, e.fix) from None

    @classmethod
    def from_json(cls, path: str | Path) -> "ExploreConfig":
        path = Path(path)
        return cls.from_dict(read_json_object(path), source=str(path))

    def with_overrides(self, overrides: Mapping[str, Any]) -> "ExploreConfig":
        """A copy with the given fields replaced (``None`` values are ignored: flag not given)."""
        data = self.to_dict()
        data.update({k: v for k, v in overrides.items() if v is not None})
        return type(self).from_dict(data, source="overrides")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
