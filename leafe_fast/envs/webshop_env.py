"""WebShop adapter, text mode. WebShop is not on PyPI (the registry's ``webshop`` is a stub): install
it from its repository, with its product data and search index.

Success: the episode ends on "Buy Now" with WebShop's reward of 1 (the product matches every
attribute, option and the price limit); a purchase with a lower reward is a failure whose reward is
the partial match. Invalid actions: WebShop answers an action it cannot perform (a button that is
not on the page, a search where there is no search bar, a malformed action) with the same page and
reward 0; the adapter notices the unchanged page and says so in ``feedback``. RNG: WebShop's
constructor reseeds Python's global ``random`` (``random.seed(233)``); every backend call runs on
the env's own copy of the global RNG state (:class:`leafe_fast.envs.replay.PrivateRng`).
"""

from __future__ import annotations

from leafe_fast.envs.base import Task
from leafe_fast.envs.replay import ReplayEnv, require, split_rng


class WebShopEnv(ReplayEnv):
    """WebShop in text mode, one goal per task: ``spec["session"]`` (an instruction index).

    Backend: ``web_agent_site.envs.WebAgentTextEnv(observation_mode="text", num_products=...)``,
    ``reset(session=...) -> (obs, info)``, ``step(action) -> (obs, reward, done, info)`` with
    actions ``search[query]`` / ``click[button]``."""

    name = "webshop"
    description = (
        "You are shopping on a web site (WebShop) for the item described in the instruction. "
        "Answer each turn with one action: search[your query] or click[a button or product shown]."
    )
    _INSTALL = ("WebShop is not on PyPI: install it from https://github.com/princeton-nlp/WebShop "
                "(pip install -e . in its checkout provides 'web_agent_site')")
    # WebShop's own convention: goals 0..499 are the test set, 500..1499 validation, the rest train.
    SESSION_RANGES = {"test": (0, 500), "val": (500, 1500), "train": (1500, 12087)}

    def __init__(self, max_steps: int = 15, verify_replay: bool = True, num_products: int | None = None) -> None:
        super().__init__(max_steps, verify_replay)
        module = require("web_agent_site.envs", self._INSTALL, "webshop")
        options = {} if num_products is None else {"num_products": num_products}
        with self.rng.active():  # its constructor reseeds the global RNG
            self._env = module.WebAgentTextEnv(observation_mode="text", **options)
        self._page = ""

    def _open(self, task: Task) -> str:
        if "session" not in task.spec:
            raise ValueError(f"WebShop task {task.task_id!r} needs spec['session']")
        obs, _ = self._env.reset(session=task.spec["session"])
        self._page = str(obs)
        return self._page

    def _act(self, action: str):
        obs, reward, done, _ = self._env.step(action)
        obs, reward = str(obs), float(reward or 0.0)
        feedback = ""
        if not done and reward == 0.0 and obs == self._page:
            feedback = (f"Invalid action {action!r}: nothing changed. Use search[...] only on a page with a "
                        "search bar and click[...] only on a button or product shown on this page.")
        elif done and reward < 1.0:
            feedback = f"The purchase did not fully match the instruction (reward {reward:.2f} of 1)."
        self._page = obs
        return obs, reward, bool(done), bool(done) and reward >= 1.0, feedback, {}

    @classmethod
    def tasks(cls, split: str = "train", n: int = 8, seed: int = 0) -> list[Task]:
        rng = split_rng(split, seed)
        lo, hi = cls.SESSION_RANGES[split]
        return [Task(f"webshop-{split}-{s}", "webshop", {"session": s})
                for s in sorted(rng.sample(range(lo, hi), min(n, hi - lo)))]
