"""A launcher and everything under it, for the multi-process fault tests: `prefalign train --nproc N` starts
torchrun, which starts each rank in a session of its own. Killing the launcher's process group therefore
reaches neither the ranks nor what they started, and a process whose parent died is re-parented, so it can
no longer be found under the launcher at the end: the tree is recorded while the run is alive, and killed
from that record (each process, and each recorded process group that is a rank's own)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil

# From a process's death (a rank's, or the launcher's) to the exit of every process of a 2-process run, on this
# 2-core machine: 3.3 to 9.9 s at a load average of 14 falling to 5 (benchmarks/results/rank-kill-cpu-2core.md,
# docs/reliability.md). Twice the slowest, and under torchrun's 30 s from SIGTERM to SIGKILL, so that a rank
# stopped only by SIGKILL fails it too. How each rank ended is checked apart from it, whatever the load.
STOP_BOUND_S = 20


def alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Tree:
    """`launcher` (a Popen) and every process seen under it by `record()` (psutil checks a pid's start time,
    so a recorded process that ended is never confused with a new one given its pid)."""

    def __init__(self, launcher: subprocess.Popen):
        self.launcher = launcher
        self.seen: dict[int, psutil.Process] = {}

    def record(self) -> list[psutil.Process]:
        """The processes under the launcher now (recorded too); [] once it has exited."""
        try:
            now = psutil.Process(self.launcher.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        for p in now:
            self.seen.setdefault(p.pid, p)
        return now

    def left(self) -> list[psutil.Process]:
        """Recorded processes still alive (the launcher not counted)."""
        return [p for p in self.seen.values() if alive(p)]

    def kill(self) -> None:
        """SIGKILL the launcher, every recorded process, and the process group each one leads (a rank's
        session: a helper it started dies too). Never this test's own group."""
        self.record()
        own = os.getpgrp()
        with contextlib.suppress(ProcessLookupError):
            self.launcher.kill()
        for p in self.seen.values():
            with contextlib.suppress(psutil.Error, ProcessLookupError, PermissionError):
                if alive(p) and os.getpgid(p.pid) == p.pid != own:
                    os.killpg(p.pid, signal.SIGKILL)
                p.kill()
        self.launcher.wait()


def run(cmd: list[str], log: Path, env: dict[str, str], timeout: float) -> tuple[int | None, str]:
    """Run `cmd` (its output into `log`, not a pipe: a rank outliving the launcher would hold a pipe open),
    recording its tree; one that has not ended in `timeout` s is killed with all it started. Its exit code
    (None: killed at the timeout) and output."""
    with log.open("w") as f:
        tree = Tree(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True))
    deadline = time.monotonic() + timeout
    try:
        while tree.launcher.poll() is None and time.monotonic() < deadline:
            tree.record()
            time.sleep(0.2)
    finally:
        hung = tree.launcher.poll() is None
        if hung or tree.left():  # a rank left behind is the run's failure, reported by its own test
            tree.kill()
    return (None if hung else tree.launcher.returncode), log.read_text()
