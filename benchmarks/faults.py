"""The reliability table: run the fault-injection suite (tests/faults/) and count, per fault kind, the
faults injected, the ones the tool survived (a clear error, or a resume equal to an uninterrupted run)
and what was lost (must be 0). `make faults` runs it over every case of every matrix; the figures go to
benchmarks/results/faults-cpu-2core.{md,json}, the README's table and docs/reliability.md.

    python benchmarks/faults.py              # every case (PREFALIGN_FAULTS_FULL=1)
    python benchmarks/faults.py --sample     # the seeded sample `make test` runs (a quick look; not for the README)

Each test records what it injects through tests/faults/faultkit.py `tally` before it asserts, so a
failing case is in the counts too; the script exits non-zero when pytest fails or anything was lost.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "faults-cpu-2core"
# the table's rows, in this order; a kind a test records that is not here is appended after them
KINDS = ["kill (SIGKILL)", "rank killed (2 processes)", "launcher stopped (2 processes)", "disk full",
         "corrupt checkpoint", "corrupt reference cache", "read error (EIO)", "out of memory", "NaN/Inf injected",
         "fuzzed data file", "fuzzed config", "tokenizer edge case", "malformed HTTP request", "injection attempt"]
BEGIN, END = "<!-- faults:begin -->", "<!-- faults:end -->"


def aggregate(rows: list[dict]) -> list[dict]:
    """Per kind: injected (sum of counts), survived, lost, and the tests that recorded it."""
    by: dict[str, dict] = {}
    for r in rows:
        k = by.setdefault(r["kind"], {"kind": r["kind"], "injected": 0, "survived": 0, "lost": 0, "tests": set()})
        n = int(r.get("count", 1))
        k["injected"] += n
        k["survived"] += n if r["survived"] else 0
        k["lost"] += int(r["lost"])
        k["tests"].add(r["test"].split("::")[0])
    order = KINDS + sorted(set(by) - set(KINDS))
    return [{**by[k], "tests": sorted(by[k]["tests"])} for k in order if k in by]


def table(kinds: list[dict], command: str, when: str) -> str:
    lines = ["| fault | injected | survived | lost |", "|---|---:|---:|---:|"]
    lines += [f"| {k['kind']} | {k['injected']} | {k['survived']} | {k['lost']} |" for k in kinds]
    total = {f: sum(k[f] for k in kinds) for f in ("injected", "survived", "lost")}
    lines.append(f"| **all** | **{total['injected']}** | **{total['survived']}** | **{total['lost']}** |")
    return "\n".join(lines) + f"\n\n`{command}` on {when} ([results](benchmarks/results/faults-cpu-2core.md))."


def splice(path: Path, text: str, link_prefix: str = "") -> None:
    """Replace what is between the markers in `path` (README, docs/reliability.md) with `text`."""
    body = path.read_text()
    if BEGIN not in body:
        raise SystemExit(f"{path}: no {BEGIN} ... {END} markers for the table")
    text = text.replace("](benchmarks/", f"]({link_prefix}benchmarks/")
    new = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: f"{BEGIN}\n{text}\n{END}", body, flags=re.S)
    path.write_text(new)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sample", action="store_true", help="only the seeded sample make test runs (no README update)")
    ap.add_argument("--workers", default="2", help="pytest-xdist processes (default 2: the 2-core machine)")
    args = ap.parse_args()
    command = "make faults" if not args.sample else "python benchmarks/faults.py --sample"
    with tempfile.TemporaryDirectory() as tmp:
        tally = Path(tmp) / "tally.jsonl"
        env = {**os.environ, "PREFALIGN_FAULT_TALLY": str(tally), "HF_HUB_OFFLINE": "1"}
        if not args.sample:
            env["PREFALIGN_FAULTS_FULL"] = "1"
        pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/faults",
                  # the table's own check reads what this run writes
                  "--ignore", "tests/faults/test_table.py", "-n", args.workers, "--dist", "loadfile"]
        t0 = time.time()
        proc = subprocess.run(pytest, cwd=ROOT, env=env, text=True, capture_output=True)
        seconds = time.time() - t0
        rows = [json.loads(x) for x in tally.read_text().splitlines()] if tally.exists() else []
    print(proc.stdout[-3000:], proc.stderr[-2000:], sep="\n")
    kinds = aggregate(rows)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    result = {"command": command, "pytest": shlex.join(pytest[1:]), "full": not args.sample, "date": when,
              "commit": commit, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "pytest_exit": proc.returncode, "pytest_summary": summary, "seconds": round(seconds, 1),
              "kinds": kinds}
    print(table(kinds, command, when))
    if not args.sample:
        RESULTS.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        md = table(kinds, command, when).replace("](benchmarks/results/", "](")
        RESULTS.with_suffix(".md").write_text(
            f"# Fault injection: every case\n\n{md}\n\nCommit {commit}; {result['machine']}; pytest: {summary} "
            f"(exit {proc.returncode}), {seconds:.0f} s.\n\nWhich tests recorded each kind:\n\n"
            + "".join(f"- {k['kind']}: {', '.join(k['tests'])}\n" for k in kinds))
        splice(ROOT / "README.md", table(kinds, command, when))
        splice(ROOT / "docs" / "reliability.md", table(kinds, command, when), "../")
    lost = sum(k["lost"] for k in kinds)
    return 1 if proc.returncode or lost else 0


if __name__ == "__main__":
    sys.exit(main())
