"""The README's reliability table is the last `make faults` run's, cell for cell, and every fault kind a
test records is a row the table knows (benchmarks/faults.py)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("faults_bench", ROOT / "benchmarks" / "faults.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_aggregate_counts_examples_survivors_and_losses():
    rows = [{"kind": "disk full", "survived": True, "lost": 0, "test": "a.py::x"},
            {"kind": "disk full", "count": 3, "survived": False, "lost": 2, "test": "b.py::y"},
            {"kind": "new kind", "count": 5, "survived": True, "lost": 0, "test": "c.py::z"},
            {"kind": "kill (SIGKILL)", "count": 2, "survived": True, "lost": 0, "test": "a.py::w"}]
    kinds = bench.aggregate(rows)
    assert [k["kind"] for k in kinds] == ["kill (SIGKILL)", "disk full", "new kind"]  # KINDS order, then others
    disk = kinds[1]
    assert (disk["injected"], disk["survived"], disk["lost"], disk["tests"]) == (4, 1, 2, ["a.py", "b.py"])


def test_readme_table_is_the_last_full_run():
    result = json.loads((ROOT / "benchmarks" / "results" / "faults-cpu-2core.json").read_text())
    assert result["full"]
    # every kind has its row: a test that skipped (an importorskip, a missing tool) would drop one silently
    assert {k["kind"] for k in result["kinds"]} == set(bench.KINDS)
    expected = bench.table(result["kinds"], result["command"], result["date"])
    readme = (ROOT / "README.md").read_text()
    shown = re.search(re.escape(bench.BEGIN) + r"\n(.*?)\n" + re.escape(bench.END), readme, re.S).group(1)
    assert shown == expected
    # a loss is never shown silently: every kind that lost something is named, with its count, right
    # below the table, with what it was
    below = readme.split(bench.END, 1)[1].split("\n\n")[1]
    for k in result["kinds"]:
        assert (f"{k['kind']}: {k['lost']}" in below) == (k["lost"] > 0), (k, below)


def test_every_recorded_kind_has_a_row():
    used = set()
    for path in (ROOT / "tests" / "faults").glob("*.py"):
        used |= set(re.findall(r"""tally\(\s*["']([^"']+)["']""", path.read_text()))
        used |= set(re.findall(r"""^KIND\w*\s*=\s*["']([^"']+)["']""", path.read_text(), re.M))
    assert used and used <= set(bench.KINDS), used - set(bench.KINDS)
