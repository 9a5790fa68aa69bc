"""What is reviewed: items of one prompt and two answers, from a preference file, from `prefalign
sample`'s output, or from two models' samples of the same prompts (the arena).

An item's answers are "first" and "second" in a fixed order (the file's chosen then rejected; the
sample's completion i then i + 1; model A then model B); the page shows them on randomised sides.
Their names (which was the file's chosen, which completion, which model) are kept for after the
judgement is saved.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..data import PreferencePair, Problem, ReadOptions, Text, iter_parsed, norm, text_of
from ..data.readers import read_rows
from ..data.shapes import Bad, parse_prompt
from ..errors import DataError


@dataclass(frozen=True)
class Item:
    prompt: Text
    first: Text
    second: Text
    first_name: str
    second_name: str
    source: str  # file:line of the record it came from


def _same(a: Text, b: Text) -> bool:
    return norm(text_of(a)) == norm(text_of(b))


def from_pairs(path: str | Path, log: Callable[[str], None] = print) -> list[Item]:
    """Every preference pair of a file (any shape `prefalign data check` reads); bad records are
    reported and left out, unpaired (KTO) records are refused (there is nothing to compare)."""
    items, problems = [], []
    for _, result in iter_parsed(path, ReadOptions()):
        if isinstance(result, Problem):
            problems.append(result)
            continue
        for record in result:
            if not isinstance(record, PreferencePair):
                raise DataError(f"{record.where}: an unpaired (KTO/SFT) record; review needs two answers per "
                                "prompt (--pairs: a preference file, --samples: `prefalign sample` output)")
            items.append(Item(record.prompt, record.chosen, record.rejected, f"chosen in {Path(path).name}",
                              f"rejected in {Path(path).name}", str(record.where)))
    _report(path, items, problems, log)
    return items


def _sample_row(value: object, where, min_completions: int = 2) -> tuple[Text, list[str]]:
    if not isinstance(value, dict):
        raise Bad("", f"expected a JSON object, got {type(value).__name__}", "type")
    prompt = parse_prompt({"prompt": value.get("prompt")} if "prompt" in value else {}, where)
    completions = value.get("completions")
    if not isinstance(completions, list) or not all(isinstance(c, str) for c in completions):
        raise Bad("completions", "expected a list of strings (`prefalign sample` output)", "type")
    if len(completions) < min_completions:
        raise Bad("completions", f"{len(completions)} completions; at least {min_completions} needed", "missing")
    return prompt, completions


def from_samples(path: str | Path, log: Callable[[str], None] = print) -> list[Item]:
    """`prefalign sample` output ({"prompt", "completions": [n], "ended"}): completions 1-2, 3-4, ...
    of each prompt become items, so each completion is judged once (all n(n-1)/2 pairs grow too fast
    for people). An odd last completion is left out, and so is a pair of the same text (a sure tie)."""
    items, problems, same = [], [], 0
    for row in read_rows(path):
        if isinstance(row, Problem):
            problems.append(row)
            continue
        try:
            prompt, completions = _sample_row(row.value, row.where)
        except Bad as e:
            problems.append(Problem(row.where, e.field, e.message, e.kind, raw=row.raw))
            continue
        for i in range(0, len(completions) - 1, 2):
            if _same(completions[i], completions[i + 1]):
                same += 1
                continue
            items.append(Item(prompt, completions[i], completions[i + 1], f"completion {i + 1}",
                              f"completion {i + 2}", str(row.where)))
    if same:
        log(f"{path}: {same} pairs of identical completions left out")
    _report(path, items, problems, log)
    return items


def from_arena(samples_a: str | Path, samples_b: str | Path, name_a: str, name_b: str) -> list[Item]:
    """One item per prompt: model A's first completion against model B's, line by line of two
    `prefalign sample` files of the same prompts. Identical answers stay in (the arena's win-rate
    counts what people say about every prompt; they can only call it a tie)."""
    rows_a, rows_b = list(read_rows(samples_a)), list(read_rows(samples_b))
    if len(rows_a) != len(rows_b):
        raise DataError(f"{samples_a} has {len(rows_a)} prompts, {samples_b} {len(rows_b)}: not the same prompts")
    items = []
    for ra, rb in zip(rows_a, rows_b, strict=True):
        parsed = []
        for row in (ra, rb):
            if isinstance(row, Problem):
                raise DataError(str(row))
            try:
                parsed.append(_sample_row(row.value, row.where, min_completions=1))
            except Bad as e:
                raise DataError(f"{row.where}: {e.field}: {e.message}") from None
        (pa, ca), (pb, cb) = parsed
        if json.dumps(pa) != json.dumps(pb):
            raise DataError(f"{ra.where} and {rb.where}: different prompts; the arena compares answers to one prompt")
        items.append(Item(pa, ca[0], cb[0], name_a, name_b, str(ra.where)))
    return items


def _report(path, items: list[Item], problems: list[Problem], log: Callable[[str], None]) -> None:
    for p in problems[:5]:
        log(f"set aside: {p}")
    if len(problems) > 5:
        log(f"... and {len(problems) - 5} more records set aside")
    if not items:
        raise DataError(f"{path}: no items to review ({len(problems)} bad records)")
