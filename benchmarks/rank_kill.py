"""How fast a 2-process run stops when one of its processes dies: every case of tests/faults/test_rank_kill.py
(a rank SIGKILLed at a fail point or from outside, DDP and FSDP2, gloo on this CPU), with the time from the
death of the rank to the exit of `prefalign train --nproc 2`, as the test measures it (every process watched
50 ms apart), and whether the case held (stopped, named the checkpoint, left nothing, the other rank ended
by torchrun's SIGTERM, resumed exactly); and every case of tests/faults/test_launcher_signal.py (the
launcher itself sent SIGTERM, SIGINT or SIGKILL: the time from the signal until every process is gone).

    python benchmarks/rank_kill.py [--out benchmarks/results/rank-kill-cpu-2core]

The load average before the run is recorded: the stop time is mostly process teardown, so a busy
machine lengthens it. Writes OUT.json (every tally row) and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "faults"))
from proctree import STOP_BOUND_S  # noqa: E402  (the bound the tests check, from where they read it)

TESTS = ["tests/faults/test_rank_kill.py", "tests/faults/test_launcher_signal.py"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/rank-kill-cpu-2core"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tally = Path(tmp) / "tally.jsonl"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS]
        env = {**os.environ, "PREFALIGN_FAULTS_FULL": "1", "PREFALIGN_FAULT_TALLY": str(tally)}
        load, t0 = os.getloadavg(), time.time()
        run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        rows = [json.loads(x) for x in tally.read_text().splitlines()] if tally.exists() else []
    for r in rows:
        m = re.match(r"(\S+): stopped in ([0-9.]+|nan) s", r["detail"])
        r["case"], r["stop_s"] = (m.group(1), float(m.group(2))) if m else (r["detail"], None)
    result = {"command": f"PREFALIGN_FAULTS_FULL=1 python -m pytest -q {' '.join(TESTS)}", "bound_s": STOP_BOUND_S,
              "pytest_exit": run.returncode,
              "load_average_before": load, "load_average_after": os.getloadavg(), "wall_s": round(time.time() - t0, 1),
              "cpus": os.cpu_count(),
              "machine": platform.machine(), "python": platform.python_version(), "cases": rows,
              **({"pytest_tail": run.stdout[-6000:]} if run.returncode else {})}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# A rank of a 2-process run killed, or its launcher stopped: time to stop ({os.cpu_count()} CPUs)", "",
             f"`python benchmarks/rank_kill.py` ran `{result['command']}` (pytest exit {run.returncode}, "
             f"{result['wall_s']} s; load average before: {', '.join(f'{x:.1f}' for x in load)}; after: "
             f"{', '.join(f'{x:.1f}' for x in result['load_average_after'])}).", "",
             "| case | stopped after the death, or the launcher's signal (s) | held |", "|---|---|---|"]
    lines += [f"| `{r['case']}` | {r['stop_s']:.2f} | {'yes' if r['survived'] else 'NO'} |" for r in rows]
    for what, group in (("a rank killed", [r for r in rows if not r["case"].startswith("launcher-")]),
                        ("the launcher stopped", [r for r in rows if r["case"].startswith("launcher-")])):
        times = sorted(r["stop_s"] for r in group if r["stop_s"] is not None)
        if times:
            lines += ["", f"{what}: {len(group)} cases; stop time min {times[0]:.2f} s, median "
                      f"{times[len(times) // 2]:.2f} s, max {times[-1]:.2f} s; the tests' bound is {STOP_BOUND_S} s."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    sys.exit(run.returncode)


if __name__ == "__main__":
    main()
