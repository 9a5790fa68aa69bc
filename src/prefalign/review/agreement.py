"""Agreement between annotators and the outcome of a human judgement, as pure functions.

- cohen_kappa: two raters over the same items (Cohen 1960, "A coefficient of agreement for nominal
  scales"): kappa = (p_o - p_e) / (1 - p_e), p_o the share of items both put in the same
  category, p_e = sum_c p_1(c) p_2(c) the share expected by chance from each rater's own marginals.
- fleiss_kappa: n raters per item, not necessarily the same raters (Fleiss 1971, "Measuring nominal
  scale agreement among many raters"): P_i = (sum_j n_ij^2 - n) / (n (n - 1)) the agreeing
  pairs of raters on item i, p_j the share of all ratings in category j, kappa = (mean P_i - sum_j p_j^2)
  / (1 - sum_j p_j^2).
- majority: the verdict most annotators of an item gave, and their share (None on a tie for first).
- outcome: a verdict as a win of the first answer over the second: 1 better, 0 worse, 1/2 for a tie
  and for "both bad" (no preference between the two, as Chatbot Arena counts its "both are bad" vote).

Each kappa is undefined (NaN) when chance agreement is already total (every rating in one category).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

VERDICTS = ("first", "second", "tie", "both_bad")  # the first/second answer of an item is better, tie, both bad
OUTCOME = {"first": 1.0, "second": 0.0, "tie": 0.5, "both_bad": 0.5}


def cohen_kappa(a: Sequence[str], b: Sequence[str]) -> float:
    """Cohen's kappa of two raters' labels of the same items, in the same order."""
    if len(a) != len(b):
        raise ValueError(f"two raters must label the same items: {len(a)} labels against {len(b)}")
    n = len(a)
    if n == 0:
        return math.nan
    p_o = sum(x == y for x, y in zip(a, b, strict=True)) / n
    ca, cb = Counter(a), Counter(b)
    p_e = sum(ca[c] * cb[c] for c in ca) / (n * n)
    if p_e == 1.0:  # both raters used one and the same category throughout
        return math.nan
    return (p_o - p_e) / (1.0 - p_e)


def fleiss_kappa(table: Sequence[Sequence[int]]) -> float:
    """Fleiss' kappa of a table of counts: one row per item, one column per category, table[i][j] the
    raters who put item i in category j. Every row must sum to the same number of raters n >= 2."""
    if not table:
        return math.nan
    n = sum(table[0])
    if n < 2:
        raise ValueError(f"Fleiss' kappa needs at least 2 ratings per item, row 0 has {n}")
    for i, row in enumerate(table):
        if sum(row) != n or any(x < 0 for x in row):
            raise ValueError(f"row {i} has {sum(row)} ratings (or a negative count); every row must have {n}")
    items, categories = len(table), len(table[0])
    p = [sum(row[j] for row in table) / (items * n) for j in range(categories)]
    p_i = [(sum(x * x for x in row) - n) / (n * (n - 1)) for row in table]
    p_bar, p_e = sum(p_i) / items, sum(x * x for x in p)
    if p_e == 1.0:
        return math.nan
    return (p_bar - p_e) / (1.0 - p_e)


def counts_table(per_item: Sequence[Sequence[str]], categories: Sequence[str] = VERDICTS) -> list[list[int]]:
    """Each item's labels as a row of per-category counts (Fleiss' table)."""
    index = {c: j for j, c in enumerate(categories)}
    table = []
    for labels in per_item:
        row = [0] * len(categories)
        for label in labels:
            row[index[label]] += 1
        table.append(row)
    return table


def majority(labels: Sequence[str]) -> tuple[str | None, float]:
    """(the most common label, its share of the labels); None when two labels tie for most common."""
    if not labels:
        return None, 0.0
    (top, count), *rest = Counter(labels).most_common()
    if rest and rest[0][1] == count:
        return None, count / len(labels)
    return top, count / len(labels)


def item_outcome(verdicts: Sequence[str]) -> float:
    """The first answer's outcome on one item: the mean over its annotators' verdicts."""
    return sum(OUTCOME[v] for v in verdicts) / len(verdicts)
