"""`prefalign serve`'s scheduler in process, on the shipped model: what one request's failure does to the
others, and the row bound (the HTTP side refuses what these send the engine directly)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from prefalign.models.generate import encode_prompt
from prefalign.serve.engine import Engine
from prefalign.serve.jobs import Job, Settings
from prefalign.serve.models import load_served
from test_serve import SHIPPED


class Answer:
    """What the engine sent one job: its events, and whether it ended (all rows finished, or an error)."""

    def __init__(self):
        self.events: list[tuple] = []
        self.ended = threading.Event()

    def __call__(self, event: tuple) -> None:
        self.events.append(event)
        if event[0] == "error" or all(r.finish for r in event[1].rows):
            self.ended.set()

    def error(self) -> str | None:
        return next((e[1] for e in self.events if e[0] == "error"), None)


@pytest.fixture(scope="module")
def served():
    torch.set_num_threads(1)
    return load_served([SHIPPED], torch.device("cpu"))


@pytest.fixture
def engine(served):
    engine = Engine(served, torch.device("cpu"), max_batch=4)
    engine.start()
    yield engine
    engine.stop()


def job(served, prompt: str, *, n: int = 1, **settings) -> tuple[Job, Answer]:
    answer = Answer()
    ids = encode_prompt(served[SHIPPED].tokenizer, prompt)
    return Job(SHIPPED, [ids], n, Settings(**{"ignore_eos": True, **settings}), answer), answer


def test_a_request_that_fails_to_start_fails_alone(served, engine):
    """A seed the generator refuses (the API bounds it; the engine must not rely on that) raises in the
    request's start, inside the engine thread: that request gets the error, the one already decoding
    goes on to the same tokens it draws alone, and the engine serves the next request."""
    alone, alone_answer = job(served, "Once", max_tokens=40, seed=1)
    engine.submit(alone)
    assert alone_answer.ended.wait(60) and alone_answer.error() is None
    victim, victim_answer = job(served, "Once", max_tokens=40, seed=1)
    engine.submit(victim)
    while not engine.stats()["running_rows"]:
        time.sleep(0.005)
    bad, bad_answer = job(served, "x", max_tokens=2, seed=2**64)
    engine.submit(bad)
    assert bad_answer.ended.wait(30), "the failed request was never answered"
    assert "Overflow" in bad_answer.error()
    assert victim_answer.ended.wait(60) and victim_answer.error() is None, victim_answer.error()
    assert [r.tokens for r in victim.rows] == [r.tokens for r in alone.rows] and len(victim.rows[0].tokens) == 40
    after, after_answer = job(served, "Twice", max_tokens=3)
    engine.submit(after)
    assert after_answer.ended.wait(30) and after_answer.error() is None


def test_max_batch_bounds_the_rows_decoded_together(served, engine):
    """max_batch 4: three requests of 2 rows wait their turn (never more than 4 rows in a step); a
    request of 5 rows is answered with an error at once, not decoded in a step of its own."""
    jobs = [job(served, f"Movie {i}", n=2, max_tokens=6, seed=i) for i in range(3)]
    big, big_answer = job(served, "Five", n=5, max_tokens=2)
    for j, _ in jobs:
        engine.submit(j)
    engine.submit(big)
    for _, answer in jobs:
        assert answer.ended.wait(60) and answer.error() is None
    assert big_answer.ended.wait(30) and "over max_batch 4" in big_answer.error()
    stats = engine.stats()
    assert stats["max_rows_per_step"] <= 4 and stats["requests"] == 3, stats
    assert all(len(r.tokens) == 6 for j, _ in jobs for r in j.rows)
