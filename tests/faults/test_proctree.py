"""The cleanup the multi-process fault tests rely on (proctree.py): a launcher whose child runs in a session of
its own, as torchrun's ranks do, holding the launcher's output. Killing the launcher's process group leaves
that child running; the recorded tree leaves nothing, and a hung run is stopped at its timeout, not when
the child lets go of the output."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import proctree
import psutil

# a launcher that starts a "rank" in a session of its own (writing to the launcher's output), which starts a
# helper in its group; each writes its pid to PIDS and sleeps
SCRIPT = """
import os, subprocess, sys, time
role, pids = sys.argv[1], sys.argv[2]
if role != "helper":
    subprocess.Popen([sys.executable, __file__, "rank" if role == "launcher" else "helper", pids],
                     start_new_session=role == "launcher")
with open(pids, "a") as f:
    f.write(f"{os.getpid()}\\n")
time.sleep(300)
"""


def _launcher(tmp_path) -> list[str]:
    script = tmp_path / "tree.py"
    script.write_text(SCRIPT)
    return [sys.executable, str(script), "launcher", str(tmp_path / "pids")]


def _alive(pids) -> list[int]:
    """Those of the pids written that still run this test's sleep."""
    out = []
    for pid in map(int, pids.read_text().split()):
        try:
            p = psutil.Process(pid)
            if proctree.alive(p) and str(pids) in p.cmdline():
                out.append(pid)
        except psutil.Error:
            pass
    return out


def _wait(pids, n: int) -> None:
    deadline = time.monotonic() + 30
    while not (pids.exists() and len(pids.read_text().split()) >= n):
        assert time.monotonic() < deadline, "the processes did not start"
        time.sleep(0.05)


def test_a_hung_run_is_stopped_at_its_timeout_with_every_process(tmp_path):
    pids, t0 = tmp_path / "pids", time.monotonic()
    code, _ = proctree.run(_launcher(tmp_path), tmp_path / "log", dict(os.environ), timeout=4)
    assert code is None and time.monotonic() - t0 < 15
    _wait(pids, 3)
    time.sleep(0.5)
    assert len(pids.read_text().split()) == 3 and not _alive(pids)


def test_kill_reaches_what_the_launchers_group_does_not(tmp_path):
    with (tmp_path / "log").open("w") as f:
        tree = proctree.Tree(subprocess.Popen(_launcher(tmp_path), stdout=f, start_new_session=True))
    pids = tmp_path / "pids"
    try:
        _wait(pids, 3)
        tree.record()
        os.killpg(tree.launcher.pid, signal.SIGKILL)  # what the tests did: the launcher goes, its child's session stays
        tree.launcher.wait()
        time.sleep(0.5)
        assert len(_alive(pids)) == 2
        tree.kill()
        time.sleep(0.5)
        assert not _alive(pids)
    finally:
        tree.kill()
