"""Streaming data benchmark: records/s and peak RSS of `data stats`, `data curate` and `data split`.

    python benchmarks/data_scale.py [--pairs 1000000] [--stages stats,curate,split] [--dir DIR]
                                    [--out benchmarks/results/data-scale-10m-cpu-2core]

Generates the pairs into a JSONL file on disk (written row by row, never held in memory), then runs
each command through the CLI, as a user would, in its own process: its wall time, its peak RSS (the
ru_maxrss that os.wait4 returns for that one child) and its RSS sampled every 0.5 s from outside
(/proc/PID/status VmRSS), so that a peak that grows with the file shows as a rising curve. The load
average is recorded before and after each stage (the machine may be shared). Each stage's outputs
are counted (the counts must add up), then deleted; the data folder is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = "the a movie film plot actor good bad great awful story scene end love hate why how what".split()
ROOT = Path(__file__).resolve().parent.parent


def generate(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)

    def sentence(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    with open(path, "w") as f:
        for i in range(n):
            row = {"prompt": f"{i}: {sentence(rng.randint(5, 40))}?", "chosen": sentence(rng.randint(5, 80)),
                   "rejected": sentence(rng.randint(5, 80))}
            if i % 1000 == 7:
                row["chosen"] = row["rejected"]  # a tie now and then
            f.write(json.dumps(row) + "\n")


def vm_rss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def run(args: list[str], workdir: Path) -> dict:
    """Run `python -m prefalign ARGS` in its own process: seconds, peak RSS (bytes), RSS samples, stdout."""
    out_path = workdir / "stdout.txt"
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    with open(out_path, "w") as out, open(workdir / "stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "prefalign", *args], stdout=out, stderr=err)
        samples: list[tuple[float, int]] = []
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            rss = vm_rss(proc.pid)
            if rss:
                samples.append((round(time.perf_counter() - t0, 1), rss))
            time.sleep(0.5)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"prefalign {' '.join(args)} exited with {proc.returncode}:\n"
                         f"{(workdir / 'stderr.txt').read_text()[-2000:]}")
    return {"seconds": round(seconds, 1), "peak_rss": usage.ru_maxrss * 1024, "rss_samples": samples,
            "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in os.getloadavg()], "stdout": out_path.read_text()}


def count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(buf.count(b"\n") for buf in iter(lambda: f.read(1 << 24), b""))


def rss_curve(samples: list[tuple[float, int]]) -> dict[str, int]:
    """RSS at a quarter, half, three quarters and the end of the stage's samples: flat or rising."""
    if not samples:
        return {}
    return {f"{q}%": samples[min(len(samples) - 1, len(samples) * q // 100)][1] for q in (25, 50, 75, 100)}


def stage(name: str, data: Path, tmp: Path, n: int) -> dict:
    outputs = {"stats": [], "curate": [tmp / "out.jsonl", tmp / "out.quarantine.jsonl"],
               "split": [tmp / "split"]}[name]
    args = {"stats": ["data", "stats", str(data), "--json"],
            "curate": ["data", "curate", str(data), "-o", str(tmp / "out.jsonl")],
            "split": ["data", "split", str(data), "--eval-fraction", "0.05", "-o", str(tmp / "split")]}[name]
    r = run(args, tmp)
    r["command"] = "prefalign " + " ".join(args)
    r["records_per_s"] = round(n / r["seconds"])
    r["rss_curve"] = rss_curve(r["rss_samples"])
    last = r.pop("stdout").strip().splitlines()[-1]
    r["summary"] = json.loads(last)
    if name == "curate":  # every input line is either kept or in the quarantine file
        r["lines_out"] = {p.name: count_lines(p) for p in outputs}
        assert sum(r["lines_out"].values()) == n, r["lines_out"]
    if name == "split":
        r["lines_out"] = {p.name: count_lines(p) for p in sorted((tmp / "split").iterdir())}
        assert r["lines_out"]["train.jsonl"] + r["lines_out"]["eval.jsonl"] == r["summary"]["rows"] - \
            r["summary"].get("invalid", 0), r["lines_out"]
    for p in outputs:  # the outputs are as large as the input: free the disk before the next stage
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return r


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    return {"cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version(), "commit": commit,
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def write_results(prefix: Path, res: dict) -> None:
    prefix.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    mb, m = 1e6, res["machine"]
    lines = [f"# Data at scale: {res['pairs']:,} pairs", "", f"Command: `{res['command']}`", "",
             f"Machine: {m['cpus']} cores ({m['cpu']}), {m['memory_gb']} GiB, Python {m['python']}, "
             f"commit {m['commit']}.",
             f"Input: {res['file_mb']:,.0f} MB of JSONL, generated in {res['generate_seconds']:.0f} s. "
             f"`prefalign data stats` of 1,000 pairs (interpreter + imports): {res['baseline_rss'] / mb:.0f} MB "
             "peak RSS.", "",
             "| stage | seconds | records/s | peak RSS | RSS at 25/50/75/100% of the run | load avg before → after |",
             "|---|---|---|---|---|---|"]
    for name, r in res["stages"].items():
        curve = " / ".join(f"{v / mb:.0f}" for v in r["rss_curve"].values())
        lines.append(f"| `data {name}` | {r['seconds']:.1f} | "
                     f"{r['records_per_s']:,} | {r['peak_rss'] / mb:.0f} MB | {curve} MB | "
                     f"{' '.join(map(str, r['load_before']))} → {' '.join(map(str, r['load_after']))} |")
    lines += ["", "Each stage's command and output counts:", ""]
    for name, r in res["stages"].items():
        lines.append(f"- {name}: `{r['command']}` → {json.dumps(r['summary'])}"
                     + (f"; lines written {r['lines_out']}" if "lines_out" in r else ""))
    prefix.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", "--records", dest="pairs", type=int, default=1_000_000)
    ap.add_argument("--stages", default="stats,curate,split")
    ap.add_argument("--dir", default=None, help="where the data goes (deleted afterwards); default a temp folder")
    ap.add_argument("--out", default=None, help="results prefix: writes PREFIX.md and PREFIX.json")
    a = ap.parse_args()
    res: dict = {"command": "python benchmarks/data_scale.py " + " ".join(sys.argv[1:]), "pairs": a.pairs,
                 "machine": machine(), "stages": {}}
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp_name:
        tmp = Path(tmp_name)
        data = tmp / "pairs.jsonl"
        t0 = time.perf_counter()
        generate(data, a.pairs)
        res["generate_seconds"] = round(time.perf_counter() - t0, 1)
        res["file_mb"] = data.stat().st_size / 1e6
        small = tmp / "small.jsonl"  # the command's fixed cost: interpreter, imports, 1,000 pairs
        generate(small, 1000)
        res["baseline_rss"] = run(["data", "stats", str(small), "--json"], tmp)["peak_rss"]
        small.unlink()
        print(f"{a.pairs:,} pairs, {res['file_mb']:.0f} MB JSONL; `data stats` of 1,000 pairs "
              f"{res['baseline_rss'] / 1e6:.0f} MB RSS", flush=True)
        for name in a.stages.split(","):
            r = res["stages"][name] = stage(name, data, tmp, a.pairs)
            print(f"{name:7s} {r['seconds']:7.1f} s  {r['records_per_s']:10,} records/s  peak RSS "
                  f"{r['peak_rss'] / 1e6:7.0f} MB  load {r['load_before'][0]} -> {r['load_after'][0]}", flush=True)
            print(f"        {json.dumps(r['summary'])}", flush=True)
    if a.out:
        write_results(Path(a.out), res)


if __name__ == "__main__":
    main()
