"""The review's summary (the page's and `review.json`'s): counts, agreement, and in an arena the human
win-rate of model A over model B with the same bootstrap interval `prefalign eval` gives its judge's."""

from __future__ import annotations

import math
from collections import Counter
from itertools import combinations
from typing import Any

from ..storage import finite  # an undefined kappa (NaN) is not JSON: null
from .agreement import VERDICTS, cohen_kappa, counts_table, fleiss_kappa, item_outcome


def agreement(items: list[dict[str, Any]], per_item: int) -> dict[str, Any]:
    """Fleiss' kappa over the items judged exactly k times (k >= 2); Cohen's kappa of every two
    annotators over the items both judged, and their mean (Light 1971)."""
    complete = [[j["verdict"] for j in it["judgements"]] for it in items if len(it["judgements"]) == per_item]
    fleiss = fleiss_kappa(counts_table(complete)) if per_item >= 2 and complete else math.nan
    by_annotator: dict[str, dict[int, str]] = {}
    for it in items:
        for j in it["judgements"]:
            by_annotator.setdefault(j["annotator"], {})[it["id"]] = j["verdict"]
    pairs = []
    for a, b in combinations(sorted(by_annotator), 2):
        shared = sorted(by_annotator[a].keys() & by_annotator[b].keys())
        if shared:
            kappa = cohen_kappa([by_annotator[a][i] for i in shared], [by_annotator[b][i] for i in shared])
            pairs.append({"annotators": [a, b], "items": len(shared), "kappa": finite(kappa)})
    defined = [p["kappa"] for p in pairs if p["kappa"] is not None]
    return {"fleiss_kappa": finite(fleiss), "fleiss_items": len(complete) if per_item >= 2 else 0,
            "cohen_kappa": sum(defined) / len(defined) if defined else None, "cohen_kappa_pairs": pairs}


def arena(items: list[dict[str, Any]], source: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """Model A's win-rate over B: each judged prompt's outcome (A better 1, B better 0, tie and both
    bad 1/2, averaged over its annotators), averaged over prompts, with eval's percentile bootstrap
    over prompts."""
    outcomes = [item_outcome([j["verdict"] for j in it["judgements"]]) for it in items if it["judgements"]]
    out: dict[str, Any] = {"model": source["models"][0], "win_rate_baseline": source["models"][1],
                           "win_rate_items": len(outcomes), "win_rate": None, "win_rate_ci95": None}
    if outcomes:
        # imported here: torch (the bootstrap's) costs the server a second of start-up it only needs here
        from ..eval.metrics import win_rate

        rate, ci = win_rate(outcomes, seed=seed)
        out.update({"win_rate": rate, "win_rate_ci95": list(ci)})
    return out


def summarise(items: list[dict[str, Any]], meta: dict[str, Any], blind: bool = False) -> dict[str, Any]:
    """The summary; `blind`: without what would tell annotators still at work how the answers are faring
    (the verdict counts, which are in the items' own terms, and an arena's model names and win-rate)."""
    k, source = meta["per_item"], meta["source"]
    judgements = [j for it in items for j in it["judgements"]]
    verdicts = Counter(j["verdict"] for j in judgements)
    out: dict[str, Any] = {
        "mode": source["mode"], "items": len(items), "items_judged": sum(bool(it["judgements"]) for it in items),
        "items_complete": sum(len(it["judgements"]) >= k for it in items), "per_item": k,
        "judgements": len(judgements), "annotators": dict(sorted(Counter(j["annotator"] for j in judgements).items())),
        "revised_after_reveal": sum(bool(j.get("revised_after_reveal")) for j in judgements), "blinded": blind,
        **agreement(items, k)}
    if not blind:
        out["verdicts"] = {v: verdicts.get(v, 0) for v in VERDICTS}
        if source["mode"] == "arena":
            out.update(arena(items, source))
    return out
