"""One process of a 2-process run dies (SIGKILL: the OOM killer, a lost node), at a fail point of one
rank or from outside: torchrun stops the other within seconds instead of leaving it blocked in a
collective until the process group's 30-minute timeout, the command exits non-zero naming the newest
committed checkpoint, no process is left behind, and `resume=true` on 2 processes and on 1 logs the
losses, evaluations and final/ weights of a run never interrupted. Every run is the real CLI
(`prefalign train --nproc 2`: torchrun, gloo on this CPU)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import proctree
import psutil
import pytest
from faultkit import FULL, sample, tally
from proctree import STOP_BOUND_S, Tree, alive
from safetensors.torch import load_file

from conftest import held_out_pairs, learnable_pairs, write_jsonl
from prefalign.faults import ENV, TRACE
from prefalign.train.checkpoint import list_checkpoints

KIND = "rank killed (2 processes)"
# a run of these that has not ended by then is hung, and is killed with every process it started: the slowest
# (the kl case's 2-process runs) took 50 to 72 s each at a load average of 13 on this 2-core machine
RUN_TIMEOUT_S = 180
# by the fewer processes of the two runs compared: a resume on 2 processes is bit-for-bit the uninterrupted
# 2-process run (the same sums in the same order); one process sums each micro-batch's examples in one pass
# where two each took half, then averaged: the last bit differs (log-prob sums of about 30 by one float32
# ulp, 1.9e-6). Relative to the value, at least 1. Across process counts the KL monitor's values are not
# compared: sums over completions sampled from weights that differ in their last bit (800 tokens: 5.7e-6
# relative; a token drawn otherwise would change them outright); on 2 processes they are, exactly.
TOLERANCE = {2: 0.0, 1: 1e-6}
SAMPLED = "kl/"
# RL on one process samples other completions (each process seeds its draws from (seed, rollout, rank),
# docs/scaling.md): a 1-process resume is checked to complete every step and write final/, not for values
RL_TOLERANCE = {2: 0.0, 1: None}
# 6 steps of 2 micro-batches, a checkpoint every 2 (the newest 2 kept), an evaluation every 2 (and step
# 0's baseline), the reference precomputed by the two ranks in halves
BASE = ("max_steps=6", "save_every=2", "batch_size=4", "grad_accum=2", "learning_rate=1e-3", "lr_schedule=constant",
        "seed=3", "reference=precompute", "eval_every=2", "kl_every=0")
# the KL monitor at steps 3 and 6, made slow (2 to 4 s a measurement on this 2-core machine, 0.15 s with the
# default 32 tokens) so that torchrun's SIGTERM (its monitor looks every 0.1 s) surely lands inside it
KL_STEP = 3
SLOW_KL = (f"kl_every={KL_STEP}", "kl_max_new_tokens=800")
# GRPO: 4 rollouts of 4 prompts, a checkpoint every 2
RL = ("max_steps=4", "save_every=2", "batch_size=4", "max_new_tokens=8", "kl_every=0", "lr_schedule=constant", "seed=3")
# make faults compares resumes on 2 processes and on 1 with an uninterrupted 2-process run; make test a resume
# on 1 with an uninterrupted 1-process run (the cheapest runs: the suite's slowest tests are these)
RESUME_ON, REFERENCE = ((2, 1), 2) if FULL else ((1,), 1)
# the only keys that may differ: wall times, rates and shares of the step's time (docs/metrics.md), memory
TIMING = ("step_seconds", "tokens_per_s", "peak_memory_bytes", "ppo/rollout_seconds", "ppo/update_seconds",
          "ppo/generation_tokens_per_s", "ppo/rollout_share", "ppo/generation_share")


@dataclass(frozen=True)
class Case:
    rank: int
    moment: str  # POINT#N: the fail point (prefalign/faults.py) and the hit it dies at; "outside": the test kills it
    newest: int | None  # the checkpoint the launcher must name: 0 for none; None: whichever is newest (outside)
    strategy: str = "ddp"
    extra: tuple[str, ...] = field(default=())
    method: str = "dpo"

    @property
    def id(self) -> str:
        rl = f"{self.method}-" if self.method != "dpo" else ""
        return f"{rl}{self.strategy}-rank{self.rank}-{self.moment}" + ("-kl" if self.extra else "")


CASES = [
    Case(1, "step#5", 4),  # before step 5
    Case(0, "step#4", 2),
    Case(1, "backward#7", 2),  # step 4's first micro-batch
    Case(0, "backward#10", 4),  # step 5's second
    Case(0, "checkpoint.write#2", 2),  # saving step 4: step-4.tmp half-written (only rank 0 writes whole ones)
    Case(0, "checkpoint.commit#3", 4),  # step 6's (the last) written, not yet renamed
    Case(1, "eval#5", 2),  # step 4's evaluation, its first batch (of 2; #1 and #2 are step 0's baseline)
    Case(0, "eval#8", 4),  # step 6's, the last batch
    Case(1, "reference.precompute#2", 0),  # before any step: nothing to resume, resume=true starts over
    Case(0, "reference.precompute#3", 0),
    Case(0, "metrics.write#5", 2),  # step 4's row (#1 is step 0's evaluation); only rank 0 writes
    Case(0, "final.write#1", 6),  # every step done and checkpointed, final/ not written
    Case(1, "outside", None),
    Case(0, "outside", None),
    # rank 1 dies as rank 0 starts measuring the KL (rank 1 would wait for it in the next collective)
    Case(1, f"kl.monitor#{KL_STEP}", 2, extra=SLOW_KL),
    Case(1, "step#4", 2, "fsdp"),  # sharded checkpoints: every rank writes its own shards
    Case(0, "checkpoint.commit#2", 2, "fsdp"),  # both ranks' step-4 shards written, not committed
    Case(1, "rollout#3", 2, method="grpo"),  # the 3rd rollout's sampling
]


def _command(out: Path, files: dict, case: Case, *more: str, nproc: int = 2) -> list[str]:
    cmd = [sys.executable, "-m", "prefalign", "train", "--method", case.method, "--model", str(files["model"]),
           "-o", str(out), "--no-progress", f"distributed={case.strategy}"]
    if case.method == "dpo":
        cmd += ["--data", str(files["pairs"]), *BASE, f"eval_data={files['eval']}"]
    else:
        cmd += ["--prompts", str(files["prompts"]), "--reward", "prefalign.judges.sentiment:positive", *RL]
    # last: a later key=value overrides an earlier one (the case's kl_every, BASE's)
    return cmd + [*case.extra, *more] + (["--nproc", str(nproc)] if nproc > 1 else [])


def _env(**more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (ENV, TRACE)}
    return {**env, "OMP_NUM_THREADS": "1", **more}


def _rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _differences(run: Path, whole: Path, tol: float | None) -> list[tuple[int | None, str]]:
    """What differs (by more than `tol` times the value, at least 1) between the metrics and final/ of
    `run` and those of the uninterrupted `whole`: (the step, or None for final/; what). `tol` None: only
    which steps are logged and that final/ is written."""
    got, want = _rows(run), _rows(whole)
    if [r["step"] for r in got] != [r["step"] for r in want]:  # a step lost, or logged twice
        steps = {r["step"] for r in got} ^ {r["step"] for r in want} or {r["step"] for r in want}
        return [(s, f"steps logged {[r['step'] for r in got]}, not {[r['step'] for r in want]}") for s in steps]
    if tol is None:
        return [] if (run / "final" / "model.safetensors").exists() else [(None, "no final/model.safetensors")]
    out = []
    for a, b in zip(got, want, strict=True):
        for k in sorted(k for k in (set(a) | set(b)) - set(TIMING) if not (tol and k.startswith(SAMPLED))):
            x, y = a.get(k), b.get(k)
            if not (isinstance(x, (int, float)) and isinstance(y, (int, float)) and abs(x - y) <= tol * max(1, abs(y))):
                out.append((b["step"], f"step {b['step']} {k}: {x} vs {y}"))
    if not (run / "final" / "model.safetensors").exists():
        return [*out, (None, "no final/model.safetensors")]
    wa, wb = (load_file(str(d / "final" / "model.safetensors")) for d in (run, whole))
    for k in sorted(set(wa) | set(wb)):
        d = float((wa[k] - wb[k]).abs().max()) if k in wa and k in wb else float("inf")
        if d > tol * max(1.0, float(wb[k].abs().max()) if k in wb else 1.0):
            out.append((None, f"final/{k}: differs by {d:.3g}"))
    return out


def _rank_of(p: psutil.Process) -> int | None:
    try:
        env = p.environ()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    return int(env["RANK"]) if "LOCAL_RANK" in env and "RANK" in env else None


@dataclass
class Stopped:
    code: int | None  # None: it had not stopped after RUN_TIMEOUT_S, and was killed
    text: str
    stop_s: float  # from the first rank seen dead to the launcher's exit
    left: list[str]  # processes of the run still alive after the launcher exited


def _run_and_kill(cmd: list[str], out: Path, env: dict[str, str], outside: int | None) -> Stopped:
    """Run the launcher, watching every process under it (50 ms apart); `outside`: SIGKILL that rank
    once a checkpoint is committed. A run that neither ends nor stops in RUN_TIMEOUT_S is killed (every
    process recorded under it) and reported as stopping in infinite time."""
    log = out.parent / f"{out.name}.log"
    with log.open("w") as f:
        tree = Tree(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True))
    ranks: dict[int, psutil.Process] = {}  # rank -> its process, as soon as it has started
    died, deadline = None, time.monotonic() + RUN_TIMEOUT_S
    try:
        while tree.launcher.poll() is None and time.monotonic() < deadline:
            for p in tree.record():
                if p not in ranks.values() and (r := _rank_of(p)) is not None:
                    ranks.setdefault(r, p)
            if outside is not None and outside in ranks and list_checkpoints(out):
                with contextlib.suppress(psutil.NoSuchProcess):
                    ranks[outside].kill()
                outside = None
            if died is None and any(not alive(p) for p in ranks.values()):
                died = time.monotonic()
            time.sleep(0.05)
    finally:
        hung = tree.launcher.poll() is None
        exited = float("inf") if hung else time.monotonic()
        left = [_describe(p) for p in tree.left()]
        if hung or left:  # end what this test started; the test then fails on it
            tree.kill()
    return Stopped(tree.launcher.returncode if not hung else None, log.read_text(),
                   exited - died if died else float("nan"), left)


def _describe(p: psutil.Process) -> str:
    try:
        return f"{p.pid} {' '.join(p.cmdline()[-6:])}"
    except psutil.Error:
        return str(p.pid)


def _stop_problems(case: Case, stopped: Stopped, out: Path, newest: int) -> list[str]:
    """How the stop broke its promises (docs/reliability.md): none when it kept them."""
    named = (f"the newest checkpoint is {out / 'checkpoints' / f'step-{newest}'}: resume with resume=true" if newest
             else "no checkpoint was saved yet (the first is due at step 2): resume=true starts over")
    problems = [] if stopped.code != 0 else ["the launcher exited 0"]
    problems += [] if stopped.stop_s < STOP_BOUND_S else [f"stopped {stopped.stop_s:.1f} s after the death, over "
                                                          f"the bound of {STOP_BOUND_S} s"]
    problems += [] if named in stopped.text else [f"the message does not say {named!r}: {stopped.text[-1500:]}"]
    problems += [f"left behind: {p}" for p in stopped.left]
    if case.newest is not None and newest != case.newest:
        problems.append(f"newest checkpoint step-{newest}, expected step-{case.newest}")
    # how each rank ended, by torchrun's failure summary: the killed one by SIGKILL, the other by torchrun's
    # SIGTERM (not by an error of its own, nor by the SIGKILL torchrun sends 30 s after a SIGTERM ignored)
    ends = _ends(stopped.text)
    for rank in range(2):
        want = -signal.SIGKILL if rank == case.rank else -signal.SIGTERM
        if ends.get(rank) != want:
            problems.append(f"rank {rank} ended with exit code {ends.get(rank)} in torchrun's summary, not {want}")
    if case.extra:  # stopped inside the measurement: it had started it, and not finished it
        if "kl.measure#1 rank0" not in _hits(out):
            problems.append(f"rank 0 never started step {KL_STEP}'s KL measurement (no kl.measure#1 hit)")
        if KL_STEP in [r["step"] for r in _rows(out)]:
            problems.append(f"rank 0 finished step {KL_STEP}'s KL measurement, which it was to be stopped in")
    return problems


def _ends(text: str) -> dict[int, int]:
    """rank -> its exit code, from the failure summary torchrun prints (`rank : 0 (local_rank: 0)`, then
    `exitcode : -15 (pid: ...)`; a signal's is minus its number)."""
    found = re.findall(r"^\s*rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)", text, re.M)
    return {int(r): int(c) for r, c in found}


def _hits(out: Path) -> list[str]:
    """The fail points the killed run's processes reached (PREFALIGN_FAULTS_TRACE), in order."""
    path = out.parent / "hits.txt"
    return path.read_text().splitlines() if path.exists() else []


def _resume_problems(case: Case, out: Path, whole: Path, files: dict, newest: int) -> tuple[list[str], set]:
    """resume=true on each of RESUME_ON process counts, each from its own copy of the killed run's folder:
    what went wrong, and the steps (None: final/) it lost or logged otherwise than the run never interrupted."""
    problems, lost = [], set()
    for nproc in RESUME_ON:
        run = shutil.copytree(out, out.parent / f"resumed-on-{nproc}")
        code, text = proctree.run(_command(run, files, case, "resume=true", nproc=nproc),
                                  out.parent / f"resumed-on-{nproc}.log", _env(), RUN_TIMEOUT_S)
        if code is None:
            code = f"nothing: it did not end in {RUN_TIMEOUT_S} s"
        if code != 0:
            problems.append(f"resume on {nproc} exited {code}: {text[-1500:]}")
        resumed = f"resumed from checkpoints/step-{newest}"
        if (resumed in text) != bool(newest):
            problems.append(f"on {nproc}: {resumed!r} {'not ' * bool(newest)}in its log")
        tol = (TOLERANCE if case.method == "dpo" else RL_TOLERANCE)[min(nproc, REFERENCE)]
        try:
            differ = _differences(run, whole, tol)
        except (ValueError, OSError) as e:  # a metrics.jsonl or final/ that cannot be read: lost
            differ = [(None, f"unreadable: {e!r}")]
        lost |= {step for step, _ in differ}
        problems += [f"resumed on {nproc}: {what}" for _, what in differ]
    return problems, lost


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_models, pair_file) -> dict:
    folder = tmp_path_factory.mktemp("data")
    prompts = [{"prompt": f"I watched film {i} and"} for i in range(16)]
    return {"model": tiny_models["llama"], "pairs": pair_file, "prompts": write_jsonl(folder / "rl.jsonl", prompts),
            "eval": write_jsonl(folder / "eval.jsonl", held_out_pairs(learnable_pairs(), 8))}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, files):
    """The uninterrupted run (on REFERENCE processes) each case is compared with, one per method, strategy
    and extra keys."""
    made: dict[tuple, Path] = {}

    def run(case: Case) -> Path:
        key = (case.method, case.strategy, case.extra)
        if key not in made:
            out = tmp_path_factory.mktemp("whole") / "run"
            code, text = proctree.run(_command(out, files, case, nproc=REFERENCE), out.parent / "run.log", _env(),
                                      RUN_TIMEOUT_S)
            assert code == 0, text[-6000:]
            made[key] = out
        return made[key]
    return run


@pytest.mark.parametrize("case", sample(CASES, 1), ids=lambda c: c.id)
def test_a_killed_rank_stops_the_run_and_resumes_exactly(case: Case, files, uninterrupted, tmp_path):
    whole = uninterrupted(case)
    out = tmp_path / "run"
    fault = {} if case.moment == "outside" else {ENV: f"kill@{case.moment}@rank{case.rank}",
                                                 TRACE: str(out.parent / "hits.txt")}
    stopped = _run_and_kill(_command(out, files, case), out, _env(**fault),
                            case.rank if case.moment == "outside" else None)
    newest = max(list_checkpoints(out), default=0)
    problems = _stop_problems(case, stopped, out, newest)
    more, lost = _resume_problems(case, out, whole, files, newest)
    problems += more
    tally(KIND, survived=not problems, lost=len(lost), detail=f"{case.id}: stopped in {stopped.stop_s:.2f} s")
    print(f"{case.id}: stopped {stopped.stop_s:.2f} s after the death")
    assert not problems, "\n".join(problems)
