"""Under load, short: 200 DPO steps of a tiny llama with a checkpoint every 10, watched from outside.

Its memory must be flat once warm (every kind of periodic work, eval, KL, checkpoint, has run by step
50), its metrics file whole and in order, its checkpoints the last keep_checkpoints saves, each loading.
The same checks as benchmarks/long_run.py's 2,000-step run (docs/reliability.md, "Under load"), whose
functions this test calls. Load figures, not faults: nothing is tallied.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import long_run  # noqa: E402  (benchmarks/ is not a package)

STEPS, SAVE_EVERY, WARM = 200, 10, 50
# RSS from step 50 to the end of a leak-free run moved 0.6 MB (tiny llama, 200-300 steps, 2 shared
# cores); a leak of one step's logits (~300 kB here) adds ~40 MB over the 150 steps
GROWTH_BOUND = 4e6


def test_a_long_run_keeps_its_memory_flat_and_its_records_whole(tiny_models, tmp_path):
    model = Path(tiny_models["llama"])
    train, held = long_run.write_data(tmp_path)
    out = tmp_path / "run"
    cmd = long_run.train_command(model, train, held, out, STEPS, SAVE_EVERY, eval_every=WARM, kl_every=WARM,
                                 threads=1, extra=("kl_prompts=4", "kl_max_new_tokens=8"))
    run = long_run.watch(cmd, out, interval=0.1, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run["returncode"] == 0, run["log_tail"]
    rss = long_run.rss_figures(run["samples"], WARM, STEPS)
    assert rss["end_rss"] - rss["warm_rss"] < GROWTH_BOUND, rss
    assert rss["max_rss_after_warmup"] - rss["warm_rss"] < 2 * GROWTH_BOUND, rss
    metrics = long_run.check_metrics(out / "metrics.jsonl", STEPS)
    assert metrics["eval_rows"] == STEPS // WARM + 1 and metrics["kl_rows"] == STEPS // WARM, metrics
    ckpts = long_run.check_checkpoints(out, model, STEPS, SAVE_EVERY)
    assert ckpts["loaded"] == [STEPS - SAVE_EVERY, STEPS]
