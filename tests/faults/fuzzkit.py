"""What the property tests in tests/faults/ share: hypothesis settings scaled by `make test` / `make faults`,
and a run counter that tallies the examples hypothesis ran (pass or fail) before the test's verdict."""

from __future__ import annotations

import contextlib

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
    """Counts a property's examples and whether any failed; `tally()` records them once, as one row."""

    def __init__(self, kind: str):
        self.kind, self.n, self.failed, self.lost = kind, 0, 0, 0

    @contextlib.contextmanager
    def example(self):
        self.n += 1
        try:
            yield self
        except BaseException:
            self.failed += 1
            raise

    def run(self, prop, *args) -> None:
        """Run the hypothesis test `prop`; the tally is written whatever its verdict (a failure is counted)."""
        try:
            prop(*args)
        finally:  # the examples that held, and those that failed (hypothesis's shrinking reruns count too)
            tally(self.kind, survived=True, lost=0, count=self.n - self.failed)
            if self.failed:
                tally(self.kind, survived=False, lost=self.lost, count=self.failed,
                      detail=f"{self.failed} of {self.n} examples failed")
