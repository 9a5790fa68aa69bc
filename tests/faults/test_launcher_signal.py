"""The launcher of a 2-process run (`prefalign train --nproc 2`) is stopped from outside: SIGTERM (`kill`, a
job scheduler ending the job), SIGINT (Ctrl-C, sent to the terminal's foreground process group) or SIGKILL.
torchrun starts each rank in a session of its own, so no signal to the launcher or its group reaches the
ranks: the launcher passes SIGTERM, SIGINT and SIGHUP on to torchrun, which stops the ranks, and torchrun is
told to die with the launcher (PR_SET_PDEATHSIG) when the launcher is killed outright. Every process of the
run must be gone within the bound (docs/reliability.md), none left training unobserved. The real CLI, gloo."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from faultkit import FULL, tally
from proctree import STOP_BOUND_S, Tree

from prefalign.faults import ENV

KIND = "launcher stopped (2 processes)"
# the signal, and when: "started" as soon as both ranks exist (the cheapest: make test), "training" once
# steps are being logged
CASES = [("SIGTERM", "started"), ("SIGTERM", "training"), ("SIGINT", "training"), ("SIGKILL", "training")]


def _rank(p) -> int | None:
    try:
        env = p.environ()
    except Exception:  # ended, or not ours to read
        return None
    return int(env["RANK"]) if "LOCAL_RANK" in env else None


def _describe(p) -> str:
    try:
        return f"{p.pid} {' '.join(p.cmdline()[-4:])}"
    except Exception:  # it ended meanwhile
        return str(p.pid)


def _started(tree: Tree, out, moment: str) -> bool:
    ranks = {r for p in tree.record() if (r := _rank(p)) is not None}
    if moment == "started":
        return ranks == {0, 1}
    metrics = out / "metrics.jsonl"
    return metrics.exists() and len(metrics.read_text().splitlines()) >= 2


@pytest.mark.parametrize(("name", "moment"), CASES if FULL else CASES[:1], ids=lambda x: x)
def test_a_stopped_launcher_stops_every_process(name, moment, tiny_models, pair_file, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "prefalign", "train", "--method", "dpo", "--model", str(tiny_models["llama"]),
           "--data", str(pair_file), "-o", str(out), "--no-progress", "max_steps=100000", "batch_size=4",
           "save_every=0", "eval_every=0", "kl_every=0", "report_to=none", "--nproc", "2"]
    env = {**{k: v for k, v in os.environ.items() if k != ENV}, "OMP_NUM_THREADS": "1"}
    sig = getattr(signal, name)
    log = tmp_path / "launcher.log"
    with log.open("w") as f:  # its own process group, as a shell gives a command it runs
        tree = Tree(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True))
    try:
        deadline = time.monotonic() + 240
        while not _started(tree, out, moment):
            assert tree.launcher.poll() is None, f"the run ended before the signal: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "the run did not start in 240 s"
            time.sleep(0.05)
        ranks = {r for p in tree.seen.values() if (r := _rank(p)) is not None}
        sent = time.monotonic()
        # Ctrl-C reaches every process of the terminal's foreground group; `kill` only the one named
        (os.killpg if sig == signal.SIGINT else os.kill)(tree.launcher.pid, sig)
        while (tree.launcher.poll() is None or tree.left()) and time.monotonic() - sent < STOP_BOUND_S:
            time.sleep(0.05)
        stop_s = time.monotonic() - sent
        left = [_describe(p) for p in tree.left()]
        code = tree.launcher.poll()
    finally:
        tree.kill()  # whatever is left: the test has failed then, and must not leave a run training
    text = log.read_text()
    problems = [] if ranks == {0, 1} else [f"saw ranks {sorted(ranks)} before the signal, not both"]
    problems += [f"left running {STOP_BOUND_S} s after {name}: {p}" for p in left]
    if code is None:
        problems.append(f"the launcher had not exited {STOP_BOUND_S} s after {name}")
    elif sig != signal.SIGKILL:  # the stop is reported as one, with the shell's code for it
        problems += [] if code == 128 + sig else [f"the launcher exited {code}, not {128 + sig}"]
        problems += [] if f"stopped by {name}" in text else [f"no 'stopped by {name}' in: {text[-1500:]}"]
    tally(KIND, survived=not problems, detail=f"launcher-{name}-{moment}: stopped in {stop_s:.2f} s")
    print(f"{name} while {moment}: stopped {stop_s:.2f} s after the signal")
    assert not problems, "\n".join(problems)
