"""The fuzz tests' tally (fuzzkit.Runs) counts what was injected, not what hypothesis ran: a valid input is
no fault, the reruns that shrink a failure are not new faults, and one failure is one fault not survived."""

import json

import hypothesis.strategies as st
import pytest
from faultkit import TALLY_ENV
from fuzzkit import Runs
from hypothesis import HealthCheck, given, settings


def tallied(tmp_path, monkeypatch, prop) -> list[dict]:
    monkeypatch.setenv(TALLY_ENV, str(tmp_path / "tally.jsonl"))
    runs = Runs("fuzzed data file")
    with pytest.raises(AssertionError):
        runs.run(prop(runs))
    return [json.loads(x) for x in (tmp_path / "tally.jsonl").read_text().splitlines()]


def test_valid_inputs_and_shrinking_reruns_are_not_counted(tmp_path, monkeypatch):
    seen = []

    def prop(runs):
        @settings(max_examples=200, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
        @given(st.integers(0, 1000))
        def check(n):
            with runs.example(malformed=n % 2 == 1):
                seen.append(n)
                runs.example_lost = 1
                assert n < 700

        return check

    rows = tallied(tmp_path, monkeypatch, prop)
    first = next(i for i, n in enumerate(seen) if n >= 700)  # after it, hypothesis only shrinks it
    assert len(seen) > first + 1  # it did shrink
    held = sum(n % 2 for n in seen[:first])
    assert [(r["survived"], r["count"], r["lost"]) for r in rows] == [(True, held, 0), (False, 1, 1)]
