"""ScienceWorld adapter (``pip install scienceworld``; the simulator is a jar in the wheel, run on a
Java 17 runtime through py4j; it works offline).

What the agent sees: at ``reset`` the task description (``info["taskDesc"]``) followed by the room;
then each action's observation. Steps: ``max_steps`` counts the agent's actions (the package's own
``envStepLimit`` counts clock ticks, so a single ``wait`` used 10 of them; it is set out of reach).
Success: the task's score reaches 100, ScienceWorld's own completion. Failure: the package ends an
episode when the score turns negative (e.g. focusing on the wrong object); the step says so in
``feedback`` with the score. Rewards are score differences, starting from the score at reset (some
tasks give points for the start position). ``info["score"]`` is the running score (0..100, or < 0).

Replay restore is checked at every step (see :mod:`leafe_fast.envs.replay`) on a fingerprint of the
observation, the room (``look``), the inventory and the score. The simulator lists the objects and
doors of a room, the contents of containers, and the options of an "Ambiguous request" prompt, in an
order that changes between loads of the same task; the fingerprint sorts those listings (see
:func:`normalise`: a listing item describes one whole object, so the sorted listing is the same
exactly when the same objects are there), and an answer to an ambiguity prompt is stored as the
full text of the chosen option and re-resolved to its number on replay (and for the agent's next
answer after a restore, which refers to the numbering it was shown). Some tasks are still not
deterministic between loads (temperatures; prompts whose options have identical texts); their
restore raises ``ReplayDivergence`` at the first differing step (3 of 90 restores over the 30 tasks
at depths 10/30/50, all at depth 50).

Steps go through the simulator's server (``server.step`` + free look/inventory), the package's own
``step`` minus its list of every valid action, which costs more than the step and is not shown.
The Java process is shut down (and waited for) by ``close()``, on leaving a ``with`` block, or when
the env is garbage-collected.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from typing import Any

from leafe_fast.envs.base import Task
from leafe_fast.envs.replay import ReplayDivergence, ReplayEnv, require, split_rng
from leafe_fast.errors import UserError

_AMBIGUOUS = "Ambiguous request:"
_OPTION = re.compile(r"^(\d+):\t(.*)$")
_INVALID = ("No known action matches that input.", "Unknown action.")
_STEP_LIMIT_OFF = 10**9


@dataclass(frozen=True)
class Choice:
    """An answer to an "Ambiguous request" prompt, stored as the chosen option's full text."""

    text: str


def ambiguity_options(observation: str) -> list[str]:
    """The option texts of an "Ambiguous request" prompt, in the order shown (empty otherwise)."""
    if not observation.startswith(_AMBIGUOUS):
        return []
    return [m.group(2) for m in map(_OPTION.match, observation.splitlines()) if m]


_ARTICLE = re.compile(r"(?:a|an|A|An|the|The) ")


def _sort_items(body: str) -> str:
    """Sort the items of a comma-separated listing. Items are split only at a comma outside
    parentheses that is followed by an article, so an item keeps its own description ("a bulb, which
    is off"); the listing inside an item's "(containing ...)" is sorted the same way."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(body):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0 and body.startswith(" ", i + 1) and _ARTICLE.match(body, i + 2):
            items.append(body[start:i])
            start = i + 2
    items.append(body[start:])
    return ", ".join(sorted(_sort_contents(item) for item in items))


def _sort_contents(item: str) -> str:
    """``item`` with the listing of its (last) "(containing ...)" sorted."""
    at = item.rfind("(containing ")
    if at < 0:
        return item
    depth, close = 0, -1
    for i in range(at, len(item)):
        depth += {"(": 1, ")": -1}.get(item[i], 0)
        if depth == 0:
            close = i
            break
    if close < 0:
        return item
    inner = item[at + len("(containing "):close]
    return f"{_sort_contents(item[:at])}(containing {_sort_items(inner)}){item[close + 1:]}"


def _sort_inline_list(line: str) -> str:
    """Sort the items of an inline listing after the line's first ": " ("On the table is: a jug, a
    cup."; "You also see: A door to ..., A door to ...") and of every "(containing ...)"."""
    head, sep, body = line.partition(": ")
    if not sep:
        return _sort_contents(line)
    end = "." if body.endswith(".") else ""
    return f"{_sort_contents(head)}{sep}{_sort_items(body[: len(body) - len(end)])}{end}"


def normalise(text: str) -> str:
    """``text`` with listing order removed: each run of tab-indented lines (objects, doors,
    inventory) is sorted, the numbered options of an ambiguity prompt are sorted without their
    numbers, and the items of inline listings are sorted (:func:`_sort_inline_list`). Everything
    else is kept as is."""
    out: list[str] = []
    run: list[str] = []
    for line in map(_sort_inline_list, text.splitlines()):
        option = _OPTION.match(line)
        if line.startswith("\t") or option:
            run.append("\t" + option.group(2) if option else line)
            continue
        out += sorted(run)
        run = []
        out.append(line)
    out += sorted(run)
    return "\n".join(out)


def _start_simulator(module: Any) -> Any:
    """A simulator (a JVM) with the package's step limit out of reach; the adapter counts actions."""
    if shutil.which("java") is None:
        raise UserError("scienceworld", "no Java runtime on PATH (the simulator is a Java program)",
                        "install Java 17, e.g. apt-get install openjdk-17-jre-headless")
    return module.ScienceWorldEnv("", envStepLimit=_STEP_LIMIT_OFF)


class ScienceWorldEnv(ReplayEnv):
    """ScienceWorld tasks: ``spec = {"task_name", "variation", "simplification"}`` (default "easy").

    Backend: ``scienceworld.ScienceWorldEnv("", envStepLimit=...)``, ``load(task_name, variation,
    simplification)``, ``reset() -> (obs, info)``, ``step(action) -> (obs, reward, completed,
    info)`` with ``info["score"]`` in -100..100, ``info["taskDesc"]``, ``info["look"]``, ``info["inv"]``."""

    name = "scienceworld"
    isolate_rng = False  # the simulator runs in the JVM and draws nothing from Python's RNG (checked)
    description = (
        "You are in a science text game (ScienceWorld). Complete the task stated in the first "
        "observation. Answer each turn with one action, e.g. 'look around', 'open door to kitchen', "
        "'go to kitchen', 'pick up thermometer', 'focus on substance in metal pot'. When the game asks "
        "which object you meant, answer with the number of the option."
    )
    _INSTALL = "pip install scienceworld (it also needs a Java 17 runtime)"

    def __init__(self, max_steps: int = 50, verify_replay: bool = True) -> None:
        super().__init__(max_steps, verify_replay)
        self._module = require("scienceworld", self._INSTALL, "scienceworld")
        self._env = _start_simulator(self._module)
        self._java = getattr(getattr(self._env, "_gateway", None), "java_process", None)  # the JVM
        self._score = 0
        self._state_text = ""
        self._options: list[str] = []
        self._loaded: tuple | None = None  # the task loaded in the simulator

    # -- backend -------------------------------------------------------------------------
    def _observe(self, obs: str, info: dict) -> str:
        obs = str(obs)
        self._options = ambiguity_options(obs)
        self._score = int(info.get("score", 0))
        self._state_text = "\n".join(
            [normalise(obs), normalise(str(info.get("look", ""))), normalise(str(info.get("inv", ""))),
             f"score {self._score}"])
        return obs

    def _backend_step(self, action: str) -> tuple[str, bool, dict]:
        """One simulator step: observation, completed, info with score/look/inv. Through the
        simulator's server when the package exposes it: the package's own ``step`` also lists every
        valid action, which costs more than the step itself and is not shown to the agent."""
        server = getattr(self._env, "server", None)
        if server is None:
            obs, _, completed, info = self._env.step(action)
            return obs, bool(completed), info
        obs = server.step(action)
        info = {"score": int(round(100 * server.getScore())), "look": server.freeActionLook(),
                "inv": server.freeActionInventory()}
        return obs, bool(server.getCompleted()), info

    def _open(self, task: Task) -> str:
        spec = task.spec
        if "task_name" not in spec or "variation" not in spec:
            raise ValueError(f"ScienceWorld task {task.task_id!r} needs spec['task_name'] and spec['variation']")
        key = (spec["task_name"], int(spec["variation"]), spec.get("simplification", "easy"))
        server = getattr(self._env, "server", None)
        if server is None:
            self._env.load(*key)
            obs, info = self._env.reset()
        else:  # the package's reset: back to the start of the loaded task, then "look around"
            if key != self._loaded:
                self._loaded = None
                self._env.load(*key)
                self._loaded = key
            server.reset()
            obs, _, info = self._backend_step("look around")
            info["taskDesc"] = server.freeActionTaskDesc()
        obs = self._observe(obs, info)
        return f"{str(info.get('taskDesc', '')).strip()}\n\n{obs}".strip()

    def _act(self, action: str):
        before = self._score
        obs, completed, info = self._backend_step(action)
        obs = self._observe(obs, info)
        score = self._score
        feedback = ""
        if obs.startswith(_INVALID):
            feedback = f"Invalid action {action!r}: {obs.strip()}"
        elif self._options:
            feedback = "That command was ambiguous: answer with the number of the object you meant."
        success = score >= 100
        if score < 0:
            completed = True
            feedback = (f"The task failed: the score fell to {score} (ScienceWorld ends an episode when the "
                        "score is negative, e.g. after focusing on the wrong object).")
        return obs, float(score - before), bool(completed) or success, success, feedback, {"score": score}

    def _fingerprint(self, observation: str) -> str:
        return self._state_text

    def _record(self, action: str) -> Any:
        # numbers refer to the prompt the agent saw; after a restore the backend may number differently
        shown, text = ambiguity_options(self._last), action.strip()
        if shown and text.isdigit() and int(text) < len(shown):
            return Choice(shown[int(text)])
        return action

    def _replay_action(self, recorded: Any) -> str:
        if not isinstance(recorded, Choice):
            return recorded
        if recorded.text not in self._options:
            raise ReplayDivergence(f"the ambiguity prompt no longer offers {recorded.text!r}")
        return str(self._options.index(recorded.text))

    def _close_backend(self) -> None:
        env, self._env = getattr(self, "_env", None), None
        if env is None:
            return
        env.close()
        java = getattr(self, "_java", None)
        if java is not None:  # wait for the JVM, so the package's own __del__ finds it gone
            try:
                java.wait(timeout=10)
            except Exception:
                java.kill()

    @property
    def score(self) -> int:
        """The running score (after reset: the score of the start position)."""
        return self._score

    @staticmethod
    def tasks(split: str = "train", n: int = 8, seed: int = 0, task_names: list[str] | None = None,
              simplification: str = "easy") -> list[Task]:
        """Variations of ScienceWorld's own train/dev/test split, ``n`` sampled by ``seed``.

        Starts a JVM for the listing (a few seconds); pass ``task_names`` to list fewer tasks."""
        rng = split_rng(split, seed)
        module = require("scienceworld", ScienceWorldEnv._INSTALL, "scienceworld")
        env = _start_simulator(module)
        try:
            known = list(env.get_task_names())
            unknown = sorted(set(task_names or ()) - set(known))
            if unknown:
                raise ValueError(f"unknown ScienceWorld task(s) {unknown}; known: {sorted(known)}")
            pool = []
            for task_name in task_names or sorted(known):
                env.load(task_name, 0, "")
                getter = {"train": env.get_variations_train, "val": env.get_variations_dev,
                          "test": env.get_variations_test}[split]
                pool += [(task_name, int(v)) for v in getter()]
        finally:
            env.close()
        picked = rng.sample(pool, min(n, len(pool)))
        return [Task(f"scienceworld-{split}-{t}-{v}", "scienceworld",
                     {"task_name": t, "variation": v, "simplification": simplification}) for t, v in picked]
