"""One task's reflective tree exploration, written as a generator the scheduler drives.

``TaskExplorer.run()`` yields every ``GenerationRequest`` it needs (actions and reflections), is sent
the matching ``GenerationResult``, and returns the finished ``Tree``. The scheduler (``loop.py``)
runs many of these side by side and batches their requests; this file holds the per-task logic.

The token invariant this code keeps: ``traj`` (a ``leafe_fast.trajectory.Trajectory``) is always the
token sequence of the current path (``Tree.path_token_ids`` of its last node). An action request is
``traj.generation_prompt(experience)``; a branch rolls ``traj`` back to the end of the kept steps and
the experience message goes right there, so a branch prompt is exactly its parent's prefix plus new
tokens.

Rollback restores the env snapshot taken after the kept steps (one snapshot per node of the
current path, plus one after reset); snapshots of abandoned paths are dropped.

What a finished tree carries besides its nodes:

- ``stats`` (counts): ``steps`` (env steps), ``branches``, ``requests``, ``generated_tokens`` =
  ``action_tokens`` + ``reflection_tokens``, ``prompt_tokens`` / ``cached_tokens`` (engine reports,
  all requests), ``branch_prompt_tokens`` / ``branch_cached_tokens`` (the requests that open a
  branch: the prefix-reuse measure), ``reflections``, ``malformed_reflections`` (unusable replies),
  ``failed_reflections`` (no usable result), ``clamped_reflections``, ``successful_leaves``.
- ``meta``: ``stop_reason`` (success, no_rollback, max_branches, max_steps, max_tokens,
  max_context_tokens), ``reflector``, ``reflections`` (one record per reflection: node, trigger,
  steps, outcome, attempts, malformed count, note) and ``config`` (the settings that shaped it).
"""

from __future__ import annotations

import zlib
from typing import Any, Generator

from leafe_fast.data.schema import Node, Tree
from leafe_fast.engines.base import GenerationRequest, GenerationResult, SamplingParams
from leafe_fast.envs.base import StepResult, Task
from leafe_fast.explore.config import ExploreConfig
from leafe_fast.explore.reflection import Reflection, ReflectGen, ReflectionContext, Reflector
from leafe_fast.trajectory import experience_ids, open_trajectory

TaskGen = Generator[GenerationRequest, GenerationResult, Tree]

STAT_KEYS = (
    "steps", "branches", "requests", "generated_tokens", "action_tokens", "reflection_tokens",
    "prompt_tokens", "cached_tokens", "branch_prompt_tokens", "branch_cached_tokens",
    "reflections", "malformed_reflections", "failed_reflections", "clamped_reflections",
    "successful_leaves",
)


class TaskExplorer:
    def __init__(
        self,
        task: Task,
        env: Any,
        chat: Any,
        reflector: Reflector,
        config: ExploreConfig,
        *,
        tokenizer_name: str = "",
    ):
        self.task = task
        self.env = env
        self.chat = chat
        self.reflector = reflector
        self.config = config
        self.tokenizer_name = tokenizer_name
        self.stats: dict[str, int] = {k: 0 for k in STAT_KEYS}
        self.reflections: list[dict[str, Any]] = []
        self._seed_base = (config.seed * 1_000_003 + zlib.crc32(task.task_id.encode())) & 0x7FFFFFFF

    # --- budgets ------------------------------------------------------------------------------
    def tokens_left(self) -> int:
        return self.config.max_tokens - self.stats["generated_tokens"]

    def _next_seed(self) -> int:
        return (self._seed_base + 7919 * self.stats["requests"]) & 0x7FFFFFFF

    def _branch_blocker(self) -> str | None:
        """Why no branch may be made now (None: one may)."""
        if self.stats["branches"] >= self.config.max_branches:
            return "max_branches"
        if self.stats["steps"] >= self.config.max_steps:
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
        """Run a reflector generator, passing its requests through ``_call`` for accounting."""
        try:
            request = next(gen)
            while True:
                result = yield from self._call(request, "reflection")
                request = gen.send(result)
        except StopIteration as stop:
            return stop.value

    # --- the loop -----------------------------------------------------------------------------
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
        cfg, chat, env = self.config, self.chat, self.env
        first = env.reset(self.task)
        traj = open_trajectory(chat, env.instructions(), first)
        prompt_ids, header = list(traj.prompt_ids), list(traj.header_ids)
        stop_ids = tuple(chat.stop_ids)
        tree = Tree(
            task_id=self.task.task_id,
            env=self.task.env or getattr(env, "name", ""),
            prompt_ids=prompt_ids,
            header_ids=header,
            tokenizer=self.tokenizer_name,
        )
        snapshots: dict[int, Any] = {-1: env.snapshot()}
        results: dict[int, StepResult] = {}
        path: list[int] = []  # node ids of the current trajectory
        experience: tuple[str, list[int]] | None = None  # to insert before the next action
        rollback_from: int | None = None
        branch, branch_steps = 0, 0
        stop_reason = ""

        while True:
            if self.stats["steps"] >= cfg.max_steps:
                stop_reason = "max_steps"
                break
            prompt = traj.generation_prompt(experience[1] if experience else None)
            room = self.tokens_left()
            if cfg.max_context_tokens is not None:
                room = min(room, cfg.max_context_tokens - len(prompt))
            max_new = min(cfg.max_new_tokens, room)
            if max_new < 1:
                stop_reason = "max_tokens" if self.tokens_left() < 1 else "max_context_tokens"
                break
            sampling = SamplingParams(
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                max_new_tokens=max_new,
                stop_token_ids=stop_ids,
                seed=self._next_seed(),
            )
            result = yield from self._call(
                GenerationRequest(input_ids=prompt, sampling=sampling), "action", opens_branch=experience is not None
            )
            action_ids = list(result.output_ids)
            action = chat.decode_action(action_ids)
            step = env.step(action)
            obs_ids = traj.add_step(action_ids, step, experience_ids=experience[1] if experience else None)
            node = Node(
                id=len(tree.nodes),
                parent=path[-1] if path else -1,
                step=len(path),
                action_ids=action_ids,
                observation_ids=obs_ids,
                action=action,
                observation=step.observation,
                reward=float(step.reward),
                done=bool(step.done),
                success=bool(step.success),
                feedback=step.feedback,
                branch=branch,
            )
            if experience is not None:
                node.experience, node.experience_ids = experience[0], list(experience[1])
                node.rollback_from = rollback_from
                experience = None
            tree.nodes.append(node)
            path.append(node.id)
            snapshots[node.id] = env.snapshot()
            results[node.id] = step
            self.stats["steps"] += 1
            self.stats["successful_leaves"] += int(node.success)
            branch_steps += 1

            if step.success and cfg.stop_on_success:
                stop_reason = "success"
                break
            trigger = self._trigger(step, len(path), branch_steps)
            if trigger is None:
                continue
            terminal = trigger != "periodic"
            blocker = self._branch_blocker()
            if blocker is not None:
                if terminal:
                    stop_reason = blocker
                    break
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
                    stop_reason = "no_rollback"
                    break
                continue

            # --- branch: keep k steps, restore the env there, insert the experience ------------
            k = reflection.rollback_step
            rollback_from = path[-1]
            del path[k:]
            traj.rollback(k)
            env.restore(snapshots[path[-1] if path else -1])
            keep = set(path) | {-1}
            snapshots = {i: s for i, s in snapshots.items() if i in keep}
            results = {i: r for i, r in results.items() if i in keep}
            experience = (reflection.experience, experience_ids(chat, reflection.experience))
            branch += 1
            branch_steps = 0
            self.stats["branches"] += 1

        tree.success = any(n.success for n in tree.nodes)
        tree.stats = dict(self.stats)
        tree.meta = {
            "stop_reason": stop_reason,
            "reflector": getattr(self.reflector, "name", type(self.reflector).__name__),
            "reflections": self.reflections,
            "config": {k: v for k, v in cfg.to_dict().items() if k not in ("progress", "env_workers")},
        }
        return tree

    def _record(self, r: Reflection, at_node: int, trigger: str, n_steps: int) -> None:
        self.stats["reflections"] += 1
        self.stats["malformed_reflections"] += r.malformed
        self.stats["clamped_reflections"] += int(r.clamped)
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
                "note": r.note,
            }
        )
