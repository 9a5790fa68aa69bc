"""Each stage of a pipeline in its own process, so that its peak memory is its own.

A process's RSS high-water mark cannot be reset: in one process, DPO training after pair sampling
would report the sampler's peak, and every stage the largest so far (the old demo reported 630 MB
for both DPO and PPO). `run_stage` runs a function in a fresh child process and returns its result
with that child's cost (docs/benchmarks.md, "How costs are counted"):
- `seconds`: wall clock of the function in the child (model loading included; process start-up not,
  so that a stage is not charged the interpreter's and torch's import time),
- `cpu_seconds`: user + system CPU time of the child's threads over the function (getrusage),
- `peak_rss_bytes`: the child's own peak RSS (VmHWM), which includes what the forkserver's imports
  left resident; `baseline_rss_bytes`: the child's RSS (VmRSS) as the function starts,
- `peak_cuda_bytes`: on CUDA, the allocator's peak (a fresh process starts from zero), else None.
Children are forked from a forkserver that has imported torch and transformers once, so a stage
starts in milliseconds rather than seconds; where there is no forkserver (Windows), they are spawned.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import resource
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..runtime.memory import peak_memory_bytes, peak_rss_bytes

# Imported once by the forkserver; never anything that starts threads or touches a GPU at import.
PRELOAD = ["torch", "transformers", "peft", "prefalign.tasks.sentiment", "prefalign.train.offline",
           "prefalign.train.ppo", "prefalign.eval.evaluate"]


@dataclass(frozen=True)
class Log:
    """A log callable that survives the trip into a child process (a lambda does not)."""

    quiet: bool = False

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)


def portable(log: Callable[[str], None] | None) -> Callable[[str], None]:
    """LOG itself when a child process can receive it (a function of an importable module), else a
    stderr Log. Anything from __main__ is refused: a child re-imports the main script without running
    its `if __name__ == "__main__":` block, so a function defined there pickles but cannot load."""
    if log is None:
        return Log(quiet=True)
    if getattr(log, "__module__", "__main__") == "__main__":
        return Log()
    try:
        pickle.dumps(log)
    except (pickle.PicklingError, AttributeError, TypeError):
        return Log()
    return log


def _context():
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        return ctx
    return multiprocessing.get_context("spawn")


def run_stage(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, dict]:
    """fn(*args, **kwargs) in a fresh child process: (its result, its cost)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=_context(), initializer=_watch,
                             initargs=(os.getpid(),)) as pool:
        return pool.submit(_measured, fn, args, kwargs).result()


def _watch(owner: int) -> None:
    """In the child, before it takes its task: end it when the process that asked for it is gone
    (killed, timed out). Its parent is the forkserver, so nothing else would stop it training on for
    minutes as an orphan, or, its task done, waiting forever on a queue whose writer it holds itself."""
    threading.Thread(target=_exit_with, args=(owner,), daemon=True).start()


def _exit_with(owner: int) -> None:
    while True:
        time.sleep(2.0)
        try:
            os.kill(owner, 0)
        except ProcessLookupError:
            os._exit(1)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return r.ru_utime + r.ru_stime


def _rss_now() -> int | None:
    """VmRSS now (Linux), else None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _measured(fn: Callable[..., Any], args: tuple, kwargs: dict) -> tuple[Any, dict]:
    # the child is forked from the forkserver with torch and transformers already imported: its peak RSS
    # includes those pages, so the RSS at its start is reported beside the peak (not subtracted)
    baseline, c0, t0 = _rss_now(), _cpu(), time.perf_counter()
    result = fn(*args, **kwargs)
    seconds, cpu = time.perf_counter() - t0, _cpu() - c0
    cuda = peak_memory_bytes(torch.device("cuda")) if torch.cuda.is_initialized() else None
    return result, {"seconds": seconds, "cpu_seconds": cpu, "peak_rss_bytes": peak_rss_bytes(),
                    "baseline_rss_bytes": baseline, "peak_cuda_bytes": cuda}


def chain(*costs: dict) -> dict:
    """The cost of stages run one after another: seconds add up, the peak is the largest stage's."""
    cuda = [c["peak_cuda_bytes"] for c in costs if c.get("peak_cuda_bytes") is not None]
    return {"seconds": sum(c["seconds"] for c in costs), "cpu_seconds": sum(c.get("cpu_seconds", 0) for c in costs),
            "peak_rss_bytes": max(c["peak_rss_bytes"] for c in costs), "peak_cuda_bytes": max(cuda) if cuda else None,
            # what each process held at its start (the forkserver's): the largest, beside the largest peak
            "baseline_rss_bytes": max((c["baseline_rss_bytes"] for c in costs if c.get("baseline_rss_bytes")),
                                      default=None)}
