"""Preference data in: readers, shapes, validation, curation, splitting and tokenization."""

from __future__ import annotations

from pathlib import Path

from .curate import ReadOptions, iter_parsed
from .records import Location, PreferencePair, Problem, Record, UnpairedExample

__all__ = ["Location", "PreferencePair", "Problem", "ReadOptions", "Record", "UnpairedExample", "load_records"]


def load_records(path: str | Path, opts: ReadOptions | None = None) -> tuple[list[Record], list[Problem]]:
    """Every good record of a file, and every problem found on the way (training reports them and
    goes on with the good records)."""
    records: list[Record] = []
    problems: list[Problem] = []
    for _, result in iter_parsed(path, opts or ReadOptions()):
        if isinstance(result, Problem):
            problems.append(result)
        else:
            records.extend(result)
    return records, problems
