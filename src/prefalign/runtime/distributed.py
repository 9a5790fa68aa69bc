"""Several processes, one run: PyTorch's own process group, set up from the environment a launcher
leaves (torchrun, `accelerate launch`, `prefalign train --nproc N`: RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT). Without one, a `World` of one process, and every function here is a no-op.

The helpers are the few collectives the loop needs beyond the gradient reduction (which DDP or FSDP2
do): agreeing on whether a loss was finite (a rank that skips backward under DDP would leave the
others waiting), averaging the logged metrics, summing token counts, and filling the precomputed
reference table from shards.
"""

from __future__ import annotations

import ctypes
import datetime
import math
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 writes logs, metrics, checkpoints and the final model; the others compute."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def all_true(self, flag: bool) -> bool:
        """True on every rank only if `flag` is true on every rank."""
        if not self.active:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def any_true(self, flag: bool) -> bool:
        return not self.all_true(not flag)

    def sum(self, value: float) -> float:
        if not self.active:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self._device())
        dist.all_reduce(t)
        return float(t.item())

    def ratio(self, total: float, count: float) -> float:
        """sum of `total` over sum of `count`, both over the processes (one reduction): a mean over the
        whole batch from each process's share."""
        s = self.reduce(torch.tensor([float(total), float(count)], dtype=torch.float64))
        return float(s[0] / s[1])

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over the processes (a new tensor; `t` is left as it was). A table each process
        filled in part, zeros elsewhere, comes back whole: exact, as each entry is added to zeros."""
        if not self.active:
            return t
        out = t.detach().clone().to(self._device())
        dist.all_reduce(out)
        return out.to(t.device)

    def mean_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Each key averaged over the ranks that report a number for it (a rank may miss a key, or
        have NaN where its share had nothing to measure, as one process's loop drops NaN). Every rank
        has an equal share of the batch, so a per-example mean averaged over ranks is the mean over
        the whole batch."""
        if not self.active:
            return metrics
        gathered: list[dict[str, float]] = [{} for _ in range(self.size)]
        dist.all_gather_object(gathered, metrics)
        out = {}
        for k in sorted({k for m in gathered for k in m}):
            vals = [m[k] for m in gathered if k in m and not math.isnan(m[k])]
            out[k] = sum(vals) / len(vals) if vals else float("nan")
        return out

    def max(self, value: float) -> float:
        if not self.active:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def share(self, obj):
        """Rank 0's `obj` (any picklable value) on every rank: what rank 0 alone measured or decided."""
        if not self.active:
            return obj
        box = [obj if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _device(self) -> torch.device:
        # NCCL reduces only CUDA tensors; gloo only CPU ones
        return torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")


def launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_world(device: torch.device, timeout_minutes: float = 30.0) -> tuple[World, torch.device]:
    """The process group when a launcher started several processes, and this process's device
    (cuda:LOCAL_RANK on a GPU node). NCCL for CUDA (and ROCm's RCCL behind the same name), gloo
    for CPU runs: the CPU tests run two processes on gloo."""
    if not launched():
        return World(), device
    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return world, device


def shut_down(world: World) -> None:
    if world.active and dist.is_initialized():
        dist.destroy_process_group()


# the stops the launcher passes on to torchrun: `kill`, a job scheduler, Ctrl-C, a closed terminal
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass(frozen=True)
class Launched:
    code: int  # torchrun's exit code: 0, or that of the first process that failed
    stopped_by: int | None = None  # the stop signal the launcher received and passed on to torchrun


def launch(nproc: int, argv: list[str]) -> Launched:
    """`prefalign ARGV` in `nproc` processes on this machine under torchrun (PyTorch's launcher:
    rendezvous, environment, and when one process dies it stops the others, so nothing hangs).

    torchrun starts each process in a session of its own, so a signal to this launcher (or to its
    process group: Ctrl-C) reaches none of them. The first SIGTERM, SIGINT or SIGHUP is passed on to
    torchrun as SIGTERM, once: torchrun sends the processes the signal it got (SIGKILL 30 s later), and
    SIGTERM ends them at once, where SIGINT would unwind each through its `finally`s, one possibly blocked
    in a collective its peer has left; a second signal would cut torchrun's shutdown short. torchrun runs
    in its own session too, so that a Ctrl-C reaches it only this way. On Linux torchrun is also told to
    receive SIGTERM when this launcher dies (PR_SET_PDEATHSIG): a SIGKILLed launcher stops the run the
    same way instead of leaving it training unobserved."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "prefalign", *argv]
    got: list[int] = []  # the signals received; the first is passed on
    procs: list[subprocess.Popen] = []
    token = [True]  # popped by whoever passes the signal on: list.pop is atomic, a handler cannot cut it in two

    def pass_on() -> None:
        if got and procs:
            try:
                token.pop()
            except IndexError:  # already passed on
                return
            procs[0].send_signal(signal.SIGTERM)

    def forward(signum: int, _frame) -> None:
        got.append(signum)
        pass_on()  # nothing yet if it came while torchrun was being started: then just after

    # signal handlers belong to the main thread; from another (a notebook's worker) torchrun still dies with it
    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, forward) for s in FORWARDED} if main else {}
    try:
        procs.append(subprocess.Popen(cmd, start_new_session=True, preexec_fn=_die_with_parent()))
        pass_on()
        code = procs[0].wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return Launched(code, got[0] if got else None)


def _die_with_parent():
    """A function for Popen to run in the child before exec: SIGTERM to it when this thread exits
    (PR_SET_PDEATHSIG, Linux; None elsewhere). libc's prctl is looked up here, in the parent, so the
    child (forked from a process that may have threads) only makes the system call."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def child() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the launcher died before the call: nothing would signal it now
            os.kill(os.getpid(), signal.SIGTERM)
    return child
