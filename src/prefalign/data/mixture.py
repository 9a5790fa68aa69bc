"""Several data files as one training set: each source sampled by `weight` or `fraction`, mixed with
the run's seed, and counted (docs/data-mixtures.md).

- `weight`: the source's share of the mixed set, whose size is the sources' rows together (what plain
  concatenation gives). A share larger than the source's rows repeats rows (every row the same number
  of times, give or take one); a smaller one is a seeded subset. As Megatron/GPT-NeoX blend weights and
  LLaMA-Factory's `interleave_probs`: relative proportions, normalised.
- `fraction`: that share of the source's own rows, a seeded subset (what Axolotl's and open-r1's
  per-dataset `weight` means).
- neither: every row once.

Counts are exact: shares are computed in rational arithmetic from the numbers as written (0.1 is 1/10)
and the weighted counts are apportioned by largest remainder, so they add up to the mixed size.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, TypeVar

from pydantic import Field, model_validator

from ..config import StrictModel
from ..errors import DataError
from .hub import parse_hub_id

T = TypeVar("T")
SET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a path part of eval/<name>/... and a file name


class DataSource(StrictModel):
    """One source of a data mixture: a file or datasets folder, how much of it, how to read it."""

    path: str = Field(..., description="data file (JSONL, JSON, CSV, Parquet), datasets.save_to_disk folder or Hub "
                                       "dataset id")
    weight: float | None = Field(  # .inf: a share of nothing (and no Fraction to compute it)
        None, gt=0, allow_inf_nan=False, description="share of the mixed set relative to the other sources' weights "
                                                     "(the mixed set has as many rows as the sources together; a "
                                                     "larger share repeats rows)")
    fraction: float | None = Field(None, gt=0, le=1, description="share of this source's rows taken (a seeded "
                                                                 "subset); default: every row")
    split: str | None = Field(None, description="split of a saved DatasetDict folder (dataset_dict.json; default: "
                                                "train, else its first) or of a Hub dataset id (default: train)")
    format: str | None = Field(None, description="data shape of this source (see `prefalign data`); default: the "
                                                 "run's `format`")

    @model_validator(mode="after")
    def _one_share(self):
        if self.weight is not None and self.fraction is not None:
            raise ValueError("set weight or fraction, not both: weight is the source's share of the mixed set, "
                             "fraction the share of its own rows taken")
        return self

    def to_json(self) -> dict[str, Any]:
        share = {"weight": self.weight} if self.weight is not None else {"fraction": self.fraction or 1.0}
        return {"path": self.path, "split": self.split, "format": self.format, **share}


def as_entries(value: Any) -> Any:
    """A list entry written as a bare path is the source {path: ...} (pydantic then validates the rest)."""
    if isinstance(value, list):
        return [{"path": v} if isinstance(v, str) else v for v in value]
    return value


def check_mixture(value: str | list[DataSource], field: str) -> None:
    """What no single entry can tell: the list is not empty, and weights are given to all or none."""
    if isinstance(value, str):
        return
    if not value:
        raise ValueError(f"{field}: an empty list; give a file or at least one source")
    weighted = [s.weight is not None for s in value]
    if any(weighted) and not all(weighted):
        i = weighted.index(False)
        raise ValueError(f"{field}[{i}].weight: missing; once one source has a weight every source needs one (weights "
                         "are shares of the mixed set; use fraction everywhere to take shares of each source instead)")


def check_eval_sets(value: str | dict[str, DataSource] | None, field: str = "eval_data") -> None:
    if not isinstance(value, dict):
        return
    if not value:
        raise ValueError(f"{field}: an empty mapping; give a file or at least one named set")
    for name, source in value.items():
        if not SET_NAME.match(name):
            raise ValueError(f"{field}.{name}: a set's name is a metric path part (eval/<name>/...) and a file name: "
                             "letters, digits, '_', '.', '-', starting with a letter or digit")
        if source.weight is not None:
            raise ValueError(f"{field}.{name}.weight: an eval set is one source, weights mix several (use fraction "
                             "for a subset)")


def sources_of(value: str | list[DataSource], default_format: str) -> list[DataSource]:
    """The sources of a `data`-like value, each with its format resolved (a plain string: one source)."""
    items = [DataSource(path=value)] if isinstance(value, str) else value
    return [s.model_copy(update={"format": s.format or default_format}) for s in items]


def label_of(value: Any, field: str, i: int) -> str:
    """How errors name a source: the field for a plain string (as before mixtures), field[i] in a list."""
    return field if isinstance(value, str) else f"{field}[{i}]"


def check_readable(source: DataSource, label: str) -> None:
    """The path exists and a split is only asked of a folder that has splits: errors name the entry and field."""
    path = Path(source.path)
    if not path.exists() and parse_hub_id(source.path) is not None:
        return  # a Hub dataset id: data/hub.py resolves it (a split picks its files) and names the cache if missing
    if not path.exists():
        raise DataError(f"{label}.path: {source.path}: no such file or folder")
    if source.split is not None and not (path / "dataset_dict.json").exists():
        raise DataError(f"{label}.split: {source.split!r} names a split of a saved DatasetDict folder "
                        f"(dataset_dict.json); {source.path} has no splits")


def _exact(x: float) -> Fraction:
    return Fraction(repr(x))  # the number as written: repr(0.1) == '0.1' -> 1/10


def counts(sources: Sequence[DataSource], available: Sequence[int]) -> list[int]:
    """Rows each source contributes to the mix (see the module docstring)."""
    if sources and sources[0].weight is not None:
        total = sum(available)
        weights = [_exact(s.weight) for s in sources]
        quotas = [total * w / sum(weights) for w in weights]
        out = [math.floor(q) for q in quotas]
        # largest remainder (Hamilton): the rows floor() left over go to the largest remainders, ties to
        # the earlier source, so the counts add up to `total` and follow the weights within one row
        by_remainder = sorted(range(len(out)), key=lambda i: (-(quotas[i] - out[i]), i))
        for i in by_remainder[:total - sum(out)]:
            out[i] += 1
        return out
    return [math.floor(_exact(s.fraction or 1.0) * n + Fraction(1, 2)) for s, n in zip(sources, available,
                                                                                       strict=True)]


def pick(n: int, k: int, rng: random.Random) -> list[int]:
    """k row indices of n: whole passes over every row first, then a seeded subset without repeats, so a
    row appears floor(k/n) or ceil(k/n) times."""
    whole, rest = divmod(k, n)
    return list(range(n)) * whole + sorted(rng.sample(range(n), rest))


@dataclass
class SourceUse:
    """A source as the run used it: rows read and kept (`available`), rows in the mix (`used`)."""

    source: DataSource
    available: int
    used: int

    def to_json(self) -> dict[str, Any]:
        return {**self.source.to_json(), "available": self.available, "used": self.used}


def mix(parts: Sequence[list[T]], sources: Sequence[DataSource], seed: int,
        labels: Sequence[str] | None = None) -> tuple[list[T], list[SourceUse]]:
    """One list from each source's items (already read and kept), sampled as the sources say, in a
    seeded order. The same sources, items and seed always give the same list. One source taken whole
    keeps its order (a plain `data: FILE` trains exactly as before mixtures)."""
    labels = labels or [f"source {i}" for i in range(len(sources))]
    available = [len(p) for p in parts]
    wanted = counts(sources, available)
    for label, s, n, k in zip(labels, sources, available, wanted, strict=True):
        if k == 0:
            share = f"weight {s.weight}" if s.weight is not None else f"fraction {s.fraction}"
            raise DataError(f"{label} ({s.path}): {share} of its {n} usable rows is 0 rows; raise it or drop the "
                            "source")
    uses = [SourceUse(s, n, k) for s, n, k in zip(sources, available, wanted, strict=True)]
    if len(parts) == 1 and wanted[0] == available[0]:
        return list(parts[0]), uses
    # one stream per source (string seeds hash with SHA-512: the same in every process and Python run)
    mixed = [part[j] for i, (part, k) in enumerate(zip(parts, wanted, strict=True))
             for j in pick(len(part), k, random.Random(f"prefalign-mix:{seed}:{i}"))]
    random.Random(f"prefalign-mix:{seed}").shuffle(mixed)
    return mixed, uses
