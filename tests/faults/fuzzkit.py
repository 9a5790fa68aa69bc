"""What the property tests in tests/faults/ share: hypothesis settings scaled by `make test` / `make faults`,
oracles of where a data file's rows are, and a run counter that tallies, whatever the test's verdict, the
faults hypothesis injected: the examples with a malformed part that held, and each distinct failure once."""

from __future__ import annotations

import contextlib
import json

from faultkit import FULL, tally
from hypothesis import HealthCheck, settings


def fuzz_settings(examples: int, full: int | None = None) -> settings:
    """`examples` under `make test`, derandomized (the same inputs on every run: CI is reproducible);
    `full` (default 20x) under `make faults`, drawn afresh each run."""
    return settings(max_examples=(full or 20 * examples) if FULL else examples, deadline=None, database=None,
                    derandomize=not FULL, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture, HealthCheck.large_base_example])


class Runs:
    """Counts a property's examples; `run()` records them once, as one or two rows.

    An example counts as an injected fault only when it held a malformed part (the test says which:
    `example(malformed=...)`, or `runs.malformed = ...` inside it); a valid input that held is not a fault
    survived. Once one example fails,
    hypothesis only shrinks and replays that failure: those reruns are not new faults, so counting stops,
    and each distinct failure hypothesis reports is one fault not survived, with the records the first
    failing example lost.
    """

    def __init__(self, kind: str):
        self.kind, self.held, self.lost, self.failing = kind, 0, 0, False
        self.example_lost, self.malformed = 0, True  # the current example's

    @contextlib.contextmanager
    def example(self, malformed: bool = True):
        counted, self.example_lost, self.malformed = not self.failing, 0, malformed
        try:
            yield self
        except BaseException:
            if counted:  # the first failure: later examples shrink it
                self.lost, self.failing = self.example_lost, True
            raise
        if counted and self.malformed:
            self.held += 1

    def run(self, prop, *args) -> None:
        """Run the hypothesis test `prop`; the tally is written whatever its verdict."""
        failures = 0
        try:
            prop(*args)
        except BaseException as e:  # an exception group when hypothesis found several distinct failures
            failures = len(getattr(e, "exceptions", None) or [e])
            raise
        finally:
            if self.held:
                tally(self.kind, survived=True, lost=0, count=self.held)
            if failures:
                tally(self.kind, survived=False, lost=self.lost, count=failures,
                      detail=f"{failures} distinct failure(s) after {self.held} malformed examples held")


# ---------------------------------------------------------------- where rows are, found without the readers


def jsonl_oracle(data: bytes) -> tuple[list[int], list[bytes]]:
    """Where a JSONL reader must find rows: every line (split at \\n only) with a non-blank byte."""
    lines = data.split(b"\n")
    if data.endswith(b"\n"):
        lines.pop()
    return [i for i, line in enumerate(lines, 1) if line.strip()], lines


def json_lines(data: bytes) -> list[int] | None:
    """ORACLE: the lines of the elements of a JSON array laid out as test_fuzz_readers.write() does (one a
    line, from line 2), from json.loads of the text with bad bytes replaced (they are then only inside
    strings); None when that is not a list (bytes that broke its structure, or nesting too deep for json)."""
    try:
        value = json.loads(data.removeprefix(b"\xef\xbb\xbf").decode("utf-8", "replace"))
    except (ValueError, RecursionError):
        return None
    return list(range(2, 2 + len(value))) if isinstance(value, list) else None


def json_whole(prefix: bytes) -> set[int]:
    """ORACLE: the lines of a JSON array's (laid out so) elements that are whole in `prefix`, a cut copy
    (the line break after each is in it too): a reader must give each an outcome."""
    pieces = prefix.split(b"\n")
    return {n for n, line in enumerate(pieces[1:-1], start=2) if line.strip() not in (b"", b"]")}


def jsonl_whole(prefix: bytes) -> set[int]:
    return {n for n, line in enumerate(prefix.split(b"\n")[:-1], start=1) if line.strip()}
