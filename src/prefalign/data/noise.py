"""How noisy are a preference set's labels? The label-flip rate eps estimated from what the data shows.

The model (the one cDPO and robust DPO assume, Mitchell 2023; Chowdhury et al. 2024): every stored label
is the true preference flipped with probability eps, independently. Three sources see eps:

- duplicates: the same prompt and the same two answers labelled more than once. Two independent labels of
  one pair disagree with probability q = 2 eps (1 - eps) (one flipped, the other not), so the share of
  disagreeing comparisons estimates q and eps = (1 - sqrt(1 - 2q)) / 2 (the root below 1/2).
- judge_order: a pairwise judge asked in both presentation orders (A/B, then B/A). Each order's verdict is
  a label with the judge's flip rate; the two disagree with probability 2 eps (1 - eps): the same
  transform. It measures the noise of labels that judge wrote (`prefalign label`), position bias included.
- reward_model: a reference reward model's disagreement d with the labels. If the model errs with
  probability delta, independently of the flips, d = eps + delta - 2 eps delta: d alone is an upper
  bound of eps (for eps, delta < 1/2), and with a measured accuracy 1 - delta, eps = (d - delta) / (1 - 2 delta).

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
from typing import Any

from .hashtable import U64Table

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: two-sided 95%
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
    `comparisons`. `bound` says what it is: "estimate", or "upper" (an upper bound only)."""

    source: str
    flip_rate: float
    low: float
    high: float
    comparisons: int
    disagreements: int
    bound: str = "estimate"
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "flip_rate": round(self.flip_rate, 5), "low": round(self.low, 5),
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
    and delta's high end, the high end the reverse (each a 95% interval: jointly at least 90%)."""
    d_lo, d_hi = wilson(disagreements, pairs)
    d = disagreements / pairs
    if accuracy is None:
        return Estimate("reward_model", min(d, 0.5), min(d_lo, 0.5), min(d_hi, 0.5), pairs, disagreements,
                        bound="upper", note="the reward model's disagreement with the labels: eps plus its own error")
    delta = 1 - accuracy
    if not 0 <= delta < 0.5:
        raise ValueError(f"a reward model's accuracy must be in (0.5, 1], got {accuracy}")
    if accuracy_pairs:
        correct = round(accuracy * accuracy_pairs)
        a_lo, a_hi = wilson(correct, accuracy_pairs)
        delta_lo, delta_hi = 1 - a_hi, min(1 - a_lo, 0.4999)
    else:
        delta_lo = delta_hi = delta

    def deconvolve(d_: float, delta_: float) -> float:
        return min(0.5, max(0.0, (d_ - delta_) / (1 - 2 * delta_)))

    return Estimate("reward_model", deconvolve(d, delta), deconvolve(d_lo, delta_hi), deconvolve(d_hi, delta_lo),
                    pairs, disagreements, note=f"deconvolved with the reward model's accuracy {accuracy:g}"
                    + (f" on {accuracy_pairs} pairs" if accuracy_pairs else " (taken as exact)"))


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


def combine(estimates: Iterable[Estimate | None]) -> dict[str, Any] | None:
    """The estimate to use: the narrowest interval among those that estimate eps (duplicates, judge order,
    a reward model with a measured accuracy); an upper bound alone is used only when nothing else is, and
    then says so. Sources are not pooled: each may measure a different labeller (the judge's noise is the
    data's only when that judge wrote the labels). None when there is no estimate at all."""
    given = [e for e in estimates if e is not None]
    if not given:
        return None
    proper = [e for e in given if e.bound == "estimate"]
    chosen = min(proper or given, key=lambda e: (e.high - e.low, e.source))
    return {"flip_rate": round(chosen.flip_rate, 5), "low": round(chosen.low, 5), "high": round(chosen.high, 5),
            "source": chosen.source, "bound": chosen.bound, "sources": [e.to_json() for e in given],
            "rule": "the narrowest 95% interval among the estimates; upper bounds only when nothing else is given"}


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
        "noise": None if noise is None else {k: noise[k] for k in ("flip_rate", "low", "high", "source")},
    }


def describe_noise(noise: dict[str, Any] | None) -> str:
    """One line for `data stats`' table: the estimate used, then every source's."""
    if noise is None:
        return "not estimated: no source could (no repeated prompt + answer pair; no judge or reward model given)"

    def one(e: dict[str, Any]) -> str:
        upper = "<= " if e["bound"] == "upper" else ""
        return f"{e['source']} {upper}{e['flip_rate']:.3f} [{e['low']:.3f}, {e['high']:.3f}] ({e['comparisons']} cmp)"

    return (f"label-flip rate {noise['flip_rate']:.3f}, 95% [{noise['low']:.3f}, {noise['high']:.3f}], from "
            f"{noise['source']}; sources: " + "; ".join(one(e) for e in noise["sources"]))


def describe_readiness(r: dict[str, Any]) -> str:
    bias = "-" if r["length_bias"] is None else f"{r['length_bias']:.2f}"
    return (f"{r['pairs']} pairs: {r['size']} (~{r['enough_pairs']}); {r['ties']} ties; chosen longer in {bias} "
            f"of pairs (0.5: no length bias); {r['duplicates']} duplicates, {r['conflicts']} conflicting")


def from_judge_order(agreements: Iterable[bool]) -> Estimate | None:
    """eps of a pairwise judge's single-order verdicts from whether each pair's two orders agreed.
    Under the symmetric model the both-orders label `prefalign label` writes has the same eps: both orders
    wrong (eps^2) plus half the disagreements (eps (1 - eps)) is eps."""
    flags = [bool(a) for a in agreements]
    if not flags:
        return None
    return from_disagreements(flags.count(False), len(flags), "judge_order",
                              note="the judge's A/B vs B/A disagreement; position bias counts as noise")
