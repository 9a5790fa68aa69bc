"""A checkpoint save that fails on rank 0 for any reason, not only a full disk (here the `oom` fail point's
MemoryError while it writes its files): every rank learns of it and stops, none waits forever for rank 0
in the next collective (docs/reliability.md). Two processes on gloo through the real CLI (torchrun);
`make faults` only. A hang is the failure: the run is stopped at a timeout, with every process it started
(tests/faults/proctree.py: the ranks are in sessions of their own, out of reach of the launcher's group)."""

from __future__ import annotations

import os
import sys

import proctree
import pytest
from faultkit import FULL, tally

from conftest import learnable_pairs, write_jsonl


@pytest.mark.skipif(not FULL, reason="two processes under torchrun: make faults")
def test_a_save_failing_on_rank_0_stops_every_rank(tiny_models, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", learnable_pairs(16))
    cmd = [sys.executable, "-m", "prefalign", "train", "--method", "dpo", "--model", str(tiny_models["llama"]),
           "--data", str(data), "-o", str(tmp_path / "run"), "--no-progress", "max_steps=3", "batch_size=4",
           "save_every=2", "kl_every=0", "report_to=none", "--nproc", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PREFALIGN_FAULTS": "oom@checkpoint.write#1@rank0"}
    rc, text = proctree.run(cmd, tmp_path / "run.log", env, timeout=150)
    problems = [] if rc is not None else ["the ranks hung after rank 0's save failed (stopped at 150 s)"]
    if rc == 0:
        problems.append("the run succeeded although rank 0 could not save")
    if rc and "rank 0 could not write the checkpoint" not in text:
        problems.append("rank 1 did not say that rank 0's save failed")
    if (tmp_path / "run" / "checkpoints" / "step-2").exists():
        problems.append("the failed save was committed")
    tally("out of memory", survived=not problems, lost=int(bool(problems)), detail="rank 0's checkpoint save, 2 ranks")
    assert not problems, (problems, text[-3000:])
