"""Several seeds per setting: means with 95% t-intervals, and the frontier comparison the study states.

Intervals are Student-t intervals over seeds (mean ± t(0.975, n−1) · sd / √n): with 3 seeds a
bootstrap has only 10 distinct resamples, too few to give a percentile interval.

The frontier comparison (`compare_frontiers`) reads each seed's sweep of a method as a curve of
reward against KL (its points sorted by KL, joined by straight lines), takes the KL range on which
every seed of both methods has points (no extrapolation), and at each level of a grid over that
range computes each seed's difference A − B. The mean over seeds and its t-interval per level, and
the mean over the range with its interval, give the statement; where an interval includes 0 it says
"no difference detectable" rather than who is ahead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# t(0.975, df) for df = 1..30; beyond, the Cornish-Fisher expansion around z (error < 1e-3)
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]


def t975(df: int) -> float:
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_ci(values: Sequence[float]) -> tuple[float, list[float] | None]:
    """Mean and 95% t-interval over seeds; no interval from a single seed."""
    x = np.asarray(values, dtype=float)
    mean = float(x.mean())
    if len(x) < 2:
        return mean, None
    half = t975(len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return mean, [mean - half, mean + half]


def _curve(points: list[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    pts = sorted(points)
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts])


def compare_frontiers(a: dict[int, list[tuple[float, float]]], b: dict[int, list[tuple[float, float]]],
                      levels: int = 41) -> dict | None:
    """A's reward minus B's at equal KL; a, b: seed -> [(kl, reward)] per setting. None: no common range."""
    seeds = sorted(set(a) & set(b))
    curves = {s: (_curve(a[s]), _curve(b[s])) for s in seeds if len(a[s]) >= 2 and len(b[s]) >= 2}
    if len(curves) < 2:
        return None
    lo = max(max(ca[0][0], cb[0][0]) for ca, cb in curves.values())
    hi = min(min(ca[0][-1], cb[0][-1]) for ca, cb in curves.values())
    if not hi > lo:
        return None
    grid = np.linspace(lo, hi, levels)
    diffs = np.array([np.interp(grid, *ca) - np.interp(grid, *cb) for ca, cb in curves.values()])  # seeds x grid
    points = [mean_ci(diffs[:, i]) for i in range(levels)]
    overall = mean_ci(diffs.mean(axis=1))
    return {"kl_range": [float(lo), float(hi)], "seeds": len(curves), "grid": grid.tolist(),
            "difference": [p[0] for p in points], "difference_ci95": [p[1] for p in points],
            "mean_difference": overall[0], "mean_difference_ci95": overall[1]}


def _verdict(ci: list[float], tol: float = 1e-9) -> str:
    """Who is ahead where the interval excludes 0 (beyond rounding noise); "none" where it includes 0."""
    return "higher" if ci[0] > tol else "lower" if ci[1] < -tol else "none"


def _by(d: list[float]) -> str:
    lo, hi = min(map(abs, d)), max(map(abs, d))
    return f" (by {lo:.3f})" if f"{lo:.3f}" == f"{hi:.3f}" else f" (by {lo:.3f} to {hi:.3f})"


def statement(cmp: dict | None, a: str, b: str) -> str:
    """The sentence the study prints about A against B, derived from `compare_frontiers`."""
    if cmp is None:
        return (f"{a} vs {b}: no comparison made: no KL range is covered by every seed's curve of both "
                "(each needs two or more settings, and the seeds' KL ranges must overlap).")
    lo, hi = cmp["kl_range"]
    m, (mlo, mhi) = cmp["mean_difference"], cmp["mean_difference_ci95"]
    head = (f"{a} vs {b} over KL {lo:.2f}–{hi:.2f} nats per sequence, where both have points in every seed "
            f"({cmp['seeds']} seeds; 95% t-intervals over seeds): ")
    overall = {"higher": f"{a}'s reward is higher than {b}'s by {m:.3f} [{mlo:.3f}, {mhi:.3f}] on average",
               "lower": f"{a}'s reward is lower than {b}'s by {-m:.3f} [{-mhi:.3f}, {-mlo:.3f}] on average",
               "none": f"no difference detectable on average ({a} − {b} = {m:.3f} [{mlo:.3f}, {mhi:.3f}])"}
    segments, grid = [], cmp["grid"]
    for i, ci in enumerate(cmp["difference_ci95"]):
        v = _verdict(ci)
        if segments and segments[-1][0] == v:
            segments[-1][2], segments[-1][3] = grid[i], segments[-1][3] + [cmp["difference"][i]]
        else:
            segments.append([v, grid[i], grid[i], [cmp["difference"][i]]])
    words = {"higher": f"{a} higher", "lower": f"{a} lower", "none": "no difference detectable"}
    span = lambda s, e: f"{s:.2f}" if f"{s:.2f}" == f"{e:.2f}" else f"{s:.2f}–{e:.2f}"  # noqa: E731
    parts = [f"{words[v]} at KL {span(s, e)}" + ("" if v == "none" else _by(d)) for v, s, e, d in segments]
    return head + overall[_verdict([mlo, mhi])] + "; level by level: " + "; ".join(parts) + "."
