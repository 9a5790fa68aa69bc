"""Compare one method's frontier from one study run with another method's from another run.

For an arm re-run on its own (e.g. DPO (iterative) after a fix) against an arm of the full study:
both runs must share the split and the seeds (the same pairs, prefixes and evaluation sampling follow
the seed), and the statement is the study's own (prefalign.tasks.seeds).

    python benchmarks/study_compare.py runs/study-iterative/study.json "dpo (iterative)" \
        runs/study-sentiment/study.json ppo
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from prefalign.tasks.seeds import compare_frontiers, statement


def points(summary: dict, method: str) -> dict[int, list[tuple[float, float]]]:
    out: dict[int, list[tuple[float, float]]] = {}
    for r in summary["runs"]:
        if r["method"] == method:
            out.setdefault(r["seed"], []).append((r["kl_per_sequence"], r["reward_mean"]))
    if not out:
        raise SystemExit(f"no runs of method {method!r}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a_study"), ap.add_argument("a_method"), ap.add_argument("b_study"), ap.add_argument("b_method")
    args = ap.parse_args()
    a, b = (json.loads(Path(p).read_text()) for p in (args.a_study, args.b_study))
    for key in ("split", "seeds"):
        if a[key] != b[key]:
            raise SystemExit(f"the two runs differ in {key}: {a[key]} against {b[key]}")
    print(statement(compare_frontiers(points(a, args.a_method), points(b, args.b_method)),
                    args.a_method.upper(), args.b_method.upper()))


if __name__ == "__main__":
    main()
