"""What each `report_to` tracker costs a run, in its local mode, and what it leaves running.

    python benchmarks/tracker_overhead.py [--rows 200] [--keys 25] [--repeats 2]
                                          [--out benchmarks/results/tracker_overhead-cpu-2core]

Each tracker (train/trackers.py, the classes the training loop uses) runs in a fresh process, so its import is
counted (torch is loaded first, as in a training process): import, start (with a 60-key config), --rows rows of
--keys numbers, finish. Reported per phase: wall and CPU seconds (CPU is what a shared machine's load changes
least), and the child processes and threads alive after finish (W&B's wandb-core: its finish alone leaves it
running; the tracker's finish also calls wandb.teardown). Local modes only: W&B offline, an MLflow file store,
trackio's local store, all under a temporary folder (W&B's cache, data and config folders too; MLflow's
telemetry off). The load average before each run is recorded; each figure
is the median over --repeats runs (every run is in the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRACKERS = ["tensorboard", "wandb", "mlflow", "trackio"]

CHILD = r"""
import json, sys, threading, time
from pathlib import Path
import psutil
import torch  # noqa: F401  (the training loop has it loaded: TensorBoard's writer is not charged for it)
name, rows, keys, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
me, phases = psutil.Process(), {}
def clock(phase, t, c):
    phases[phase] = {"wall_s": time.perf_counter() - t, "cpu_s": time.process_time() - c}
    return time.perf_counter(), time.process_time()
t, c = time.perf_counter(), time.process_time()
from prefalign.train.trackers import TRACKERS, require
require(name)
t, c = clock("import", t, c)
tracker = TRACKERS[name]("tracker-overhead")
tracker.start({f"key_{i}": i * 0.5 for i in range(60)}, "bench", out)
t, c = clock("start", t, c)
for step in range(1, rows + 1):
    tracker.log(step, {f"metric/{k}": 1.0 / (step + k) for k in range(keys)})
t, c = clock("log", t, c)
extra = {}
if name == "wandb":  # what wandb's own finish leaves: the tracker's finish adds wandb.teardown()
    tracker.run.finish()
    extra["children_after_run_finish"] = sorted(p.name() for p in me.children(recursive=True))
tracker.finish()
clock("finish", t, c)
print(json.dumps({"phases": phases, "children_after_finish": sorted(p.name() for p in me.children(recursive=True)),
                  "threads_after_finish": sorted(th.name for th in threading.enumerate()), **extra}))
"""


def run_one(name: str, rows: int, keys: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "WANDB_MODE": "offline", "WANDB_SILENT": "true",
               "MLFLOW_TRACKING_URI": f"file:{tmp}/mlruns", "MLFLOW_ALLOW_FILE_STORE": "true",
               "MLFLOW_DISABLE_TELEMETRY": "true", "TRACKIO_DIR": f"{tmp}/trackio",
               **{f"WANDB_{k}_DIR": f"{tmp}/wandb-{k}" for k in ("CACHE", "DATA", "CONFIG")}}
        env.pop("WANDB_DIR", None)
        load = os.getloadavg()[0]
        proc = subprocess.run([sys.executable, "-c", CHILD, name, str(rows), str(keys), tmp], capture_output=True,
                              text=True, env=env, cwd=tmp, timeout=300)
        if proc.returncode:
            raise SystemExit(f"{name}: {proc.stderr[-2000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        return {**result, "load_before": load, "load_after": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--keys", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tracker_overhead-cpu-2core"))
    a = ap.parse_args()
    runs = {name: [] for name in TRACKERS}
    for _ in range(a.repeats):  # interleaved: a machine that gets busier weighs on every tracker alike
        for name in TRACKERS:
            runs[name].append(run_one(name, a.rows, a.keys))
    lines = [f"# report_to trackers: cost and what stays running ({platform.node()}, {os.cpu_count()} CPUs, "
             f"{time.strftime('%Y-%m-%d')})", "", "    python benchmarks/tracker_overhead.py " + " ".join(sys.argv[1:]),
             "", f"{a.rows} rows x {a.keys} keys; median of {a.repeats} runs, each in a fresh process; seconds "
             "as wall / CPU; load: 1-minute load average before the runs (min-max).", "",
             "| tracker | import | start | log (all rows) | finish | left running after finish | load |",
             "|---|---|---|---|---|---|---|"]
    for name, rs in runs.items():
        cell = {p: f"{statistics.median(r['phases'][p]['wall_s'] for r in rs):.2f} / "
                   f"{statistics.median(r['phases'][p]['cpu_s'] for r in rs):.2f}"
                for p in ("import", "start", "log", "finish")}
        left = {(", ".join(r["children_after_finish"]) or "no process") + "; threads: "
                + (", ".join(t for t in r["threads_after_finish"] if t != "MainThread") or "none") for r in rs}
        loads = [r["load_before"] for r in rs]
        lines.append(f"| {name} | {cell['import']} | {cell['start']} | {cell['log']} | {cell['finish']} | "
                     f"{'; '.join(sorted(left))} | {min(loads):.1f}-{max(loads):.1f} |")
    wandb_left = {", ".join(r["children_after_run_finish"]) or "none" for r in runs["wandb"]}
    lines += ["", f"W&B: after `run.finish()` alone these processes were still running: {'; '.join(wandb_left)}; "
              "the tracker's finish (`wandb.teardown()` too) leaves the row above."]
    Path(a.out + ".json").write_text(json.dumps({"argv": sys.argv, "runs": runs}, indent=2))
    Path(a.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
