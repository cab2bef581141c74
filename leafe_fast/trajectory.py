"""The trajectory token layout, in one place: what the policy sees in exploration, training and evaluation.

A trajectory is a token sequence built only from template deltas, never decoded and re-encoded::

    prompt_ids                                  # system (env instructions) + user (first observation)
    + for each step:
        [experience_ids]                        # only on the first step of a branch (a rollback point)
        + header_ids                            # the assistant generation header
        + action_ids                            # exactly as generated (targets when supervised)
        + observation_ids                       # closing of the assistant turn + the next user message

``open_trajectory`` renders the opening messages; ``Trajectory.add_step`` appends a step (the
observation delta is computed from the env's ``StepResult`` with the chat format), so exploration
(``leafe_fast.explore.task``), evaluation (``leafe_fast.eval``) and the demo's warm-up walks build
their prompts with the same calls, and training samples (``leafe_fast.data.recipes``) rebuild the
same tokens from a stored tree with ``Trajectory.from_nodes``. That sameness is the point: evaluation
sees what training saw because both are this module, not two copies of it.

Only ``action_ids`` are ever targets; observation, header, prompt and experience tokens are context.
The chat format is ``leafe_fast.data.chat.ChatFormat`` (or any object with ``prompt_ids``,
``message_ids``, ``observation_ids``, ``header_ids``).
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

__all__ = [
    "Trajectory",
    "common_prefix_length",
    "experience_ids",
    "experience_message",
    "observation_ids",
    "observation_message",
    "open_trajectory",
    "opening_messages",
]


# --- the texts a trajectory holds besides the env's own observations ---------------------------


def opening_messages(instructions: str, first_observation: str) -> list[dict[str, str]]:
    """The conversation every episode starts from: the env's rules, then its first observation."""
    return [{"role": "system", "content": instructions}, {"role": "user", "content": first_observation}]


def observation_message(result: Any) -> str:
    """The user message after an action: the env's observation, then its diagnostic feedback."""
    text = result.observation
    if result.feedback and result.feedback not in text:
        text = f"{text}\n\nFeedback: {result.feedback}" if text else f"Feedback: {result.feedback}"
    return text


def experience_message(experience: str) -> str:
    """The message inserted at a rollback point, right before the branch's first action."""
    return (
        "Experience from an earlier attempt that went wrong from this point on: "
        f"{experience.strip()}\nUse it for your next action."
    )


def observation_ids(chat: Any, action_ids: Sequence[int], result: Any) -> list[int]:
    """Template delta after ``action_ids``: the end of the assistant turn and the observation message."""
    return list(chat.observation_ids(action_ids, observation_message(result)))


def experience_ids(chat: Any, experience: str) -> list[int]:
    """Template delta of the experience message (a user message after a non-assistant one)."""
    return list(chat.message_ids(experience_message(experience)))


def common_prefix_length(a: Sequence[int] | np.ndarray, b: Sequence[int] | np.ndarray) -> int:
    """Length of the longest common prefix of two token sequences (the prefix-sharing measure used by
    the engines' prefix caches and the samples' ``prefix_len``)."""
    a, b = np.asarray(a), np.asarray(b)
    m = min(len(a), len(b))
    diff = np.flatnonzero(a[:m] != b[:m])
    return int(diff[0]) if len(diff) else m


# --- the builder ----------------------------------------------------------------------------------


class Trajectory:
    """Token ids and target mask of one trajectory, appended step by step; supports rollback.

    ``ids``/``mask`` grow together; ``step_ends[i]`` is ``len(ids)`` after step ``i``. The builder is
    cheap (Python lists) because exploration appends to it every step.
    """

    def __init__(self, prompt_ids: Sequence[int], header_ids: Sequence[int], chat: Any = None):
        self.prompt_ids = [int(t) for t in prompt_ids]
        self.header_ids = [int(t) for t in header_ids]
        self.chat = chat
        self.ids: list[int] = list(self.prompt_ids)
        self.mask: list[bool] = [False] * len(self.ids)
        self.step_ends: list[int] = []

    # --- construction ------------------------------------------------------------------------
    @classmethod
    def from_nodes(
        cls,
        prompt_ids: Sequence[int],
        header_ids: Sequence[int],
        nodes: Iterable[Any],
        *,
        supervise: Sequence[bool] | None = None,
        with_experience: bool = True,
    ) -> "Trajectory":
        """Rebuild a stored path (``leafe_fast.data.schema.Node``s, root first).

        ``supervise[i]``: the i-th node's action tokens are targets (default: none are).
        ``with_experience=False`` leaves every experience message out (training samples).
        """
        traj = cls(prompt_ids, header_ids)
        nodes = list(nodes)
        sup = [False] * len(nodes) if supervise is None else list(supervise)
        if len(sup) != len(nodes):
            raise ValueError(f"Trajectory.from_nodes: {len(sup)} supervise flags for {len(nodes)} nodes")
        for node, target in zip(nodes, sup):
            exp = node.experience_ids if with_experience else None
            traj.add_step_ids(node.action_ids, node.observation_ids, experience_ids=exp, target=target)
        return traj

    def copy(self) -> "Trajectory":
        """An independent copy (same chat format), e.g. one per episode of a task."""
        out = Trajectory.__new__(Trajectory)
        out.prompt_ids, out.header_ids, out.chat = self.prompt_ids, self.header_ids, self.chat
        out.ids, out.mask, out.step_ends = list(self.ids), list(self.mask), list(self.step_ends)
        return out

    # --- appending -----------------------------------------------------------------------------
    @property
    def n_steps(self) -> int:
        return len(self.step_ends)

    def generation_prompt(self, experience: Sequence[int] | None = None) -> list[int]:
        """The request for the next action: the trajectory, the pending experience (if any), the header."""
        return self.ids + (list(experience) if experience else []) + self.header_ids

    def add_step_ids(
        self,
        action_ids: Sequence[int],
        observation_ids: Sequence[int],
        *,
        experience_ids: Sequence[int] | None = None,
        target: bool = False,
    ) -> None:
        """Append ``[experience] + header + action + observation``; the action is a target if ``target``."""
        if experience_ids:
            self._extend(experience_ids, False)
        self._extend(self.header_ids, False)
        self._extend(action_ids, target)
        self._extend(observation_ids, False)
        self.step_ends.append(len(self.ids))

    def add_step(
        self,
        action_ids: Sequence[int],
        result: Any,
        *,
        experience_ids: Sequence[int] | None = None,
        target: bool = False,
    ) -> list[int]:
        """Append a step from the env's ``StepResult``; returns the observation ids it appended."""
        if self.chat is None:
            raise ValueError("Trajectory.add_step needs a chat format (use open_trajectory or add_step_ids)")
        obs = observation_ids(self.chat, action_ids, result)
        self.add_step_ids(action_ids, obs, experience_ids=experience_ids, target=target)
        return obs

    def rollback(self, keep_steps: int) -> None:
        """Keep the first ``keep_steps`` steps (0: back to the prompt)."""
        if not 0 <= keep_steps <= self.n_steps:
            raise ValueError(f"Trajectory.rollback: keep_steps must be in [0, {self.n_steps}], got {keep_steps}")
        end = self.step_ends[keep_steps - 1] if keep_steps else len(self.prompt_ids)
        del self.ids[end:]
        del self.mask[end:]
        del self.step_ends[keep_steps:]

    def _extend(self, ids: Sequence[int], target: bool) -> None:
        self.ids.extend(int(t) for t in ids)
        self.mask.extend([target] * len(ids))

    # --- training arrays -----------------------------------------------------------------------
    def arrays(self, *, trim: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids int32, target_mask bool)``. ``trim`` cuts tokens after the last target: they
        predict nothing. Raises when the first token would be a target (nothing predicts it)."""
        if self.mask and self.mask[0]:
            raise ValueError(
                "Trajectory: the first token is a target (empty prompt and header), so it has no predictor"
            )
        end = len(self.mask)
        if trim:
            while end and not self.mask[end - 1]:
                end -= 1
        return np.asarray(self.ids[:end], dtype=np.int32), np.asarray(self.mask[:end], dtype=bool)


def open_trajectory(chat: Any, instructions: str, first_observation: str) -> Trajectory:
    """A new trajectory: the opening messages rendered whole (no generation header), bound to ``chat``."""
    prompt = list(chat.prompt_ids(opening_messages(instructions, first_observation)))
    return Trajectory(prompt, list(chat.header_ids), chat)
