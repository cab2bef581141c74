"""pass@k with the unbiased estimator, and evaluation of a policy on an environment's tasks.

pass@k for one task with ``n`` sampled episodes of which ``c`` succeeded is the probability that at
least one of ``k`` episodes drawn without replacement succeeds::

    pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n-c+1}^{n} (1 - k / i)

The product form never forms a binomial coefficient, so it stays exact-ish for any n (no overflow,
no cancellation of huge numbers); it is evaluated in log space with ``log1p``/``expm1``.

``evaluate`` runs ``n`` episodes per task through a ``RolloutEngine``: every step of every unfinished
episode goes to the engine as one batch, and a single environment instance serves all episodes
through ``snapshot``/``restore`` (the Env contract makes that exact). No reflection, no experience:
this is the policy on its own, as deployed.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from leafe_fast.engines.base import GenerationRequest, SamplingParams
from leafe_fast.envs.base import Task
from leafe_fast.envs.registry import action_token_limit
from leafe_fast.errors import UserError
from leafe_fast.trajectory import Trajectory, open_trajectory


def pass_at_k(n: Any, c: Any, k: Any) -> np.ndarray | float:
    """Unbiased pass@k; ``n``, ``c``, ``k`` broadcast (ints or integer arrays).

    Raises ``ValueError`` when ``k > n`` (k episodes cannot be drawn from n), ``k < 1``, ``c < 0`` or
    ``c > n``. Returns a float for scalar inputs, else a float64 array.
    """
    n_a, c_a, k_a = np.broadcast_arrays(*(np.asarray(x) for x in (n, c, k)))
    for name, arr in (("n", n_a), ("c", c_a), ("k", k_a)):
        if arr.size and not np.all(np.equal(np.mod(arr, 1), 0)):
            raise ValueError(f"pass_at_k: {name} must hold integers, got {arr}")
    n_a, c_a, k_a = (a.astype(np.int64) for a in (n_a, c_a, k_a))
    if np.any(k_a < 1):
        raise ValueError(f"pass_at_k: k must be >= 1, got {k_a[k_a < 1].tolist()}")
    if np.any(c_a < 0) or np.any(c_a > n_a):
        raise ValueError("pass_at_k: need 0 <= c <= n for every task")
    if np.any(k_a > n_a):
        bad = np.argwhere(k_a > n_a)[0]
        raise ValueError(
            f"pass_at_k: k={int(k_a[tuple(bad)])} > n={int(n_a[tuple(bad)])}: cannot draw k of n episodes; "
            "sample at least k episodes per task"
        )
    shape = n_a.shape
    n_f, c_f, k_f = n_a.ravel(), c_a.ravel(), k_a.ravel()
    out = np.ones(n_f.shape, dtype=np.float64)
    # n - c < k: every draw of k contains a success. Otherwise the product has c factors.
    need = n_f - c_f >= k_f
    if np.any(need):
        nn, cc, kk = n_f[need], c_f[need], k_f[need]
        width = int(cc.max()) if cc.size else 0
        if width == 0:
            out[need] = 0.0
        else:
            j = np.arange(width)[None, :]  # factor j uses i = n - c + 1 + j
            i = (nn - cc + 1)[:, None] + j
            valid = j < cc[:, None]
            den = np.where(valid, i.astype(np.float64), np.inf)  # padding factors are log1p(-0) = 0
            out[need] = -np.expm1(np.log1p(-kk[:, None] / den).sum(axis=1))
    out = out.reshape(shape)
    return float(out) if out.ndim == 0 else out


def pass_at_k_reference(n: int, c: int, k: int) -> float:
    """The textbook form with exact integer binomials; slow, for tests."""
    from math import comb

    if k > n:
        raise ValueError("k > n")
    return 1.0 - comb(n - c, k) / comb(n, k)


# --- evaluation ------------------------------------------------------------------------------


@dataclass
class TaskResult:
    task_id: str
    n: int
    successes: int
    returns: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # environment exceptions, one per failed episode


@dataclass
class _Episode:
    task: Task
    index: int  # j-th episode of its task
    traj: Trajectory  # the episode's tokens, built exactly as exploration builds them
    snapshot: Any
    steps: int = 0
    ret: float = 0.0
    done: bool = False
    success: bool = False
    error: str | None = None


def evaluate(
    engine: Any,
    chat: Any,
    env: Any,
    tasks: Sequence[Task],
    n: int = 4,
    ks: Sequence[int] = (1,),
    sampling: SamplingParams | None = None,
    *,
    max_turns: int = 100,
    max_context_tokens: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Run ``n`` episodes per task and report per-task successes and mean pass@k for each k.

    ``chat`` is a ``leafe_fast.data.chat.ChatFormat`` (token-level template deltas). ``sampling``
    defaults to temperature 1.0 with the chat's end-of-turn ids as stops; each episode gets its own
    seed (``seed``, task and episode index) so a rerun is reproducible. ``max_turns`` caps episodes
    whose environment never ends them; ``max_context_tokens`` (the model's positions) ends an episode
    as a failure when its next prompt plus ``max_new_tokens`` would not fit.

    Without ``sampling``, an action may be as long as the env's limit
    (``leafe_fast.envs.registry.action_token_limit``: the one exploration uses). A generation that
    stops at the limit instead of ending its turn is counted (``cut_generations``) and warned about.

    An exception raised by the environment ends that episode as a failure (the task's reset: all its
    episodes); the error is kept in the task's ``errors`` and counted in ``env_errors``; the run goes on.

    Returns ``{"n", "ks", "num_tasks", "success_rate", "pass@k": {k: mean}, "tasks": [TaskResult
    as dict], "tokens": {"prompt", "output", "cached"}, "cut_episodes", "cut_generations",
    "env_errors"}`` (``cut_episodes``: ended by ``max_turns`` or ``max_context_tokens`` rather than by
    the environment).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError("--n", f"episodes per task must be an integer >= 1, got {n!r}", "pass --n 1 or more")
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1 or ks[-1] > n:
        raise UserError("--k", f"every k must be in [1, n={n}], got {ks}", f"pass k values between 1 and {n}")
    if not tasks:
        raise UserError("--tasks", "there are no tasks to evaluate", "pass --tasks 1 or more (and a split that has tasks)")
    ids = [t.task_id for t in tasks]
    if len(set(ids)) != len(ids):
        twice = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"evaluate: task ids must be unique (results are per task); repeated: {twice[:5]}")
    base = sampling or SamplingParams(temperature=1.0, max_new_tokens=action_token_limit(getattr(env, "name", "")))
    if not base.stop_token_ids:
        base = SamplingParams(**{**asdict(base), "stop_token_ids": tuple(chat.stop_ids)})

    episodes: list[_Episode] = []
    for t_index, task in enumerate(tasks):
        try:
            obs = env.reset(task)
            prompt = open_trajectory(chat, env.instructions(), obs)
            snap = env.snapshot()
        except Exception as e:  # this task fails, the others go on
            error = f"reset: {type(e).__name__}: {e}"
            episodes += [_Episode(task, j, Trajectory([], []), None, done=True, error=error) for j in range(n)]
            continue
        episodes += [_Episode(task, j, prompt.copy(), snap) for j in range(n)]

    tokens = {"prompt": 0, "output": 0, "cached": 0}
    bar = _progress(len(episodes), progress)
    cut_generations = 0
    finished = sum(e.done for e in episodes)
    bar.update(finished)
    successes = 0
    cut = 0  # episodes ended by max_turns or max_context_tokens, not by the environment
    turn = 0
    while True:
        active = [e for e in episodes if not e.done]
        if not active:
            break
        if turn >= max_turns:
            for e in active:
                e.done = True
            cut += len(active)
            finished += len(active)
            bar.update(len(active))
            break
        if max_context_tokens is not None:
            room = max_context_tokens - len(chat.header_ids) - base.max_new_tokens
            for e in [e for e in active if len(e.traj.ids) > room]:
                e.done = True  # out of context: a failure, as a deployed model would fail
                finished += 1
                cut += 1
                bar.update(1)
                bar.set_postfix(success=f"{successes / finished:.2f}")
            active = [e for e in active if not e.done]
            if not active:
                break
        requests = []
        for e in active:
            ep_seed = _episode_seed(seed, e.task.task_id, e.index, turn)
            params = SamplingParams(**{**asdict(base), "seed": ep_seed, "n": 1})
            requests.append(GenerationRequest(e.traj.generation_prompt(), params, f"{e.task.task_id}/{e.index}/{turn}"))
        results = engine.generate(requests)
        if len(results) != len(requests):
            raise RuntimeError(f"evaluate: the engine returned {len(results)} results for {len(requests)} requests")
        for e, res in zip(active, results):
            tokens["prompt"] += res.prompt_tokens
            tokens["output"] += res.output_tokens
            tokens["cached"] += res.cached_tokens
            cut_generations += int(res.finish_reason == "length" and len(res.output_ids) >= base.max_new_tokens)
            try:
                env.restore(e.snapshot)
                step = env.step(chat.decode_action(res.output_ids))
                e.snapshot = env.snapshot()
            except Exception as err:  # this episode fails, the others go on
                e.done, e.error = True, f"step {e.steps + 1}: {type(err).__name__}: {err}"
                finished += 1
                bar.update(1)
                continue
            e.steps += 1
            e.ret += float(step.reward)
            e.traj.add_step(list(res.output_ids), step)
            if step.done:
                e.done, e.success = True, bool(step.success)
                finished += 1
                successes += e.success
                bar.update(1)
                bar.set_postfix(success=f"{successes / finished:.2f}")
        turn += 1
    bar.close()

    per_task: dict[str, TaskResult] = {}
    for e in episodes:
        r = per_task.setdefault(e.task.task_id, TaskResult(e.task.task_id, n, 0))
        r.successes += int(e.success)
        r.returns.append(round(e.ret, 6))
        r.steps.append(e.steps)
        if e.error is not None:
            r.errors.append(e.error)
    results = list(per_task.values())
    env_errors = sum(e.error is not None for e in episodes)
    if cut_generations:
        warnings.warn(f"evaluate: {cut_generations} generation(s) stopped at the token limit "
                      f"(max_new_tokens={base.max_new_tokens}) instead of ending their turn; raise the limit "
                      "if the env's actions are longer", RuntimeWarning, stacklevel=2)
    if env_errors:
        warnings.warn(f"evaluate: {env_errors} episode(s) ended by an environment error (counted as failures; "
                      "see tasks[].errors)", RuntimeWarning, stacklevel=2)
    c = np.array([r.successes for r in results])
    return {
        "n": n,
        "ks": ks,
        "num_tasks": len(results),
        "success_rate": float(c.sum() / (n * len(results))),
        "pass@k": {k: float(np.mean(pass_at_k(n, c, k))) for k in ks},
        "tasks": [asdict(r) for r in results],
        "tokens": tokens,
        "cut_episodes": cut,
        "cut_generations": cut_generations,
        "env_errors": env_errors,
    }


def _episode_seed(seed: int, task_id: str, index: int, turn: int) -> int:
    import zlib

    return (seed * 1_000_003 + zlib.crc32(task_id.encode()) * 7919 + index * 104_729 + turn) % (2**31 - 1)


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="eval episodes", unit="ep", disable=not enabled, leave=False)
