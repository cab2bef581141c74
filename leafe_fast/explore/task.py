"""One task's exploration, written as a generator the scheduler drives.

``TaskExplorer.run()`` yields every ``GenerationRequest`` it needs (actions and reflections), is sent
the matching ``GenerationResult``, and returns the finished ``Tree``. The scheduler (``loop.py``)
runs many of these side by side and batches their requests; this file holds the per-task logic.

Two modes (``ExploreConfig.mode``):

- ``leafe``: act; at a trigger (the attempt ended, failed or hit ``max_depth``, or every
  ``reflect_every`` steps) reflect; on a rollback restore the env after the kept steps and branch
  with the experience message in context (``summary=False``: without it, the ablation arm).
- ``independent``: ``rollouts`` attempts from the start, no reflection, no experience, under the same
  step and token budgets (or exactly those a LEAFE run spent, ``budget_from``): the data of the
  rejection-sampling baseline. Each attempt is a root-level chain of nodes (``branch`` = attempt).

The token invariant this code keeps: ``traj`` (a ``leafe_fast.trajectory.Trajectory``) is always the
token sequence of the current path (``Tree.path_token_ids`` of its last node). An action request is
``traj.generation_prompt(experience)``; a branch rolls ``traj`` back to the end of the kept steps and
the experience message goes right there, so a branch prompt is exactly its parent's prefix plus new
tokens. Rollback restores the env snapshot taken after the kept steps (one snapshot per node of the
current path, plus one after reset); snapshots of abandoned paths are dropped.

An exception raised by the environment (reset, step, snapshot, restore, grounding) ends this task
only: the tree is written with ``meta["error"]`` and ``stop_reason`` ``"env_error"``, and the run goes on.

What a finished tree carries besides its nodes:

- ``stats`` (counts): ``steps`` (env steps), ``branches``, ``rollouts`` (attempts from the start),
  ``requests``, ``generated_tokens`` = ``action_tokens`` + ``reflection_tokens``, ``prompt_tokens`` /
  ``cached_tokens`` (engine reports, all requests), ``branch_prompt_tokens`` / ``branch_cached_tokens``
  (the requests that open a branch: the prefix-reuse measure), ``reflections``,
  ``malformed_reflections`` (unusable replies), ``failed_reflections`` (no usable result),
  ``clamped_reflections``, ``invalid_step_reflections`` (a step out of range in the final answer),
  ``cut_actions`` (generation stopped at the token limit), ``invalid_actions``, ``noop_actions``,
  ``successful_leaves``, ``env_errors``.
- ``meta``: ``mode``, ``stop_reason`` (success, no_rollback, max_branches, max_steps, max_tokens,
  max_context_tokens, rollouts, env_error, inexact_restore: an env that cannot restore exactly and
  ``accept_inexact_restores`` is off), ``reflector``, ``ablation`` (True for the oracle
  reflector), ``summary``, ``budget`` (the step and token budgets and where they came from),
  ``reflections`` (one record per reflection: node, trigger, steps, outcome, attempts, malformed
  count, note), ``config`` (the settings that shaped it) and, after an env exception, ``error``.
"""

from __future__ import annotations

import zlib
from typing import Any, Generator

from leafe_fast.data.schema import Node, Tree
from leafe_fast.engines.base import GenerationRequest, GenerationResult, SamplingParams
from leafe_fast.envs.base import StepResult, Task
from leafe_fast.explore.config import ExploreConfig
from leafe_fast.explore.reflectors.base import Reflection, ReflectGen, ReflectionContext, Reflector
from leafe_fast.trajectory import Trajectory, experience_ids, open_trajectory

TaskGen = Generator[GenerationRequest, GenerationResult, Tree]

STAT_KEYS = (
    "steps", "branches", "rollouts", "requests", "generated_tokens", "action_tokens", "reflection_tokens",
    "prompt_tokens", "cached_tokens", "branch_prompt_tokens", "branch_cached_tokens",
    "reflections", "malformed_reflections", "failed_reflections", "clamped_reflections",
    "invalid_step_reflections", "cut_actions", "invalid_actions", "noop_actions", "successful_leaves",
    "env_errors",
)


class EnvFailure(Exception):
    """An exception raised by the task's environment; ends this task only (see the module docstring)."""

    def __init__(self, call: str, error: BaseException):
        super().__init__(f"{call}: {type(error).__name__}: {error}")
        self.call = call


def _env_call(call: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        raise EnvFailure(call, e) from e


class TaskExplorer:
    def __init__(
        self,
        task: Task,
        env: Any,
        chat: Any,
        reflector: Reflector | None,
        config: ExploreConfig,
        *,
        tokenizer_name: str = "",
        action_tokens: int = 128,
        budget: dict[str, Any] | None = None,
    ):
        """``action_tokens``: the env's action token limit (used when ``config.max_new_tokens`` is None).
        ``budget``: ``{"max_steps", "max_tokens", "source"}`` overriding the config's (independent mode)."""
        self.task = task
        self.env = env
        self.chat = chat
        self.reflector = reflector
        self.config = config
        self.tokenizer_name = tokenizer_name
        self.max_new_tokens = config.max_new_tokens or action_tokens
        self.budget = budget or {"max_steps": config.max_steps, "max_tokens": config.max_tokens, "source": "config"}
        self.stats: dict[str, int] = {k: 0 for k in STAT_KEYS}
        self.reflections: list[dict[str, Any]] = []
        self._seed_base = (config.seed * 1_000_003 + zlib.crc32(task.task_id.encode())) & 0x7FFFFFFF

    # --- budgets ------------------------------------------------------------------------------
    def tokens_left(self) -> int:
        return self.budget["max_tokens"] - self.stats["generated_tokens"]

    def _steps_left(self) -> int:
        return self.budget["max_steps"] - self.stats["steps"]

    def _next_seed(self) -> int:
        return (self._seed_base + 7919 * self.stats["requests"]) & 0x7FFFFFFF

    def _branch_blocker(self) -> str | None:
        """Why no branch may be made now (None: one may)."""
        if getattr(self.env, "restore_mode", "exact") == "inexact" and not self.config.accept_inexact_restores:
            return "inexact_restore"  # leafe_fast.envs.replay.RESTORE_MODES
        if self.stats["branches"] >= self.config.max_branches:
            return "max_branches"
        if self._steps_left() < 1:
            return "max_steps"
        if self.tokens_left() < 1:
            return "max_tokens"
        return None

    # --- engine calls -------------------------------------------------------------------------
    def _call(
        self, request: GenerationRequest, kind: str, opens_branch: bool = False
    ) -> Generator[GenerationRequest, GenerationResult, GenerationResult]:
        request.request_id = f"{self.task.task_id}#{self.stats['requests']}"
        self.stats["requests"] += 1
        result = yield request
        n_out = len(result.output_ids)
        self.stats["generated_tokens"] += n_out
        self.stats[f"{kind}_tokens"] += n_out
        self.stats["prompt_tokens"] += result.prompt_tokens
        self.stats["cached_tokens"] += result.cached_tokens
        if opens_branch:
            self.stats["branch_prompt_tokens"] += result.prompt_tokens
            self.stats["branch_cached_tokens"] += result.cached_tokens
        return result

    def _drive(self, gen: ReflectGen) -> Generator[GenerationRequest, GenerationResult, Reflection]:
        """Run a reflector generator, passing its requests through ``_call`` for accounting. An
        exception inside the reflector comes from the env's grounding: an ``EnvFailure``."""
        try:
            request = next(gen)
            while True:
                result = yield from self._call(request, "reflection")
                request = gen.send(result)
        except StopIteration as stop:
            return stop.value
        except Exception as e:
            raise EnvFailure("reflect", e) from e

    # --- one action ---------------------------------------------------------------------------
    def _act(
        self, tree: Tree, traj: Trajectory, parent: int, experience: tuple[str, list[int]] | None, branch: int,
        rollback_from: int | None,
    ) -> Generator[GenerationRequest, GenerationResult, tuple[Node, StepResult] | str]:
        """Generate one action, step the env, append the node. Returns (node, step) or a stop reason."""
        cfg = self.config
        prompt = traj.generation_prompt(experience[1] if experience else None)
        room = self.tokens_left()
        if cfg.max_context_tokens is not None:
            room = min(room, cfg.max_context_tokens - len(prompt))
        max_new = min(self.max_new_tokens, room)
        if max_new < 1:
            return "max_tokens" if self.tokens_left() < 1 else "max_context_tokens"
        sampling = SamplingParams(
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_new_tokens=max_new,
            stop_token_ids=tuple(self.chat.stop_ids),
            seed=self._next_seed(),
        )
        result = yield from self._call(
            GenerationRequest(input_ids=prompt, sampling=sampling), "action",
            opens_branch=experience is not None or rollback_from is not None,
        )
        action_ids = list(result.output_ids)
        cut = result.finish_reason == "length" and len(action_ids) >= self.max_new_tokens
        action = self.chat.decode_action(action_ids)
        step = _env_call("step", self.env.step, action)
        info = step.info if isinstance(step.info, dict) else {}
        exp_ids = experience[1] if experience else None
        obs_ids = traj.add_step(action_ids, step, experience_ids=exp_ids)
        node = Node(
            id=len(tree.nodes),
            parent=parent,
            step=traj.n_steps - 1,
            action_ids=action_ids,
            observation_ids=obs_ids,
            action=action,
            observation=step.observation,
            reward=float(step.reward),
            done=bool(step.done),
            success=bool(step.success),
            feedback=step.feedback,
            branch=branch,
            invalid=bool(info.get("invalid", False)),
            noop=bool(info.get("noop", False)),
            parsed_action=info["action"] if isinstance(info.get("action"), str) else None,
            truncated=cut,
        )
        if experience is not None or rollback_from is not None:
            node.experience = experience[0] if experience else ""
            node.experience_ids = list(exp_ids) if exp_ids is not None else []
            node.rollback_from = rollback_from
        tree.nodes.append(node)
        self.stats["steps"] += 1
        self.stats["successful_leaves"] += int(node.success)
        self.stats["cut_actions"] += int(cut)
        self.stats["invalid_actions"] += int(node.invalid)
        self.stats["noop_actions"] += int(node.noop)
        return node, step

    # --- the loops ----------------------------------------------------------------------------
    def _trigger(self, step: StepResult, depth: int, branch_steps: int) -> str | None:
        cfg = self.config
        if step.done:
            return "success" if step.success else "failed"
        if depth >= cfg.max_depth:
            return "depth"
        if cfg.reflect_every and branch_steps % cfg.reflect_every == 0:
            return "periodic"
        return None

    def run(self) -> TaskGen:
        tree = Tree(task_id=self.task.task_id, env=self.task.env or getattr(self.env, "name", ""),
                    prompt_ids=[], header_ids=list(self.chat.header_ids), tokenizer=self.tokenizer_name)
        error = None
        try:
            first = _env_call("reset", self.env.reset, self.task)
            instructions = _env_call("instructions", self.env.instructions)
            traj = open_trajectory(self.chat, instructions, first)
            tree.prompt_ids = list(traj.prompt_ids)
            if self.config.mode == "independent":
                stop_reason = yield from self._run_independent(tree, traj)
            else:
                stop_reason = yield from self._run_leafe(tree, traj)
        except EnvFailure as e:
            stop_reason, error = "env_error", str(e)
            self.stats["env_errors"] += 1
        return self._finish(tree, stop_reason, error)

    def _run_independent(self, tree: Tree, traj: Trajectory) -> Generator[GenerationRequest, GenerationResult, str]:
        cfg, env = self.config, self.env
        start = _env_call("snapshot", env.snapshot)
        for attempt in range(cfg.num_rollouts):
            if attempt:
                _env_call("restore", env.restore, start)
                traj.rollback(0)
            self.stats["rollouts"] += 1
            parent = -1
            while True:
                if self._steps_left() < 1:
                    return "max_steps"
                out = yield from self._act(tree, traj, parent, None, attempt, None)
                if isinstance(out, str):
                    return out
                node, step = out
                if step.success and cfg.stop_on_success:
                    return "success"
                if step.done or traj.n_steps >= cfg.max_depth:
                    break
                parent = node.id
        return "rollouts"

    def _run_leafe(self, tree: Tree, traj: Trajectory) -> Generator[GenerationRequest, GenerationResult, str]:
        cfg, chat, env = self.config, self.chat, self.env
        snapshots: dict[int, Any] = {-1: _env_call("snapshot", env.snapshot)}
        results: dict[int, StepResult] = {}
        path: list[int] = []  # node ids of the current trajectory
        experience: tuple[str, list[int]] | None = None  # to insert before the next action
        rollback_from: int | None = None
        branch, branch_steps = 0, 0
        self.stats["rollouts"] = 1

        while True:
            if self._steps_left() < 1:
                return "max_steps"
            out = yield from self._act(tree, traj, path[-1] if path else -1, experience, branch, rollback_from)
            if isinstance(out, str):
                return out
            node, step = out
            experience, rollback_from = None, None
            path.append(node.id)
            snapshots[node.id] = _env_call("snapshot", env.snapshot)
            results[node.id] = step
            branch_steps += 1

            if step.success and cfg.stop_on_success:
                return "success"
            trigger = self._trigger(step, len(path), branch_steps)
            if trigger is None:
                continue
            terminal = trigger != "periodic"
            blocker = self._branch_blocker()
            if blocker is not None:
                if terminal:
                    return blocker
                continue

            ctx = ReflectionContext(
                task_id=self.task.task_id,
                trajectory_ids=list(traj.ids),
                n_steps=len(path),
                trigger=trigger,
                history=[results[i] for i in path],
                env=env,
                chat=chat,
                remaining_tokens=self.tokens_left,
                max_context_tokens=cfg.max_context_tokens,
                seed=self._next_seed,
            )
            reflection: Reflection = yield from self._drive(self.reflector.reflect(ctx))
            self._record(reflection, node.id, trigger, len(path))
            if reflection.rollback_step is None:
                if terminal:
                    return "no_rollback"
                continue

            # --- branch: keep k steps, restore the env there, insert the experience ------------
            k = reflection.rollback_step
            rollback_from = path[-1]
            del path[k:]
            traj.rollback(k)
            _env_call("restore", env.restore, snapshots[path[-1] if path else -1])
            keep = set(path) | {-1}
            snapshots = {i: s for i, s in snapshots.items() if i in keep}
            results = {i: r for i, r in results.items() if i in keep}
            if cfg.summary:
                experience = (reflection.experience, experience_ids(chat, reflection.experience))
            branch += 1
            branch_steps = 0
            self.stats["branches"] += 1
            if k == 0:
                self.stats["rollouts"] += 1

    def _finish(self, tree: Tree, stop_reason: str, error: str | None) -> Tree:
        cfg = self.config
        tree.success = any(n.success for n in tree.nodes)
        tree.stats = dict(self.stats)
        independent = cfg.mode == "independent"
        reflector = "none" if independent else getattr(self.reflector, "name", type(self.reflector).__name__)
        tree.meta = {
            "mode": cfg.mode,
            "stop_reason": stop_reason,
            "reflector": reflector,
            "ablation": bool(getattr(self.reflector, "ablation", False)) and not independent,
            "summary": cfg.summary and not independent,
            "budget": dict(self.budget),
            "max_new_tokens": self.max_new_tokens,
            "reflections": self.reflections,
            "config": {k: v for k, v in cfg.to_dict().items() if k not in ("progress", "env_workers")},
        }
        if error is not None:
            tree.meta["error"] = error
        return tree

    def _record(self, r: Reflection, at_node: int, trigger: str, n_steps: int) -> None:
        self.stats["reflections"] += 1
        self.stats["malformed_reflections"] += r.malformed
        self.stats["clamped_reflections"] += int(r.clamped)
        self.stats["invalid_step_reflections"] += int(r.invalid_step)
        failed = r.rollback_step is None and not r.note.startswith("on track")
        self.stats["failed_reflections"] += int(failed)
        self.reflections.append(
            {
                "at_node": at_node,
                "trigger": trigger,
                "n_steps": n_steps,
                "rollback_step": r.rollback_step,
                "experience": r.experience,
                "source": r.source,
                "attempts": r.attempts,
                "malformed": r.malformed,
                "clamped": r.clamped,
                "invalid_step": r.invalid_step,
                "note": r.note,
            }
        )
