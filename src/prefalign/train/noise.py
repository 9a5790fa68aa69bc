"""`label_smoothing: auto` (cdpo, robust): eps set from the training data's own label noise when the run starts.

The estimate is data/noise.py's, over every record of every training source as read (before a mixture's
weights and fractions: a repeat that the mixture drops still tells how often labels disagree). The point
estimate is used, capped at EPS_CAP: robust DPO divides by 1 - 2 eps. When no source can estimate (no
prompt + answer pair repeats) the run stops with a ConfigError before any model is loaded: a silent
fallback to some default eps would claim a measurement that was not made.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..data import ReadOptions, load_records
from ..data.curate import identity
from ..data.mixture import sources_of
from ..data.noise import EPS_CAP, DuplicateComparisons, combine
from ..data.records import PreferencePair
from ..errors import ConfigError


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
    if noise is None:
        raise ConfigError(
            f"label_smoothing: auto: no source could estimate the label noise of {cfg.data!r}: no prompt + answer "
            "pair appears more than once, so no two labels of one pair can be compared. Give label_smoothing a "
            "number (the flip rate you assume), or add repeated labels (docs/noise.md)")
    eps = min(noise["flip_rate"], EPS_CAP)
    info = {"label_smoothing": eps, "capped": noise["flip_rate"] > EPS_CAP, **noise}
    log(f"label_smoothing: auto -> {eps:.4f} (label-flip rate {noise['flip_rate']:.4f}, 95% interval "
        f"[{noise['low']:.4f}, {noise['high']:.4f}], from {noise['source']}"
        + (f"; capped at {EPS_CAP}" if info["capped"] else "") + ")")
    return cfg.model_copy(update={"label_smoothing": eps}), info
