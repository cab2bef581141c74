"""Adapters for optional text-game packages: ALFWorld, ScienceWorld, WebShop, TextArena.

None of these packages is a dependency (``pip install leafe-fast[envs]`` installs ScienceWorld and
TextArena). Each adapter imports its package when it is constructed and raises an ``ImportError``
naming what to install when it is missing. One module per adapter documents its success definition
and the package's quirks it handles; :mod:`leafe_fast.envs.replay` holds the shared checked replay
restore (``restore_mode = "replay-checked"``) and the isolation of the global RNG.

What the adapters do not do: multi-player TextArena games (only single-player ones), ALFWorld's
visual (THOR) mode, WebShop's HTML mode; and ``ground_reflection`` returns None (these
environments carry no solver to say where a trajectory went wrong).
"""

from __future__ import annotations

from leafe_fast.envs.alfworld_env import ALFWorldEnv
from leafe_fast.envs.replay import (
    RESTORE_MODES,
    SPLITS,
    PrivateRng,
    ReplayDivergence,
    ReplayEnv,
    ReplaySnapshot,
    require,
)
from leafe_fast.envs.scienceworld_env import ScienceWorldEnv
from leafe_fast.envs.textarena_env import OFFLINE_GAMES, TextArenaEnv
from leafe_fast.envs.webshop_env import WebShopEnv

ADAPTERS: dict[str, type[ReplayEnv]] = {
    cls.name: cls for cls in (ALFWorldEnv, ScienceWorldEnv, WebShopEnv, TextArenaEnv)
}

__all__ = [
    "ADAPTERS", "ALFWorldEnv", "OFFLINE_GAMES", "PrivateRng", "RESTORE_MODES", "ReplayDivergence", "ReplayEnv",
    "ReplaySnapshot", "SPLITS", "ScienceWorldEnv", "TextArenaEnv", "WebShopEnv", "require",
]
