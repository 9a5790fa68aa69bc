"""Bytes per distinct record of the dedup table (prefalign/data/hashtable.py), measured with tracemalloc:
what it holds, and its peak (a doubling keeps the old and the new arrays alive together), at counts just
after a doubling and just before the next one.

    python benchmarks/hashtable_bytes.py [--out benchmarks/results/hashtable-bytes]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tracemalloc
from pathlib import Path

from prefalign.data.hashtable import _LOAD, U64Table


def measure(n: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    keys = [rng.getrandbits(64) for _ in range(n)]  # made before tracing: only the table is measured
    tracemalloc.start()
    table = U64Table()
    for k in keys:
        table.add(k)
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"records": n, "slots": len(table.keys), "held_bytes_per_record": round(held / n, 1),
            "peak_bytes_per_record": round(peak / n, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="write OUT.json and OUT.md")
    args = ap.parse_args()
    rows = []
    for capacity in (1 << 17, 1 << 20):
        after = int(capacity * _LOAD) + 1  # the record that made the table double to 2 * capacity
        rows += [measure(after), measure(int(2 * capacity * _LOAD))]  # ... and the last before the next
    result = {"command": "python " + " ".join(sys.argv), "python": sys.version.split()[0], "rows": rows}
    lines = ["| records | slots | held, bytes/record | peak so far, bytes/record |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['records']:,} | {r['slots']:,} | {r['held_bytes_per_record']} | {r['peak_bytes_per_record']} |"
              for r in rows]
    print("\n".join(lines))
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(result, indent=1) + "\n")
        Path(args.out + ".md").write_text(f"# Dedup table: bytes per distinct record\n\n`{result['command']}` "
                                          f"(Python {result['python']}, tracemalloc)\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
