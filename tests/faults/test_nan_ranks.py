"""A non-finite value on one process of several (docs/reliability.md, "NaN, Inf and out of memory"):
every rank skips the step together, so the replicas stay one model. Two processes on gloo (torchrun
through the real CLI), `inf@grad#2@rank1` (rank 1's gradient goes bad after DDP's all-reduce, as one
kernel's overflow would leave it) and `nan@loss#2@rank1`, against one process with the same fault on
its only rank: the same skipped step, the same losses after it (each rank's loss is in the mean, so a
rank that stepped alone would show at step 3) and the same final weights. Several torchrun starts:
`make faults` only."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from faultkit import FULL, tally
from safetensors.torch import load_file

KIND = "NaN/Inf injected"
BASE = ["max_steps=3", "batch_size=4", "learning_rate=1e-3", "lr_schedule=constant", "kl_every=0", "seed=3",
        "report_to=none"]


def _run(out, model, data, fault: str, nproc: int) -> dict:
    cmd = [sys.executable, "-m", "prefalign", "train", "--method", "dpo", "--model", str(model), "--data", str(data),
           "-o", str(out), "--no-progress", *BASE] + (["--nproc", str(nproc)] if nproc > 1 else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PREFALIGN_FAULTS": fault}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return dict(skipped=json.loads((out / "run.json").read_text())["skipped_steps"],
                losses={r["step"]: r["loss"] for r in rows if "loss" in r},
                weights=load_file(str(out / "final" / "model.safetensors")))


def _same(a: dict, b: dict) -> bool:
    return (a["skipped"] == b["skipped"] == 1 and a["losses"].keys() == b["losses"].keys()
            and all(abs(a["losses"][s] - b["losses"][s]) < 1e-5 for s in a["losses"])
            and a["weights"].keys() == b["weights"].keys()
            and all(torch.allclose(a["weights"][k], b["weights"][k], atol=1e-5, rtol=0) for k in a["weights"]))


@pytest.mark.skipif(not FULL, reason="four torchrun/CLI runs: make faults")
@pytest.mark.parametrize("fault", ["inf@grad#2", "nan@loss#2"])
def test_a_bad_step_on_one_rank_is_skipped_by_every_rank(fault, tiny_models, pair_file, tmp_path):
    outcome, error = {}, None
    try:
        one = _run(tmp_path / "one", tiny_models["llama"], pair_file, fault, 1)
        two = _run(tmp_path / "two", tiny_models["llama"], pair_file, f"{fault}@rank1", 2)
        outcome = dict(skipped=two["skipped"], same=_same(one, two))
    except Exception as e:  # counted as lost below, then raised
        error = e
    ok = error is None and outcome == dict(skipped=1, same=True)
    tally(KIND, survived=ok, lost=0 if ok else 1, detail=f"{fault}@rank1 dpo, 2 processes (gloo)")
    if error is not None:
        raise error
    assert outcome == dict(skipped=1, same=True), (one["skipped"], one["losses"], two["losses"])
