"""What every fault test shares: the tally benchmarks/faults.py turns into the README's reliability table,
and the split between `make test` (a seeded sample of each matrix) and `make faults` (all of it).

A test records every fault it injects with `tally(kind, survived, lost)` once its checks have decided, in
a `finally` so that a failure is counted in the table too: `survived` when the tool did what
docs/reliability.md promises (a clear error, or a resume equal to an uninterrupted run), `lost` the
records, steps or files lost or taken for good when they were not (must be 0)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

TALLY_ENV = "PREFALIGN_FAULT_TALLY"  # a JSONL file: one line per injected fault (benchmarks/faults.py sets it)
FULL = os.environ.get("PREFALIGN_FAULTS_FULL") == "1"  # make faults: every case of every matrix


def sample(cases: list, k: int, seed: int = 0) -> list:
    """All `cases` under `make faults`; a seeded sample of `k` of them under `make test`."""
    if FULL or k >= len(cases):
        return list(cases)
    return random.Random(seed).sample(list(cases), k)


def tally(kind: str, survived: bool, lost: int = 0, test: str = "", detail: str = "", count: int = 1) -> None:
    """`count` injected faults of `kind` (the table's row: kill, disk full, corrupt checkpoint, ...), all
    with this outcome (a property test's examples are recorded once, with their number)."""
    path = os.environ.get(TALLY_ENV)
    if not path:
        return
    row = {"kind": kind, "count": int(count), "survived": bool(survived), "lost": int(lost),
           "test": test or os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0], "detail": detail}
    with Path(path).open("a", encoding="utf-8") as f:  # one short append per line: whole under xdist
        f.write(json.dumps(row) + "\n")
