"""How noisy are a preference set's labels? The label-flip rate eps estimated from what the data shows.

The model (the one cDPO and robust DPO assume, Mitchell 2023; Chowdhury et al. 2024): every stored label
is the true preference flipped with probability eps, independently. Two sources see eps, and a
judge's order inconsistency is reported beside them as a diagnostic:

- duplicates: the same prompt and the same two answers labelled more than once. Two independent labels of
  one pair disagree with probability q = 2 eps (1 - eps) (one flipped, the other not), so the share of
  disagreeing comparisons estimates q and eps = (1 - sqrt(1 - 2q)) / 2 (the root below 1/2).
- order_inconsistency (a diagnostic, never combined): how often a pairwise judge's A/B and B/A verdicts
  disagree. It is not the flip rate of the labels the judge writes: `prefalign label` averages the two
  orders' probabilities, so position bias moves both orders alike and rarely changes the label, while an
  error in how the judge reads the content is shared by both orders and invisible to the swap. It
  measures how often the content margin is smaller than the position bias; a judge's flip rate needs gold labels.
- reward_model: a reference reward model's disagreement d with the labels. If the model errs with
  probability delta, independently of the flips, d = eps + delta - 2 eps delta: d alone is an upper
  bound of eps (for eps, delta < 1/2), and with a measured accuracy 1 - delta, eps = (d - delta) / (1 - 2 delta).

Combining (`combine`): by provenance, not by the narrowest interval (a degenerate source, pinned at 1/2
or near 0, has a narrow one): duplicates first, then a reward model whose accuracy was measured on a
stated number of pairs; a source whose disagreement is beyond chance is excluded; upper bounds clip the
interval and flag a conflict when the estimate lies above them, as do two estimates that do not overlap.

Intervals: Wilson's score interval (Wilson 1927) for the binomial share, mapped through the transform,
which is increasing, so the mapped interval keeps its coverage. Comparisons must be independent: a group
of n labels of one pair gives floor(n/2) disjoint comparisons (labels 1-2, 3-4, ...), never the
n(n-1)/2 overlapping ones. Copies of one annotation (a file concatenated twice) agree by construction
and pull the duplicate estimate down: it assumes repeated labels were given independently.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

from .hashtable import U64Table

Z95 = NormalDist().inv_cdf(1 - 0.05 / 2)  # two-sided 95%: the standard normal's 97.5% quantile, 1.95996
# two-sided 97.5% (Bonferroni): the deconvolved reward-model interval combines two intervals, each at 97.5%,
# so that both hold, and with them the combined one, with probability at least 95%
Z975 = NormalDist().inv_cdf(1 - 0.025 / 2)
# the largest eps training uses: robust DPO's loss is divided by 1 - 2 eps, which has no bound as eps -> 1/2
EPS_CAP = 0.45


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for a binomial proportion k/n (Wilson 1927, eq. for p at given z)."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n > 0, got k={k}, n={n}")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def flip_from_disagreement(q: float) -> float:
    """eps with 2 eps (1 - eps) = q, the root in [0, 1/2]; q >= 1/2 (no agreement beyond chance) gives 1/2."""
    return 0.5 * (1 - math.sqrt(max(0.0, 1 - 2 * q)))


@dataclass(frozen=True)
class Estimate:
    """One source's estimate of eps: `flip_rate` in [`low`, `high`] (95%), from `disagreements` of
    `comparisons`. `bound` says what it is: "estimate"; "upper" (an upper bound only); "point" (its interval
    leaves out an uncertainty it depends on: not chosen); "diagnostic" (not an estimate of eps, never chosen:
    `flip_rate` holds its disagreement share, written as `share` in JSON)."""

    source: str
    flip_rate: float
    low: float
    high: float
    comparisons: int
    disagreements: int
    bound: str = "estimate"
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        # a diagnostic's figure is a share of disagreeing comparisons, not a flip rate: named for what it is
        return {"source": self.source, "share" if self.bound == "diagnostic" else "flip_rate": round(self.flip_rate, 5),
                "low": round(self.low, 5),
                "high": round(self.high, 5), "comparisons": self.comparisons, "disagreements": self.disagreements,
                "bound": self.bound, **({"note": self.note} if self.note else {})}


def from_disagreements(disagreements: int, comparisons: int, source: str, note: str = "") -> Estimate:
    """eps from k of n independent comparisons of two labels of one pair that disagree (duplicates, judge order)."""
    lo, hi = wilson(disagreements, comparisons)
    return Estimate(source, flip_from_disagreement(disagreements / comparisons), flip_from_disagreement(lo),
                    flip_from_disagreement(hi), comparisons, disagreements, note=note)


def from_reward_model(disagreements: int, pairs: int, accuracy: float | None = None,
                      accuracy_pairs: int | None = None) -> Estimate:
    """eps from a reference reward model that prefers the rejected answer on `disagreements` of `pairs`.

    Without `accuracy`: d itself, an upper bound of eps (the model's own errors add to it). With the model's
    accuracy 1 - delta measured on clean pairs (`accuracy_pairs` of them: its Wilson interval enters too),
    eps = (d - delta) / (1 - 2 delta), which falls with delta and rises with d: the low end takes d's low
    and delta's high end, the high end the reverse, each at 97.5% so that the two hold jointly at >= 95%
    (Bonferroni). Without `accuracy_pairs` the accuracy's own uncertainty is unknown: a `point`, reported only."""
    d = disagreements / pairs
    if accuracy is None:
        d_lo, d_hi = wilson(disagreements, pairs)
        return Estimate("reward_model", min(d, 0.5), min(d_lo, 0.5), min(d_hi, 0.5), pairs, disagreements,
                        bound="upper", note="the reward model's disagreement with the labels: eps plus its own error")
    delta = 1 - accuracy
    if not 0 <= delta < 0.5:
        raise ValueError(f"a reward model's accuracy must be in (0.5, 1], got {accuracy}")
    if accuracy_pairs:
        d_lo, d_hi = wilson(disagreements, pairs, Z975)
        a_lo, a_hi = wilson(round(accuracy * accuracy_pairs), accuracy_pairs, Z975)
        delta_lo, delta_hi = 1 - a_hi, min(1 - a_lo, 0.4999)
    else:
        d_lo, d_hi = wilson(disagreements, pairs)
        delta_lo = delta_hi = delta

    def deconvolve(d_: float, delta_: float) -> float:
        return min(0.5, max(0.0, (d_ - delta_) / (1 - 2 * delta_)))

    note = f"deconvolved with the reward model's accuracy {accuracy:g}" + (
        f" on {accuracy_pairs} pairs (each interval at 97.5%: jointly >= 95%)" if accuracy_pairs
        else " taken as exact: its uncertainty is left out, so not chosen (give the pairs it was measured on)")
    return Estimate("reward_model", deconvolve(d, delta), deconvolve(d_lo, delta_hi), deconvolve(d_hi, delta_lo),
                    pairs, disagreements, bound="estimate" if accuracy_pairs else "point", note=note)


@dataclass
class DuplicateComparisons:
    """Streams labels (curate.identity of each pair: its key and which answer it prefers); for each prompt +
    answer pair seen more than once, compares its labels two at a time (1-2, 3-4, ...): `comparisons`
    independent comparisons, `disagreements` of them conflicting."""

    comparisons: int = 0
    disagreements: int = 0
    repeated: int = 0  # records whose prompt + answers were seen before
    waiting: U64Table = field(default_factory=U64Table)  # key -> 1 + orientation of a label awaiting its partner

    def observe(self, key: int, orient: bool) -> None:
        """One label of the pair `key` (curate.identity): `orient` says which answer it prefers."""
        before = self.waiting.setdefault(key, 1 + int(orient))
        if before is None:
            return
        self.repeated += 1
        if before == 0:  # the previous comparison of this pair is complete: this label waits for a partner
            self.waiting.set(key, 1 + int(orient))
            return
        self.comparisons += 1
        self.disagreements += before - 1 != int(orient)
        self.waiting.set(key, 0)

    def estimate(self) -> Estimate | None:
        if not self.comparisons:
            return None
        return from_disagreements(self.disagreements, self.comparisons, "duplicates",
                                  note="assumes repeated labels were given independently")


PROVENANCE = ("duplicates", "reward_model")  # the order sources are trusted in: the data's own repeats first
RULE = ("by provenance: duplicates, then a reward model with an accuracy measured on stated pairs; sources "
        "beyond chance excluded; high clipped to the tightest upper bound; diagnostics and points not chosen")


def combine(estimates: Iterable[Estimate | None]) -> dict[str, Any] | None:
    """The estimate to use, chosen by provenance (PROVENANCE), not by the narrowest interval: a degenerate
    source (pinned at 1/2, or near 0 from copies) has a narrow one. A proper estimate whose low end is 1/2
    (disagreement beyond chance) is excluded, with why. Upper bounds clip `high`; an estimate whose low end
    is above a bound, or two proper estimates whose intervals do not overlap, set `conflict` (the interval
    is then the union). Only upper bounds: the tightest is reported as one. Nothing usable: `flip_rate`
    null with the sources and exclusions listed; no source at all: None. Sources are never pooled."""
    given = [e for e in estimates if e is not None]
    if not given:
        return None
    excluded = [{"source": e.source, "why": "disagreement beyond chance (its 95% interval's low end is 1/2): the "
                 "labels carry no information this source can see"} for e in given
                if e.bound == "estimate" and e.low >= 0.5]
    excluded += [{"source": e.source, "why": "a diagnostic, not an estimate of the labels' flip rate"
                  if e.bound == "diagnostic" else "its interval leaves out an uncertainty (a point): not chosen"}
                 for e in given if e.bound in ("diagnostic", "point")]
    proper = sorted((e for e in given if e.bound == "estimate" and e.low < 0.5),
                    key=lambda e: (PROVENANCE.index(e.source) if e.source in PROVENANCE else len(PROVENANCE),
                                   e.high - e.low))
    uppers = sorted((e for e in given if e.bound == "upper"), key=lambda e: e.high)
    out: dict[str, Any] = {"flip_rate": None, "low": None, "high": None, "source": None, "bound": None,
                           "conflict": False, "sources": [e.to_json() for e in given], "excluded": excluded,
                           "rule": RULE}
    if not proper and not uppers:
        return out
    chosen = (proper or uppers)[0]
    flip, low, high = chosen.flip_rate, chosen.low, chosen.high
    overlap = all(a.low <= b.high and b.low <= a.high for a in proper for b in proper)
    if not overlap:
        low, high = min(e.low for e in proper), max(e.high for e in proper)
    if proper and uppers:
        if low > uppers[0].high:  # the estimate sits above what a bound allows: one of the two models is wrong
            overlap = False
        else:
            high = min(high, uppers[0].high)
            flip = min(flip, high)
    out.update(flip_rate=round(flip, 5), low=round(low, 5), high=round(high, 5), source=chosen.source,
               bound=chosen.bound, conflict=not overlap)
    return out


# what practitioners call enough pairs for one domain: issue 17's figure, ~10k pairs; the same order is
# given by theneuralbase.com's "Dataset size needs" (5,000-10,000 pairs for meaningful gains) and
# OpenPipe's DPO quick start (at least 500 rows before a first run). Rules of thumb, not measurements.
ENOUGH_PAIRS = 10_000
MINIMUM_PAIRS = 500


def readiness(stats: dict[str, Any]) -> dict[str, Any]:
    """A preference set's readiness summary from `prefalign data stats`' counts: its size against the field's
    rules of thumb, ties, length bias, duplicates and the estimated label noise, each as a figure with what
    it is compared with. Facts, not a verdict: a smaller set of clean pairs may do better than a large noisy one."""
    pairs, noise = stats.get("pairs") or 0, stats.get("noise")
    share = stats.get("chosen_longer_share")
    size = ("enough for a domain by the field's rule of thumb" if pairs >= ENOUGH_PAIRS
            else "small: under the ~10k pairs the field considers enough for a domain" if pairs >= MINIMUM_PAIRS
            else "under the ~500-pair minimum practitioners give for a first DPO run")
    return {
        "pairs": pairs, "enough_pairs": ENOUGH_PAIRS, "size": size,
        "ties": stats.get("ties", 0),
        "length_bias": share,  # 0.5 is none: the chosen answer longer as often as not
        "duplicates": stats.get("duplicates", 0), "conflicts": stats.get("conflicts", 0),
        "noise": None if noise is None else {k: noise[k] for k in ("flip_rate", "low", "high", "source", "bound")},
    }


def describe_noise(noise: dict[str, Any] | None) -> str:
    """One line for `data stats`' table: the estimate used, then every source's."""
    if noise is None:
        return "not estimated: no source could (no repeated prompt + answer pair; no judge or reward model given)"

    def one(e: dict[str, Any]) -> str:
        upper = {"upper": "≤ ", "diagnostic": "share "}.get(e["bound"], "")
        figure = e.get("flip_rate", e.get("share"))
        return f"{e['source']} {upper}{figure:.3f} [{e['low']:.3f}, {e['high']:.3f}] ({e['comparisons']} cmp)"

    sources = "; sources: " + "; ".join(one(e) for e in noise["sources"]) + "".join(
        f"; {x['source']} excluded: {x['why']}" for x in noise.get("excluded", []))
    if noise["flip_rate"] is None:
        return "not estimated: no usable source" + sources
    upper = "≤ " if noise["bound"] == "upper" else ""
    conflict = " (CONFLICT: the sources disagree; the union interval)" if noise.get("conflict") else ""
    return (f"label-flip rate {upper}{noise['flip_rate']:.3f}, 95% [{noise['low']:.3f}, {noise['high']:.3f}], "
            f"from {noise['source']}{conflict}" + sources)


def describe_readiness(r: dict[str, Any]) -> str:
    bias = "-" if r["length_bias"] is None else f"{r['length_bias']:.2f}"
    return (f"{r['pairs']} pairs: {r['size']} (~{r['enough_pairs']}); {r['ties']} ties; chosen longer in {bias} "
            f"of pairs (0.5: no length bias); {r['duplicates']} duplicates, {r['conflicts']} conflicting")


def order_inconsistency(disagreements: int, comparisons: int) -> Estimate:
    """A pairwise judge's order inconsistency: the share of `comparisons` pairs whose A/B and B/A verdicts
    disagree, as a `diagnostic` (the module docstring says why it is not the written labels' flip rate).
    `flip_rate`, `low` and `high` are that share and its Wilson interval, untransformed."""
    lo, hi = wilson(disagreements, comparisons)
    return Estimate("order_inconsistency", disagreements / comparisons, lo, hi, comparisons, disagreements,
                    bound="diagnostic", note="how often the judge's two presentation orders disagree (content "
                    "margin below its position bias); not a flip rate: that needs gold labels")
