"""The audit's arithmetic and its verdict: pure functions of the per-seed figures `tasks/audit.py` collects.

Choosing (`choose`): on the validation prefixes only. An arm's *best* setting is the one with the
highest validation reward; its *matched* setting the one with the highest validation reward among
those whose validation KL is at most K, where K is the config's `matched_kl` or, by default, the
smallest KL at which every arm has a setting (the largest of the arms' smallest KLs).

Comparing (`paired`): on the test prefixes, seed by seed. For a ratio A/B (DPO's device-hours over
PPO's, say) each seed gives one ratio (A and B of that seed share its prompts and sampling draws);
the figure is their geometric mean with a 95% Student-t interval over seeds taken on log(A/B) and
exponentiated (tasks/seeds.py), so a ratio of positive figures has a positive interval (a t-interval
on three ratios themselves went below 0). A ratio's direction is "less" (interval below 1), "more"
(above 1) or "not detectably different" (it includes 1). A reward ratio is given only where both
rewards are above 0 in every seed and B's t-interval over seeds excludes 0 (VADER's scale has 0 in the
middle: a ratio to a reward near or below 0 swings without bound); the reward difference is always given.
A difference's direction is "higher", "lower" or "not detectably different" (its interval holds 0).

The verdict (`verdict`) is built only from `figures`, a flat dict of rounded numbers that audit.json
keeps under `verdict.figures`, through the phrase templates below (`cost_phrase`, `kl_phrase`): every
number in the text is one of them, next to its own label (tests/test_audit.py checks). Its second
sentence compares each arm's highest-reward setting with *validation* KL ≤ K: the test KLs can differ
and exceed K, so it prints their difference and says when one is above K.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .seeds import mean_ci

CONFIDENCE = 95


def _r(x: float | None, digits: int) -> float | None:
    return None if x is None else round(float(x), digits)


def _rci(ci: Sequence[float] | None, digits: int) -> list[float] | None:
    return None if ci is None else [round(float(c), digits) for c in ci]


def choose(sweep: list[dict], matched_kl: float | None = None) -> dict:
    """sweep: rows {arm, setting, reward_mean, kl_per_sequence} on the validation prefixes (one seed).
    Returns {"matched_kl": K, "arms": {arm: {"best": setting, "matched": setting | None, "reason": str}}}."""
    arms = list(dict.fromkeys(r["arm"] for r in sweep))
    k = matched_kl if matched_kl is not None else max(min(r["kl_per_sequence"] for r in sweep if r["arm"] == a)
                                                      for a in arms)
    out = {}
    for arm in arms:
        rows = [r for r in sweep if r["arm"] == arm]
        best = max(rows, key=lambda r: r["reward_mean"])
        within = [r for r in rows if r["kl_per_sequence"] <= k]
        matched = max(within, key=lambda r: r["reward_mean"]) if within else None
        reason = (f"best: highest validation reward {best['reward_mean']:.3f} (KL {best['kl_per_sequence']:.2f}) "
                  f"of {len(rows)} settings; matched: ")
        reason += (f"highest validation reward {matched['reward_mean']:.3f} among the {len(within)} with validation "
                   f"KL <= {k:.2f}" if matched else f"none of its settings had validation KL <= {k:.2f}")
        out[arm] = {"best": best["setting"], "matched": matched["setting"] if matched else None, "reason": reason}
    return {"matched_kl": k, "arms": out}


def paired(a: dict[int, float], b: dict[int, float], kind: str, centred: bool = False) -> dict | None:
    """A against B over the seeds both have: kind "ratio" (A/B) or "difference" (A − B); mean, 95% t-interval.
    `centred`: B is on a scale with 0 inside it (a reward), so a ratio needs B clearly above 0; a cost
    (seconds, bytes, joules) is positive in every seed, so its ratio is always defined."""
    seeds = sorted(set(a) & set(b))
    if not seeds or any(a[s] is None or b[s] is None for s in seeds):
        return None
    if kind == "ratio":
        # a ratio to a value whose interval over seeds reaches 0 (a reward on a scale centred on 0; a
        # reward barely above it) swings without bound: then only the difference is given
        floor = mean_ci([b[s] for s in seeds])[1]
        if any(b[s] <= 0 for s in seeds) or (centred and floor is not None and floor[0] <= 0):
            return None
        if any(a[s] <= 0 for s in seeds):  # a reward at or below 0: no log, no ratio
            return None
        values = [a[s] / b[s] for s in seeds]
        mean, ci = mean_ci([math.log(v) for v in values])
        return {"mean": math.exp(mean), "ci95": None if ci is None else [math.exp(c) for c in ci],
                "per_seed": values, "seeds": seeds}
    values = [a[s] - b[s] for s in seeds]
    mean, ci = mean_ci(values)
    return {"mean": mean, "ci95": ci, "per_seed": values, "seeds": seeds}


COST_KEYS = ("device_hours", "peak_memory_bytes", "usd", "energy_joules")


def compare(a: dict[int, dict], b: dict[int, dict]) -> dict:
    """Two arms' test rows by seed (same choice): reward ratio and difference, win-rate and KL difference,
    and the ratio of each end-to-end cost."""
    get = lambda rows, key: {s: r.get(key) for s, r in rows.items()}  # noqa: E731
    out = {"reward_ratio": paired(get(a, "reward_mean"), get(b, "reward_mean"), "ratio", centred=True),
           "reward_difference": paired(get(a, "reward_mean"), get(b, "reward_mean"), "difference"),
           "win_rate_difference": paired(get(a, "win_rate"), get(b, "win_rate"), "difference"),
           "kl_difference": paired(get(a, "kl_per_sequence"), get(b, "kl_per_sequence"), "difference")}
    for key in COST_KEYS:
        out[f"{key}_ratio"] = paired(get(a, key), get(b, key), "ratio")
    return out


def _direction(ci: list[float] | None, mean: float) -> str:
    """A difference's side of 0: "higher", "lower", or "not detectably different" (the interval holds 0)."""
    if ci is None:
        return "higher" if mean > 0 else "lower" if mean < 0 else "equal"
    return "higher" if ci[0] > 0 else "lower" if ci[1] < 0 else "not detectably different"


def _ratio_direction(ci: list[float] | None, mean: float) -> str:
    """A ratio's side of 1: "less", "more", or "not detectably different" (the interval holds 1)."""
    lo, hi = ci if ci is not None else (mean, mean)
    return "less" if hi < 1 else "more" if lo > 1 else "not detectably different"


# the verdict's phrases: figure key -> the words printed after its number (tests/test_audit.py writes
# each label out again and checks the number next to it is its key's)
RATIOS = (("reward_ratio", "reward_pct"), ("device_hours_ratio", "device_hours_pct"),
          ("peak_memory_bytes_ratio", "peak_memory_pct"), ("usd_ratio", "usd_pct"),
          ("energy_joules_ratio", "energy_pct"))
COST_WORDS = (("device_hours_pct", "of its device-hours"), ("peak_memory_pct", "of its peak memory"),
              ("usd_pct", "of its cost in money"), ("energy_pct", "of its measured energy"))
ONE_PRICE = ", so of its cost in money at one price per device-hour"


def _difference(f: dict, name: str, c: dict | None, digits: int) -> None:
    f[name] = _r(c["mean"], digits) if c else None
    f[name + "_ci95"] = _rci(c["ci95"], digits) if c else None
    f[name + "_direction"] = _direction(c["ci95"], c["mean"]) if c else None


def figures(a: str, b: str, best: dict, matched: dict | None, k: float, kls: dict | None, n_seeds: int) -> dict:
    """The verdict's numbers, rounded as printed: best/matched are `compare` results of arm A against B;
    kls: the matched settings' mean test KL per arm ({"a", "b"})."""
    f: dict = {"a": a, "b": b, "seeds": n_seeds, "confidence": CONFIDENCE}
    for key, name in RATIOS:
        c = best.get(key)
        f[name] = _r(100 * c["mean"], 1) if c else None
        f[name + "_ci95"] = _rci([100 * x for x in c["ci95"]], 1) if c and c["ci95"] else None
        f[name + "_direction"] = _ratio_direction(c["ci95"], c["mean"]) if c else None
    # every stage priced at one rate per device-hour: money's ratio is device-hours', said once, not twice
    f["one_price"] = f["usd_pct"] is not None and (f["usd_pct"], f["usd_pct_ci95"]) == (f["device_hours_pct"],
                                                                                      f["device_hours_pct_ci95"])
    _difference(f, "reward_difference", best.get("reward_difference"), 3)
    _difference(f, "kl_difference", best.get("kl_difference"), 2)
    f["matched_kl"] = _r(k, 2)
    m = matched.get("reward_difference") if matched else None
    if m is not None:
        f["matched_direction"] = _direction(m["ci95"], m["mean"])
        f["matched_gap"] = _r(abs(m["mean"]), 3)
        f["matched_difference_ci95"] = _rci(m["ci95"], 3)
        f["matched_kl_a"], f["matched_kl_b"] = _r(kls["a"], 2), _r(kls["b"], 2)
        _difference(f, "matched_kl_difference", matched.get("kl_difference"), 2)
    return f


def _ci(ci: list[float] | None) -> str:
    return "" if ci is None else f" [{ci[0]}, {ci[1]}]"


def cost_phrase(f: dict, key: str, words: str) -> str:
    """"88.8% [84.2, 93.4] of its peak memory (less)": the figure KEY, its interval, its words, its direction."""
    return f"{f[key]}%{_ci(f[key + '_ci95'])} {words} ({f[key + '_direction']})"


def kl_phrase(f: dict, key: str) -> str:
    """A's test KL to the base minus B's, in nats per sequence, with its interval and side of 0."""
    return (f"{f['a']}'s test KL to the base minus {f['b']}'s was {f[key]}{_ci(f[key + '_ci95'])} nats per "
            f"sequence ({f[key + '_direction']})")


def _best_sentence(f: dict) -> str:
    a, b, n, c = f["a"], f["b"], f["seeds"], f["confidence"]
    words = dict(COST_WORDS)
    if f.get("one_price"):
        words["device_hours_pct"] += ONE_PRICE
        del words["usd_pct"]
    costs = [cost_phrase(f, key, w) for key, w in words.items() if f.get(key) is not None]
    at = (" at " + ", ".join(costs)) if costs else ""
    kl = f"; {kl_phrase(f, 'kl_difference')}" if f.get("kl_difference") is not None else ""
    tail = f" (best settings, test prefixes, {n} seeds, {c}% intervals over seeds; ratios: geometric means"
    if f.get("reward_pct") is not None:
        reward = cost_phrase(f, "reward_pct", f"of {b}'s best reward")
        return f"{a} reached {reward}{at}{kl}{tail})."
    return (f"{a}'s best reward minus {b}'s best was {f['reward_difference']}{_ci(f['reward_difference_ci95'])} "
            f"({f['reward_difference_direction']}){at}{kl}{tail}; no reward ratio: {b}'s reward is not clearly "
            f"above 0 over the seeds, or {a}'s is not above 0).")


def _matched_sentence(f: dict) -> str:
    a, b, k = f["a"], f["b"], f["matched_kl"]
    head = f"Each arm's highest-reward setting with validation KL ≤ {k}"
    if f.get("matched_direction") is None:
        return f"{head}: no comparison (an arm had no setting within it on the validation prefixes)."
    d = f["matched_direction"]
    how = (f"{a}'s reward was {d} than {b}'s by {f['matched_gap']}" if d in ("higher", "lower")
           else f"{a}'s reward was not detectably different from {b}'s (gap {f['matched_gap']})")
    over = [name for name, kl in ((a, f["matched_kl_a"]), (b, f["matched_kl_b"])) if kl > k]
    note = (f"; on the test prefixes {' and '.join(over)}'s KL exceeded {k}, so the KLs are not matched"
            if over else "")
    kl = f"; {kl_phrase(f, 'matched_kl_difference')}" if f.get("matched_kl_difference") is not None else ""
    return (f"{head}: {how} (difference{_ci(f['matched_difference_ci95'])}; test KL {f['matched_kl_a']} vs "
            f"{f['matched_kl_b']}{kl}{note}).")


def verdict(f: dict) -> list[str]:
    """The verdict's sentences, from `figures` only (swap A and B's figures and the words follow)."""
    return [_best_sentence(f), _matched_sentence(f)]
