"""`train(cfg)`: any method's validated config (train/methods.py) run by its method's trainer."""

from __future__ import annotations

from collections.abc import Callable

from .config import RunConfig
from .loop import LoopResult
from .methods import METHODS
from .offline import run_offline
from .ppo import run_rl

TRAINERS: dict[str, Callable[..., LoopResult]] = {"offline": run_offline, "rl": run_rl}


def train(cfg: RunConfig, log: Callable[[str], None] = print, progress: bool = True) -> LoopResult:
    return TRAINERS[METHODS[cfg.method].trainer](cfg, log=log, progress=progress)
