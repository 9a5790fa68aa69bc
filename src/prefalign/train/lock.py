"""One run per output folder: `RUN/run.lock` holds the owner's PID, host and start time while a run
trains there. A second run pointed at the folder is refused, naming the owner; a lock left by a process
that no longer runs on this host (killed: SIGKILL, OOM, power) is taken over with a warning, so a killed
run resumes as before. A lock from another host is never guessed dead: the error says how to clear it.
Under several processes rank 0 holds it for all."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

from ..errors import ConfigError
from ..storage import make_dirs

LOCK = "run.lock"


def _owner(path: Path) -> dict | None:
    try:
        owner = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}  # half-written by a process killed while writing it: no live owner to respect
    return owner if isinstance(owner, dict) else {}


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@contextmanager
def run_lock(out: Path, log: Callable[[str], None] = print, main: bool = True) -> Iterator[None]:
    """Hold OUT/run.lock for the body (only when `main`: rank 0, or the one process)."""
    if not main:
        yield
        return
    make_dirs(out)  # a new run folder's entry fsynced: a power cut must not lose it with its checkpoints
    path, host = out / LOCK, socket.gethostname()
    me = {"pid": os.getpid(), "host": host, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            owner = _owner(path)
            if owner is None:
                continue  # released between our two looks: try again
            if owner.get("host", host) != host:
                raise ConfigError(f"{out} is in use by a run on host {owner['host']} (PID {owner.get('pid')}, since "
                                  f"{owner.get('started')}); if that run is gone, delete {path}") from None
            if _alive(owner.get("pid")) and owner.get("pid") != os.getpid():
                raise ConfigError(f"{out} is in use by PID {owner['pid']} on {host} (since {owner.get('started')}): "
                                  "wait for it to end (then resume: true goes on from its checkpoint), or train "
                                  "into another output") from None
            log(f"warning: {path} was left by PID {owner.get('pid')}, which no longer runs: taking it over")
            path.unlink(missing_ok=True)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(me))
    try:
        yield
    finally:
        if _owner(path) == me:
            path.unlink(missing_ok=True)
