"""The README's demo command runs end to end (the same code `make demo` runs)."""

import json
import subprocess
import sys


def test_demo_runs_end_to_end(tmp_path):
    run = subprocess.run([sys.executable, "-m", "prefalign", "demo", "-o", str(tmp_path / "demo")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert summary["stats"]["records"] == 100 and summary["stats"]["invalid"] == 1
    assert summary["curate"]["kept"] + sum(summary["curate"]["set_aside"].values()) == 99
    assert summary["split"]["train"] + summary["split"]["eval"] == summary["curate"]["kept"]
    rows = [json.loads(x) for x in (tmp_path / "demo" / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and rows[-1]["step"] == 40
    train = [r["loss"] for r in rows if "loss" in r]
    assert sum(train[-5:]) / 5 < train[0]  # DPO is learning the training pairs
    assert (tmp_path / "demo" / "dpo" / "final" / "model.safetensors").exists()
