"""`label_smoothing: auto` (cdpo, robust): eps set from the training data's own label noise when the run starts.

The estimate is data/noise.py's, over every record of every training source as read (before a mixture's
weights and fractions: a repeat that the mixture drops still tells how often labels disagree). It is used
only when it says something: its 95% interval at most MAX_WIDTH wide, and its low end under EPS_CAP
(robust DPO divides by 1 - 2 eps); the point estimate is then used, capped at EPS_CAP. Otherwise (no
repeats, too few comparisons, disagreement at chance, conflicting sources) the run stops with a
ConfigError before any model is loaded: a silent fallback, or one conflicting repeat read as eps = 0.45,
would claim a measurement that was not made.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..data import ReadOptions, load_records
from ..data.curate import identity
from ..data.mixture import sources_of
from ..data.noise import EPS_CAP, DuplicateComparisons, combine, from_disagreements
from ..data.records import PreferencePair
from ..errors import ConfigError

MAX_WIDTH = 0.15  # the widest 95% interval of eps `auto` uses: wider says too little to set the loss by


def estimate_training_noise(cfg) -> dict[str, Any] | None:
    """data/noise.combine over the estimates the training data allows (today: its conflicting duplicates)."""
    tracker = DuplicateComparisons()
    for source in sources_of(cfg.data, cfg.format):
        records, _ = load_records(source.path, ReadOptions(format=source.format, split=source.split))
        for record in records:
            if isinstance(record, PreferencePair):
                tracker.observe(*identity(record))
    return combine([tracker.estimate()])


def resolve_label_smoothing(cfg, log: Callable[[str], None] = print):
    """(cfg with a number for label_smoothing, what run.json records as `label_noise`, or None when the
    config gave a number)."""
    if getattr(cfg, "label_smoothing", None) != "auto":
        return cfg, None
    noise = estimate_training_noise(cfg)
    refuse = f"label_smoothing: auto: the label noise of {cfg.data!r} "
    if noise is None:
        raise ConfigError(
            f"label_smoothing: auto: no source could estimate the label noise of {cfg.data!r}: no prompt + answer "
            "pair appears more than once, so no two labels of one pair can be compared. Give label_smoothing a "
            "number (the flip rate you assume), or add repeated labels (docs/noise.md)")
    dup = next(s for s in noise["sources"] if s["source"] == "duplicates")
    seen = f"{dup['disagreements']} of {dup['comparisons']} comparisons of repeated labels disagree"
    interval = f"flip rate interval [{dup['low']:.3f}, {dup['high']:.3f}]"
    check = " Check the labels (swapped chosen/rejected?) rather than train on them"
    if noise["flip_rate"] is None:  # combine excluded it: the interval's low end is 1/2
        raise ConfigError(refuse + f"is at chance: {seen} ({interval}, low end 1/2): the labels carry no "
                          "information beyond chance." + check)
    if noise["low"] >= EPS_CAP:
        # a label keeps 1 - 2 eps of the true preference's signal: at eps >= low, at most 1 - 2 low of it
        raise ConfigError(refuse + f"is near chance: {seen} ({interval}, low end >= {EPS_CAP}): even at its low "
                          f"end a label keeps at most {1 - 2 * noise['low']:.3f} of the true preference's signal "
                          "(1 - 2 eps), too little to train on." + check)
    if noise.get("conflict"):  # only one source (duplicates) today; a second would have to agree with it
        raise ConfigError(refuse + f"is contradictory: its sources disagree ({noise['sources']}); give "
                          "label_smoothing a number")
    width = noise["high"] - noise["low"]
    if width > MAX_WIDTH:
        raise ConfigError(
            refuse + f"is not measured well enough: {seen}, flip rate {noise['flip_rate']:.3f} with 95% interval "
            f"[{noise['low']:.3f}, {noise['high']:.3f}], {width:.3f} wide (auto needs <= {MAX_WIDTH}). About "
            f"{comparisons_needed(noise['flip_rate'])} comparisons would do at this rate; or give label_smoothing "
            "a number (docs/noise.md)")
    eps = min(noise["flip_rate"], EPS_CAP)
    info = {"label_smoothing": eps, "capped": noise["flip_rate"] > EPS_CAP, **noise}
    log(f"label_smoothing: auto -> {eps:.4f} (label-flip rate {noise['flip_rate']:.4f}, 95% interval "
        f"[{noise['low']:.4f}, {noise['high']:.4f}], from {noise['source']}, {seen}"
        + (f"; capped at {EPS_CAP}" if info["capped"] else "") + ")")
    return cfg.model_copy(update={"label_smoothing": eps}), info


def comparisons_needed(eps: float) -> int:
    """The fewest comparisons (rounded up to 2 significant figures) whose interval is at most MAX_WIDTH wide when the
    disagreement share is the one eps implies: what to ask for when the interval is too wide."""
    q, n = 2 * eps * (1 - eps), 8
    while n < 10_000_000:
        e = from_disagreements(round(q * n), n, "duplicates")
        if e.high - e.low <= MAX_WIDTH:
            step = 10 ** max(0, len(str(n)) - 2)  # rounded up, so that the figure given is enough
            return -(-n // step) * step
        n = int(n * 1.1) + 1
    return n
