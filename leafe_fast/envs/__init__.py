"""Environments with exact snapshot/restore: Sokoban, sandboxed code, adapters for optional packages.

``make_env(name)`` and ``list_tasks(name, split, n, seed)`` are the entry points; see ``base.py`` for
the protocol every environment follows.
"""

from leafe_fast.envs.base import Env, GroundedReflection, Observation, StepResult, Task
from leafe_fast.envs.registry import available_envs, list_tasks, make_env

__all__ = ["Env", "GroundedReflection", "Observation", "StepResult", "Task", "available_envs", "list_tasks", "make_env"]
