"""`prefalign demo` over several seeds: each seed a whole demo (its own pairs, DPO, PPO, evaluation),
then per model the mean over seeds with a 95% t-interval, and DPO - PPO paired by seed.

    python benchmarks/demo_seeds.py --seeds 0,1,2 [--split test] [-o runs/demo-seeds] [--out RESULTS.md]

Each demo runs in its own `prefalign demo` process one after another (the machine otherwise idle), so
its stages' costs are measured as docs/benchmarks.md, "How costs are counted", says.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from prefalign.tasks.seeds import mean_ci

KEYS = {"reward_mean": "reward", "kl_per_sequence": "KL/seq", "win_rate_vs_base": "win vs base"}


def _fmt(values: list[float]) -> str:
    mean, ci = mean_ci(values)
    return f"{mean:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{mean:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--split", default="test", choices=["test", "validation"])
    ap.add_argument("-o", "--output", default="runs/demo-seeds")
    ap.add_argument("--out", help="write the table to OUT (markdown)")
    a = ap.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    demos, walls = {}, {}
    for seed in seeds:
        out = Path(a.output) / f"seed{seed}"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "prefalign", "demo", "--seed", str(seed), "--split", a.split,
                        "--no-progress", "-o", str(out)], check=True)
        walls[seed] = time.perf_counter() - t0
        demos[seed] = json.loads((out / "demo.json").read_text())
    rows = {seed: {r["model"]: r for r in d["rows"]} for seed, d in demos.items()}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [f"`python benchmarks/demo_seeds.py {shlex.join(sys.argv[1:])}` (commit {commit or '?'}, "
             f"1-minute load average after: {os.getloadavg()[0]:.2f})", "",
             f"{a.split} prefixes; seeds {seeds}; mean [95% t-interval over seeds]; wall per demo: "
             + ", ".join(f"seed {s} {w:.0f} s" for s, w in walls.items()), "",
             "| model | " + " | ".join(KEYS.values()) + " | train s | train peak MiB | end-to-end s |",
             "|---|" + "---|" * (len(KEYS) + 3)]
    for model in ("base", "dpo", "ppo"):
        cells = []
        for key in KEYS:
            vals = [rows[s][model][key] for s in seeds]
            # the base against itself has no win-rate to speak of
            cells.append("–" if None in vals or (model == "base" and key == "win_rate_vs_base") else _fmt(vals))
        costs = [rows[s][model] for s in seeds]
        if costs[0]["train"] is None:
            cells += ["–"] * 3
        else:
            cells += [f"{sum(c['train']['seconds'] for c in costs) / len(costs):.0f}",
                      f"{max(c['train']['peak_rss_bytes'] for c in costs) / 2**20:.0f}",
                      f"{sum(c['end_to_end']['seconds'] for c in costs) / len(costs):.0f}"]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += ["", "Per seed (reward, KL/seq):", ""]
    for s in seeds:
        lines.append(
            f"- seed {s}: "
            + "; ".join(
                f"{m} {rows[s][m]['reward_mean']:.3f} at {rows[s][m]['kl_per_sequence']:.2f}"
                for m in ("base", "dpo", "ppo")
            )
        )
    for key, name in (("reward_mean", "reward"), ("kl_per_sequence", "KL/seq")):
        diff = [rows[s]["dpo"][key] - rows[s]["ppo"][key] for s in seeds]
        lines.append(f"- DPO − PPO {name}, paired by seed: {_fmt(diff)}")
    lines.append("- train s: mean over seeds; train peak: the largest seed's peak RSS")
    text = "\n".join(lines)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
