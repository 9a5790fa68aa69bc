"""`train(cfg)`: any method's validated config (train/methods.py) run by its method's trainer."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import ConfigError, OutOfMemoryError, TrainingError
from ..models.hub import check_push
from ..runtime import memory
from ..runtime.distributed import World, launch, launched
from .checkpoint import list_checkpoints
from .config import RunConfig
from .lock import run_lock
from .loop import LoopResult
from .methods import METHODS
from .offline import check_world, run_offline
from .oom import out_of_memory_advice
from .ppo import check_rl_world, run_rl
from .trackers import check_installed

TRAINERS: dict[str, Callable[..., LoopResult]] = {"offline": run_offline, "rl": run_rl}


def train(cfg: RunConfig, log: Callable[[str], None] = print, progress: bool = True) -> LoopResult:
    check_installed(cfg.trackers)  # before any model is loaded
    if cfg.push_to_hub:
        check_push(cfg.hub_repo_id)  # offline or without a token: an error now, not after hours of training
    # one run per output folder (rank 0 holds the lock for all processes); the upload is the run's very
    # last act, after its model card: api.finish_run, one layer up
    memory.begin()
    with run_lock(Path(cfg.output), log, main=int(os.environ.get("RANK", "0")) == 0):
        check_fresh_start(cfg)  # inside the lock: a run still training there is named by the lock first
        try:
            return TRAINERS[METHODS[cfg.method].trainer](cfg, log=log, progress=progress)
        except Exception as e:
            # running out of memory is a setting to change, not a bug: one clear error (the CLI prints it
            # without a traceback), raised once the trainer's `finally`s have closed its files
            if not memory.out_of_memory(e):
                raise
            raise OutOfMemoryError(out_of_memory_advice(cfg, memory.where(), e, _on_cuda(cfg))) from e


def check_fresh_start(cfg: RunConfig) -> None:
    """A fresh start (resume: false) is refused in a folder that holds an earlier run's committed
    checkpoints: left in place they would mix with the new run's (a later resume could take the old
    run's newest step, and keep_checkpoints would delete the new run's first), and moved aside they would
    outlive the metrics.jsonl and final/ the new run overwrites. Nothing is touched; the user decides."""
    steps = [] if cfg.resume else list_checkpoints(Path(cfg.output))
    if steps:
        ckpts = Path(cfg.output) / "checkpoints"
        held = f"step-{steps[0]}" + (f" to step-{steps[-1]}" if len(steps) > 1 else "")
        raise ConfigError(f"{ckpts} holds an earlier run's checkpoints ({held}) and this run starts afresh "
                          f"(resume: false): resume: true continues that run; to start over, move them away "
                          f"(mv {ckpts} {ckpts}.old) or give another output folder")


def _on_cuda(cfg: RunConfig) -> bool:
    return cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())


def launch_processes(cfg: RunConfig, nproc: int, argv: list[str], log: Callable[[str], None] = print) -> None:
    """`prefalign ARGV` (a train command) in `nproc` processes; a failure of any one stops them all
    and is reported with where to resume from. What the config asks of a world of `nproc` processes
    is checked here first, so that a config error reads as one, not as a failed process."""
    if launched():
        raise ConfigError("--nproc starts the processes itself: under torchrun or accelerate launch, leave it out")
    check_installed(cfg.trackers)
    check_fresh_start(cfg)
    (check_world if METHODS[cfg.method].trainer == "offline" else check_rl_world)(cfg, World(0, nproc))
    if cfg.push_to_hub:
        check_push(cfg.hub_repo_id)
    log(f"starting {nproc} processes (torchrun, distributed: {cfg.distributed})")
    run = launch(nproc, argv)
    if run.code == 0:
        return
    steps = list_checkpoints(Path(cfg.output))
    where = "no checkpoint was saved (set save_every)"
    if steps:
        where = (f"the newest checkpoint is {Path(cfg.output) / 'checkpoints' / f'step-{steps[-1]}'}: resume with "
                 "resume=true, on any number of processes")
    elif cfg.save_every:  # it died before its first save
        where = f"no checkpoint was saved yet (the first is due at step {cfg.save_every}): resume=true starts over"
    if run.stopped_by is not None:  # exit as a shell reports a command a signal ended: 128 + its number
        error = TrainingError(f"stopped by {signal.Signals(run.stopped_by).name}: torchrun stopped the {nproc} "
                              f"processes; {where}")
        error.exit_code = 128 + run.stopped_by
        raise error
    raise TrainingError(f"a training process failed (exit code {run.code}; its error is above) and torchrun "
                        f"stopped the others; {where}")
