"""Compare one method's frontier from one study run with another method's from another run.

For an arm re-run on its own (e.g. DPO (iterative) after a fix) against an arm of the full study:
both runs must share the split and the seeds (the same pairs, prefixes and evaluation sampling follow
the seed), and the statement is the study's own (prefalign.tasks.seeds).

    python benchmarks/study_compare.py runs/study-iterative/study.json "dpo (iterative)" \
        runs/study-sentiment/study.json ppo --plot benchmarks/results/study-sentiment-frontier.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from prefalign.tasks.seeds import compare_frontiers, statement
from prefalign.tasks.study_table import frontier_points, plot_frontier


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a_study"), ap.add_argument("a_method"), ap.add_argument("b_study"), ap.add_argument("b_method")
    ap.add_argument("--plot", help="also draw B's frontier plot with A's method taken from A's run instead")
    args = ap.parse_args()
    a, b = (json.loads(Path(p).read_text()) for p in (args.a_study, args.b_study))
    for key in ("split", "seeds"):
        if a[key] != b[key]:
            raise SystemExit(f"the two runs differ in {key}: {a[key]} against {b[key]}")
    pa, pb = frontier_points(a["runs"]), frontier_points(b["runs"])
    for name, pts, method in (("A", pa, args.a_method), ("B", pb, args.b_method)):
        if method not in pts:
            raise SystemExit(f"{name} has no runs of method {method!r}")
    print(statement(compare_frontiers(pa[args.a_method], pb[args.b_method]), args.a_method.upper(),
                    args.b_method.upper()))
    if args.plot:
        settings = [s for s in b["settings"] if s["method"] != args.a_method]
        plot_frontier(
            settings + [s for s in a["settings"] if s["method"] == args.a_method], Path(args.plot), b["split"]
        )


if __name__ == "__main__":
    main()
