"""Fail points: named places in the code where the reliability suite (tests/faults/, benchmarks/faults.py,
docs/reliability.md) makes a real fault happen at an exact, reproducible moment, as the fault-injection
hooks of SQLite's and FoundationDB's test suites do. Nothing happens unless the environment variable
PREFALIGN_FAULTS names the point; a run without it pays one dictionary lookup per point.

    PREFALIGN_FAULTS="kill@checkpoint.write#2"    SIGKILL this process the 2nd time it reaches the point
    PREFALIGN_FAULTS="nan@loss#3+"                 the value poisoned with NaN at the 3rd hit and every later one
    PREFALIGN_FAULTS="inf@reward#1,kill@step#5"    several rules, comma-separated
    PREFALIGN_FAULTS="kill@step#4@rank1"           only on the process of that rank (RANK)

Actions: `kill` (SIGKILL: no handler, no cleanup, as a power cut or the OOM killer), `nan` and `inf`
(`poison` multiplies a tensor by them, keeping its autograd graph, so a poisoned loss also
poisons the gradients), `oom` (MemoryError, as an allocator that cannot serve the request), `nospace` (OSError
ENOSPC, for a write the real small filesystem of a test cannot aim at). Hits are counted per process
and per point, from 1. The points' names are listed in docs/reliability.md.

With rules set, PREFALIGN_FAULTS_TRACE=FILE appends a line `POINT#N rankR` to FILE at every hit of every
point, before the point acts: a test's proof that a process got somewhere (rank 0 started a KL
measurement) before something stopped it.
"""

from __future__ import annotations

import errno
import os
import signal
from dataclasses import dataclass

ENV = "PREFALIGN_FAULTS"
TRACE = "PREFALIGN_FAULTS_TRACE"
ACTIONS = ("kill", "nan", "inf", "oom", "nospace")


@dataclass(frozen=True)
class Rule:
    action: str
    point: str
    first: int  # the hit it fires at (1-based)
    onward: bool  # and every hit after it
    rank: int | None


def parse(spec: str) -> list[Rule]:
    """The rules of a PREFALIGN_FAULTS value; a malformed one is an error, never silently no fault."""
    rules = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        try:
            action, rest = part.split("@", 1)
            rank = None
            if "@rank" in rest:
                rest, r = rest.rsplit("@rank", 1)
                rank = int(r)
            point, _, hit = rest.partition("#")
            onward = hit.endswith("+")
            first = int(hit.rstrip("+") or 1)
        except ValueError as e:
            raise ValueError(f"{ENV}: cannot read {part!r} (ACTION@POINT[#N[+]][@rankR])") from e
        if action not in ACTIONS or not point or first < 1:
            raise ValueError(f"{ENV}: {part!r}: the action is one of {', '.join(ACTIONS)}, then @POINT and #N >= 1")
        rules.append(Rule(action, point, first, onward, rank))
    return rules


_parsed: tuple[str, list[Rule]] = ("", [])
_hits: dict[str, int] = {}


def _rules() -> list[Rule]:
    global _parsed
    spec = os.environ.get(ENV, "")
    if spec != _parsed[0]:  # read again when a test changes it in-process; counts start over
        _parsed = (spec, parse(spec))
        _hits.clear()
    return _parsed[1]


def reset() -> None:
    """Count hits from 1 again and reread PREFALIGN_FAULTS: for a test that sets the same rule as the
    test before it in the same process (the same value is not a change, so the counts would go on)."""
    global _parsed
    _parsed = ("", [])
    _hits.clear()


def _fires(name: str) -> str | None:
    """The action of the first rule that fires at this hit of `name` (counted whether or not one does)."""
    rules = _rules()
    if not rules:
        return None
    _hits[name] = n = _hits.get(name, 0) + 1
    rank = int(os.environ.get("RANK", "0"))
    if trace := os.environ.get(TRACE):
        with open(trace, "a", encoding="utf-8") as f:  # closed (in the kernel's hands) before any kill below
            f.write(f"{name}#{n} rank{rank}\n")
    for r in rules:
        if r.point == name and (r.rank is None or r.rank == rank) and (n == r.first or (r.onward and n > r.first)):
            return r.action
    return None


def point(name: str, path: object = None) -> None:
    """A place where a process can die, run out of memory or of disk. `path`: the file being written
    there, named by a nospace fault's error as a real ENOSPC would be."""
    action = _fires(name)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "oom":
        raise MemoryError(f"fault injected at {name} ({ENV})")
    elif action == "nospace":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path) if path is not None else None)


def poison(name: str, value):
    """`value` (a tensor or a float) with NaN or Inf added when a rule fires here; else `value` itself.
    A kill, oom or nospace rule on this name acts as at `point`."""
    action = _fires(name)
    if action in ("nan", "inf"):
        # times, not plus: d(v * nan)/dv is NaN, so a poisoned loss poisons the gradients too
        return value * (float("nan") if action == "nan" else float("inf"))
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "oom":
        raise MemoryError(f"fault injected at {name} ({ENV})")
    return value


def poison_grads(name: str, params) -> None:
    """The first parameter with a gradient gets NaN/Inf in it when a rule fires here (a gradient
    poisoned after backward, as a numerical overflow in one kernel would leave it)."""
    action = _fires(name)
    if action not in ("nan", "inf"):
        return
    for p in params:
        if p.grad is not None:
            p.grad.view(-1)[0] = float("nan") if action == "nan" else float("inf")
            return
