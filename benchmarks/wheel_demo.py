"""The demo from the built wheel, outside the repo: what `pip install prefalign` gives is enough to run it.

    python benchmarks/wheel_demo.py [--quick] [--out benchmarks/results/wheel-demo.md]

Builds the wheel from a clean copy of this tree and installs it into a fresh environment in a temporary
folder (scripts/wheel_venv.py: the wheel alone, this interpreter's site-packages after it, offline),
then runs that environment's `prefalign demo` from an empty folder outside the repo. Writes the command,
which prefalign ran (its file, from the installed copy), the wheel, the load average around the run and
the demo's own summary (demo.json) to --out. tests/test_wheel.py checks the wheel in seconds (its
files, the installed command, the shipped model loading); this runs the whole demo, a minute or more.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from wheel_venv import build_wheel, clean_env, install  # noqa: E402


def _cells(r: dict) -> list[str]:
    """model, reward [CI], KL, win-rate as the demo's own table prints them."""
    lo, hi = r["reward_ci95"]
    win = "-" if r["model"] == "base" else f"{r['win_rate_vs_base']:.2f}"
    return [r["model"], f"{r['reward_mean']:.3f} [{lo:.3f}, {hi:.3f}]", f"{r['kl_per_sequence']:.2f}", win]


def _committed(path: Path) -> dict[str, list[str]]:
    """The same four cells of the demo's table in a committed results file (from the repo's own run)."""
    rows = {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if len(cells) >= 4 and cells[0] in ("base", "dpo", "ppo"):
            rows[cells[0]] = cells[:4]
    return rows


def _compare(summary: dict, quick: bool) -> str:
    """The wheel's figures against the repo's own full demo run (README's table): seeded, so equal on
    the same machine and library versions."""
    reference = ROOT / "benchmarks" / "results" / "demo-cpu-2core.md"
    if quick or summary["split"] != "test" or summary["seed"] != 0:
        return f"(Not compared with {reference.name}: that is the full demo on the test prefixes, seed 0.)"
    theirs, ours = _committed(reference), {r["model"]: _cells(r) for r in summary["rows"]}
    differ = [m for m in ours if theirs.get(m) != ours[m]]
    if not differ:
        return (f"Every cell above equals the same row of {reference.name} (the full demo run from the repo's "
                "source tree; wall-clock and memory columns aside).")
    return f"Differs from {reference.name} in rows {', '.join(differ)}: " + "; ".join(
        f"{m}: {theirs.get(m)} there, {ours[m]} here" for m in differ)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="prefalign demo --quick")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "wheel-demo.md")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="prefalign-wheel-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        wheel = build_wheel(work)
        bin_dir = install(wheel, work / "venv")
        setup_s = time.perf_counter() - t0
        outside = work / "elsewhere"
        outside.mkdir()
        env = clean_env()
        probe = [str(bin_dir / "python"), "-c", "import prefalign; print(prefalign.__file__)"]
        installed = subprocess.run(probe, cwd=outside, env=env, capture_output=True, text=True, check=True).stdout
        version = subprocess.run([str(bin_dir / "prefalign"), "--version"], cwd=outside, env=env, capture_output=True,
                                 text=True, check=True).stdout.strip()
        demo = [str(bin_dir / "prefalign"), "demo", "--no-progress", "-o", "demo"] + (["--quick"] if args.quick else [])
        load_before = os.getloadavg()
        t1 = time.perf_counter()
        run = subprocess.run(demo, cwd=outside, env=env, capture_output=True, text=True)
        demo_s = time.perf_counter() - t1
        load_after = os.getloadavg()
        if run.returncode:
            sys.exit(f"the demo failed ({run.returncode}):\n{run.stdout}\n{run.stderr}")
        summary = json.loads((outside / "demo" / "demo.json").read_text())
        wheel_mib = wheel.stat().st_size / 2**20
    lines = [
        f"# `prefalign demo` from the built wheel, outside the repo, {datetime.date.today()}", "",
        f"    python benchmarks/wheel_demo.py{' --quick' if args.quick else ''}", "",
        f"Wheel: `{wheel.name}` ({wheel_mib:.1f} MiB), built and installed into a fresh environment in "
        f"{setup_s:.0f} s (scripts/wheel_venv.py: no build isolation, no index, the wheel with --no-deps and this "
        "interpreter's site-packages after its own).", "",
        f"Run from an empty temporary folder: `{' '.join(['prefalign', *demo[1:]])}` with the environment's own "
        "command; the prefalign it imported:", "", f"    {installed.strip()}", f"    {version}", "",
        f"Demo wall clock {demo_s:.0f} s (its own count: {summary['seconds']:.0f} s); load average "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after, on {os.cpu_count()} cores.", "",
        f"Its table (demo.json, {summary['split']} prefixes, seed {summary['seed']}, quick {summary['quick']}):", "",
        "| model | VADER reward [95% CI] | exact KL to base / seq | win vs base |", "|---|---|---|---|",
        *("| " + " | ".join(_cells(r)) + " |" for r in summary["rows"]), "", _compare(summary, args.quick), "",
        "Its output:", "", "```", *(run.stderr + run.stdout).rstrip().splitlines()[-16:], "```", "",
    ]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
