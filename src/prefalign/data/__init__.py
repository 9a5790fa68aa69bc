"""Preference data in: readers, shapes, validation, curation, splitting and tokenization."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError, DataError
from .curate import ReadOptions, iter_parsed
from .readers import read_rows
from .records import Location, PreferencePair, Problem, Record, Text, UnpairedExample, text_of
from .shapes import Bad, norm, parse_prompt

__all__ = ["Location", "PreferencePair", "Problem", "ReadOptions", "Record", "UnpairedExample", "load_prompts",
           "load_records"]


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


def load_prompts(path: str | Path, opts: ReadOptions | None = None) -> tuple[list[Text], list[Problem]]:
    """The distinct prompts of a file, in file order: rows of {"prompt": ...}, or any preference or
    completion file (its prompts), so RL can run on the same prompts as DPO. Bad rows are reported."""
    opts = opts or ReadOptions()
    prompts: list[Text] = []
    problems: list[Problem] = []
    seen: set[str] = set()
    for row in read_rows(path, opts.reader, opts.split):
        if isinstance(row, Problem):
            problems.append(row)
            continue
        if not isinstance(row.value, dict):
            problems.append(Problem(row.where, "", f"expected a JSON object, got {type(row.value).__name__}",
                                    "type", raw=row.raw))
            continue
        try:
            prompt = parse_prompt(row.value, row.where)
        except Bad as e:
            problems.append(Problem(row.where, e.field, e.message, e.kind, raw=row.raw))
            continue
        key = norm(text_of(prompt))
        if key not in seen:
            seen.add(key)
            prompts.append(prompt)
    return prompts, problems


def read_prompts(field: str, path: str | Path) -> list[Text]:
    """`load_prompts` for the config key `field`: a missing file is a ConfigError, a bad row a DataError, each
    naming the key, the file (and the line)."""
    try:
        prompts, problems = load_prompts(path)
    except OSError as e:
        raise ConfigError(f"{field}: {e}" if str(path) in str(e) else f"{field}: {path}: {e}") from None
    if problems:
        raise DataError(f"{field}: {problems[0]} ({len(problems)} bad row{'s' * (len(problems) > 1)})")
    return prompts
