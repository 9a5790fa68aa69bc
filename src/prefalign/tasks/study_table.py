"""The sentiment study's summaries: per-setting means over seeds, collapse flags, frontier statements,
study.md and the frontier plot. Pure functions of the rows `study.run_study` collects."""

from __future__ import annotations

from pathlib import Path

from ..runtime.plotting import pyplot
from .seeds import compare_frontiers, mean_ci, statement

COMPARED = [("dpo", "ppo"), ("ipo", "ppo"), ("dpo (iterative)", "ppo")]  # (A, B): A's reward minus B's at equal KL


def flag_collapse(rows: list[dict], fraction: float) -> None:
    """Mark each run whose mean completion length is below FRACTION x the base's (same seed): PPO can
    learn to end early when the reward or the KL favours short answers, and such points are not a
    fair place on the frontier."""
    base = {r["seed"]: r["mean_length"] for r in rows if r["run"] == "base"}
    for r in rows:
        r["collapsed"] = r["run"] != "base" and r["mean_length"] < fraction * base[r["seed"]]


def aggregate(rows: list[dict]) -> list[dict]:
    """One row per setting, in the order they ran: mean and 95% t-interval over seeds."""
    names = list(dict.fromkeys(r["run"] for r in rows))
    out = []
    for name in names:
        rs = [r for r in rows if r["run"] == name]
        reward, reward_ci = mean_ci([r["reward_mean"] for r in rs])
        kl, kl_ci = mean_ci([r["kl_per_sequence"] for r in rs])
        row = {"run": name, "method": rs[0]["method"], "setting": rs[0]["setting"], "seeds": len(rs),
               "reward_mean": reward, "reward_ci95": reward_ci, "kl_per_sequence": kl, "kl_ci95": kl_ci,
               "mean_length": mean_ci([r["mean_length"] for r in rs])[0],
               "collapsed": sum(r["collapsed"] for r in rs)}
        for kind in ("train", "end_to_end"):
            costs = [r[kind] for r in rs if r[kind]]
            row[kind] = None if not costs else {  # seconds: mean over seeds; peak: the largest seed's
                "seconds": mean_ci([c["seconds"] for c in costs])[0],
                "peak_rss_bytes": max(c["peak_rss_bytes"] for c in costs)}
        out.append(row)
    return out


def frontier_points(rows: list[dict]) -> dict[str, dict[int, list[tuple[float, float]]]]:
    """method -> seed -> [(KL per sequence, reward)] of its runs: the curves `compare_frontiers` reads."""
    points: dict[str, dict[int, list[tuple[float, float]]]] = {}
    for r in rows:
        points.setdefault(r["method"], {}).setdefault(r["seed"], []).append((r["kl_per_sequence"], r["reward_mean"]))
    return points


def frontier_statements(rows: list[dict]) -> dict[str, dict]:
    points = frontier_points(rows)
    out = {}
    for a, b in COMPARED:
        if a in points and b in points:
            cmp = compare_frontiers(points[a], points[b])
            collapsed = sum(r["collapsed"] for r in rows if r["method"] in (a, b))
            note = f" ({collapsed} of these runs are flagged length-collapsed.)" if collapsed else ""
            out[f"{a} vs {b}"] = {"statement": statement(cmp, a.upper(), b.upper()) + note, "comparison": cmp}
    return out


def _ci(mean: float, ci: list[float] | None, digits: int) -> str:
    return f"{mean:.{digits}f}" + ("" if ci is None else f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]")


def markdown(summary: dict) -> str:
    n = len(summary["seeds"])
    lines = [
        f"Evaluated on the **{summary['split']}** prefixes; {n} seeds ({', '.join(map(str, summary['seeds']))}); "
        'mean [95% t-interval over seeds]. Costs: docs/benchmarks.md, "How costs are counted" (seconds: mean over '
        "seeds; peak: the largest seed's).",
        "",
        "| run | method | beta / kl_coef / round | reward | KL/seq | length | collapsed | train s | train peak MiB | "
        "end-to-end s | end-to-end peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["settings"]:
        cost = []
        for kind in ("train", "end_to_end"):
            c = r[kind]
            cost += ["-", "-"] if c is None else [f"{c['seconds']:.0f}", f"{c['peak_rss_bytes'] / 2**20:.0f}"]
        flag = f"**{r['collapsed']}/{r['seeds']}**" if r["collapsed"] else "-"
        lines.append(f"| {r['run']} | {r['method']} | {r['setting'] if r['setting'] is not None else '-'} | "
                     f"{_ci(r['reward_mean'], r['reward_ci95'], 3)} | {_ci(r['kl_per_sequence'], r['kl_ci95'], 2)} | "
                     f"{r['mean_length']:.1f} | {flag} | " + " | ".join(cost) + " |")
    lines += ["", f"collapsed: runs (of {n}) whose mean completion length fell below "
              f"{summary['config']['collapse_fraction']:g} x the base's.", ""]
    lines += [f"- {s['statement']}" for s in summary["frontier"].values()]
    lines.append(f"\nWhole study {summary['seconds']:.0f} s; every run of every seed in study.json.")
    return "\n".join(lines) + "\n"


def _errors(pts: list[dict], key: str, means: list[float]) -> list[list[float]]:
    """matplotlib's asymmetric error bars from intervals (none from a single seed)."""
    cis = [s[key] or [m, m] for s, m in zip(pts, means, strict=True)]
    return [
        [m - ci[0] for ci, m in zip(cis, means, strict=True)],
        [ci[1] - m for ci, m in zip(cis, means, strict=True)],
    ]


def plot_frontier(settings: list[dict], path: Path, split: str) -> None:
    """Mean reward against mean KL per setting, 95% intervals over seeds as error bars."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(s["method"] for s in settings):
        # a sweep is drawn in order of KL; the iterative arm in order of its rounds
        order = (lambda s: s["setting"]) if "iterative" in method else (lambda s: s["kl_per_sequence"])
        pts = sorted((s for s in settings if s["method"] == method), key=order)
        x, y = [s["kl_per_sequence"] for s in pts], [s["reward_mean"] for s in pts]
        bars = ax.errorbar(x, y, xerr=_errors(pts, "kl_ci95", x), yerr=_errors(pts, "reward_ci95", y), marker="o",
                           capsize=3, label=method)
        for s in pts:
            if s["collapsed"]:
                ax.annotate("collapsed", (s["kl_per_sequence"], s["reward_mean"]), fontsize=7,
                            color=bars[0].get_color())
    ax.set_xlabel("exact KL to the base per sequence (nats)")
    ax.set_ylabel(f"VADER reward on the {split} prefixes")
    ax.set_title("reward vs KL: mean over seeds, 95% t-intervals")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
