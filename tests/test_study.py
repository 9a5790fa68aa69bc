"""The study's statistics (intervals over seeds, frontier statements, collapse flags) and the
per-stage processes that make each stage's peak memory its own."""

import math

import pytest

from prefalign.tasks.seeds import compare_frontiers, mean_ci, statement, t975
from prefalign.tasks.stages import chain, run_stage
from prefalign.tasks.study_table import aggregate, flag_collapse


def test_t_interval_over_seeds():
    mean, (lo, hi) = mean_ci([1.0, 2.0, 3.0])  # sd 1, n 3: half-width t(0.975, 2) / sqrt(3)
    assert mean == 2.0 and hi - mean == pytest.approx(4.303 / math.sqrt(3)) and mean - lo == pytest.approx(hi - mean)
    assert mean_ci([0.5]) == (0.5, None)
    assert t975(1000) == pytest.approx(1.9623, abs=1e-3) and t975(31) == pytest.approx(2.0395, abs=1e-3)


def _sweep(offset: float, kls: list[float], noise: list[float]) -> dict[int, list[tuple[float, float]]]:
    """Per seed, points on the curve reward = 0.1 + 0.05 * KL + offset (+ a per-seed shift)."""
    return {s: [(k, 0.1 + 0.05 * k + offset + n) for k in kls] for s, n in enumerate(noise)}


def test_a_consistent_gap_is_stated_with_its_size_and_the_common_range():
    a = _sweep(0.1, [1, 4, 10], [0.0, 0.01, -0.01])
    b = _sweep(0.0, [3, 8, 20], [0.0, 0.01, -0.01])
    cmp = compare_frontiers(a, b)
    assert cmp["kl_range"] == [3, 10] and cmp["mean_difference"] == pytest.approx(0.1)
    text = statement(cmp, "DPO", "PPO")
    assert "DPO's reward is higher than PPO's by 0.100" in text and "3.00–10.00" in text
    assert "no difference detectable" not in text
    assert "lower than" in statement(compare_frontiers(b, a), "PPO", "DPO")


def test_a_gap_within_the_seeds_spread_is_no_difference_detectable():
    a = _sweep(0.02, [1, 10], [0.2, -0.2, 0.0])
    b = _sweep(0.0, [1, 10], [-0.1, 0.1, 0.0])
    text = statement(compare_frontiers(a, b), "DPO", "PPO")
    assert "no difference detectable on average" in text and "higher at" not in text and "lower at" not in text


def test_crossing_frontiers_are_described_level_by_level():
    a = {s: [(0, 0.5 + n), (10, 0.5 + n)] for s, n in enumerate([0.0, 0.01, -0.01])}  # flat
    b = {s: [(0, 0.2 + n), (10, 0.8 + n)] for s, n in enumerate([0.0, 0.01, -0.01])}  # rising through it
    text = statement(compare_frontiers(a, b), "DPO", "PPO")
    assert "DPO higher at KL 0.00" in text and "DPO lower at KL" in text and "10.00" in text


def test_no_common_range_means_no_comparison():
    a, b = _sweep(0, [1, 2], [0, 0]), _sweep(0, [3, 4], [0, 0])
    assert compare_frontiers(a, b) is None and "no comparison made" in statement(None, "DPO", "PPO")
    assert compare_frontiers(_sweep(0, [1], [0, 0]), b) is None  # one point per seed is not a curve


def _run(name: str, seed: int, length: float, reward: float = 0.1) -> dict:
    return {"run": name, "method": name.split("-")[0], "seed": seed, "setting": None, "reward_mean": reward,
            "kl_per_sequence": 1.0, "mean_length": length, "train": None, "end_to_end": None}


def test_runs_whose_completions_collapsed_are_flagged_against_their_own_seeds_base():
    rows = [_run("base", 0, 20), _run("ppo-a", 0, 9.9), _run("ppo-b", 0, 10.1),
            _run("base", 1, 10), _run("ppo-a", 1, 6), _run("ppo-b", 1, 4)]
    flag_collapse(rows, 0.5)
    assert [r["collapsed"] for r in rows] == [False, True, False, False, False, True]
    settings = aggregate(rows)
    assert [(s["run"], s["collapsed"], s["seeds"]) for s in settings] == [("base", 0, 2), ("ppo-a", 1, 2),
                                                                          ("ppo-b", 1, 2)]


def _touch(mb: int) -> int:
    return len(b"\x01" * (mb * 2**20))  # written, so resident


def test_each_stage_reports_its_own_peak_memory():
    _, big = run_stage(_touch, 400)
    _, small = run_stage(_touch, 1)  # in one process this would report the 400 MB stage's high-water mark
    assert big["peak_rss_bytes"] - small["peak_rss_bytes"] > 300 * 2**20
    both = chain(small, big)
    assert both["peak_rss_bytes"] == big["peak_rss_bytes"]
    assert both["seconds"] == pytest.approx(small["seconds"] + big["seconds"])


def test_a_stage_ends_when_the_process_that_started_it_is_killed(tmp_path):
    """Stages are children of the forkserver, not of their caller: a timed-out demo must not leave its
    PPO stage training on as an orphan."""
    import os
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "stage.pid"
    script = ("import os, sys, time\nfrom pathlib import Path\nfrom prefalign.tasks.stages import run_stage\n"
              "def stage(path):\n    Path(path).write_text(str(os.getpid()))\n    time.sleep(120)\n"
              f"if __name__ == '__main__':\n    run_stage(stage, {str(pid_file)!r})\n")
    (tmp_path / "caller.py").write_text(script)
    caller = subprocess.Popen([sys.executable, str(tmp_path / "caller.py")], cwd=tmp_path)
    deadline = time.time() + 60
    while not pid_file.exists() and time.time() < deadline:
        time.sleep(0.2)
    stage = int(pid_file.read_text())
    caller.kill()
    caller.wait()
    deadline = time.time() + 15

    def alive() -> bool:
        try:
            os.kill(stage, 0)
        except ProcessLookupError:
            return False
        return open(f"/proc/{stage}/stat").read().split()[2] != "Z" if os.path.exists(f"/proc/{stage}") else True

    while alive() and time.time() < deadline:
        time.sleep(0.5)
    assert not alive(), "the stage outlived its caller"
