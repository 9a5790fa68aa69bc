"""The RSS sampler both load benchmarks watch a process with (data_scale.py, long_run.py): its resident
set read from outside every `interval` seconds (/proc/PID/status VmRSS), and its own peak from wait4
(ru_maxrss of that one child). No torch: the sampler must not weigh on the machine it measures."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable


def vm_rss(pid: int) -> int | None:
    """The process's resident set now, in bytes (None once it is gone, or off Linux)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def sample(proc: subprocess.Popen, interval: float, t0: float, also: Callable[[], object] | None = None,
           digits: int = 1) -> tuple[list[tuple], int, int]:
    """Until `proc` ends: (seconds since t0, RSS bytes[, also()]) every `interval`; then (the samples, its
    exit code, its peak RSS in bytes)."""
    samples: list[tuple] = []
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        rss = vm_rss(proc.pid)
        if rss:
            at = round(time.perf_counter() - t0, digits)
            samples.append((at, rss) if also is None else (at, rss, also()))
        time.sleep(interval)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return samples, proc.returncode, usage.ru_maxrss * 1024
