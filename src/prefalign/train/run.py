"""`train(cfg)`: any method's validated config (train/methods.py) run by its method's trainer."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Callable
from pathlib import Path

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
from .ppo import check_rl_world, run_rl
from .trackers import check_installed

TRAINERS: dict[str, Callable[..., LoopResult]] = {"offline": run_offline, "rl": run_rl}


def train(cfg: RunConfig, log: Callable[[str], None] = print, progress: bool = True) -> LoopResult:
    check_installed(cfg.trackers)  # before any model is loaded
    if cfg.push_to_hub:
        check_push(cfg.hub_repo_id)  # offline or without a token: an error now, not after hours of training
    # one run per output folder (rank 0 holds the lock for all processes); the upload is the run's very
    # last act, after its model card: api.finish_run, one layer up
    memory.doing("while starting the run")
    with run_lock(Path(cfg.output), log, main=int(os.environ.get("RANK", "0")) == 0):
        try:
            return TRAINERS[METHODS[cfg.method].trainer](cfg, log=log, progress=progress)
        except Exception as e:
            # running out of memory is a setting to change, not a bug: one clear error (the CLI prints it
            # without a traceback), raised once the trainer's `finally`s have closed its files
            if not memory.out_of_memory(e):
                raise
            raise OutOfMemoryError(out_of_memory_advice(cfg, memory.where(), e)) from e


def out_of_memory_advice(cfg: RunConfig, where: str, e: BaseException) -> str:
    """What ran out and where, the settings of this config that need less memory, and what was kept."""
    said = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
    said = re.sub(r"^\[enforce fail at [^\]]*\]\s*(err == 0\.\s*)?", "", said)  # c10's prefix: not for users
    config = Path(cfg.output) / "config.yaml"  # the resolved config, written when the run starts
    tips = [f"`prefalign plan {config if config.exists() else 'CONFIG.yaml'}` estimates the peak memory term by "
            "term and which settings fit this device"]
    if not cfg.gradient_checkpointing:
        tips.append("gradient_checkpointing: true (activations recomputed in the backward)")
    accum = getattr(cfg, "grad_accum", None)  # offline methods; RL splits its updates with num_minibatches
    if cfg.batch_size > 1 and accum is not None:
        smaller = max(d for d in range(1, cfg.batch_size) if cfg.batch_size % d == 0)
        tips.append(f"a smaller batch_size with a larger grad_accum, the same {cfg.batch_size * accum} examples a "
                    f"step (batch_size: {smaller}, grad_accum: {accum * cfg.batch_size // smaller})")
    elif accum is not None:
        tips.append(f"a smaller max_length (now {cfg.max_length})")
    else:
        tips.append("a smaller batch_size (prompts per rollout), max_new_tokens or a larger num_minibatches")
    if not cfg.lora:
        tips.append("lora: true (no gradients nor AdamW state for the base weights)")
    if "copying the model" in where:
        tips.append("reference: precompute (its log-probs computed once, before training: no second model)")
    steps = list_checkpoints(Path(cfg.output))
    kept = (f"checkpoints up to step {steps[-1]} are intact (resume: true continues from it)" if steps
            else "no checkpoint was written")
    return f"out of memory {where} ({said[:300]}). To need less: {'; '.join(tips)}. {kept[0].upper()}{kept[1:]}."


def launch_processes(cfg: RunConfig, nproc: int, argv: list[str], log: Callable[[str], None] = print) -> None:
    """`prefalign ARGV` (a train command) in `nproc` processes; a failure of any one stops them all
    and is reported with where to resume from. What the config asks of a world of `nproc` processes
    is checked here first, so that a config error reads as one, not as a failed process."""
    if launched():
        raise ConfigError("--nproc starts the processes itself: under torchrun or accelerate launch, leave it out")
    check_installed(cfg.trackers)
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
