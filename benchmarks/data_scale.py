"""Streaming data benchmark: records/s and peak RSS of `data stats` and `data curate` on generated pairs.

    python benchmarks/data_scale.py [--records 1000000]

Each command runs in its own subprocess so its peak RSS (ru_maxrss of the child) is its own.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = "the a movie film plot actor good bad great awful story scene end love hate why how what".split()


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


def run(args: list[str]) -> tuple[float, int, str]:
    """Seconds, peak RSS in bytes, stdout. A fresh intermediate process reads its only child's
    ru_maxrss, so each command's peak is its own (RUSAGE_CHILDREN is a running maximum)."""
    probe = ("import resource, subprocess, sys;"
             "p = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, check=True);"
             "sys.stdout.buffer.write(p.stdout);"
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "prefalign", *args],
                          capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - t0
    *lines, peak_kb = proc.stdout.rstrip("\n").split("\n")
    return seconds, int(peak_kb) * 1024, "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=1_000_000)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "pairs.jsonl"
        generate(data, a.records)
        size = data.stat().st_size
        baseline, base_rss, _ = run(["--help"])
        print(f"{a.records:,} pairs, {size / 1e6:.0f} MB JSONL; python+import baseline {base_rss / 1e6:.0f} MB RSS")
        for name, args in (("stats", ["data", "stats", str(data), "--json"]),
                           ("curate", ["data", "curate", str(data), "-o", str(Path(tmp) / "out.jsonl")])):
            seconds, rss, stdout = run(args)
            print(f"{name:7s} {seconds:7.1f} s  {a.records / seconds:10,.0f} records/s  peak RSS {rss / 1e6:7.0f} MB")
            if name == "stats":
                s = json.loads(stdout)
                print(f"        valid={s['valid']:,} ties={s['ties']:,} duplicates={s['duplicates']:,}")


if __name__ == "__main__":
    main()
