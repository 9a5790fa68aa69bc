"""Malformed HTTP requests (issue 16 §3) against both servers, each a real uvicorn listening on loopback
(in this process, so that the model loads without a second interpreter's imports): schemathesis draws
requests from the server's own /openapi.json, valid ones and ones that break it, and checks every
answer: no 5xx, only the status codes and content types the schema lists, bodies (and each
server-sent event of a stream) of the shapes it gives, and on a route that wants the key, the same
request without it or with a wrong one refused. Then raw bytes as JSON bodies, which must be a 4xx too.
`make test` draws a few cases per route and mode (derandomised: the same ones each run), `make faults`
many, and checks that each route and mode got at least MIN_FULL of them (hypothesis stops early, without
a word, when a strategy runs dry). Each malformed case (schemathesis's negative ones and the raw bodies) is
tallied as a "malformed HTTP request" (benchmarks/faults.py's table); the valid ones are not faults."""

from __future__ import annotations

import json
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")

from faultkit import FULL, tally  # noqa: E402
from hypothesis import HealthCheck, Phase, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402

KIND = "malformed HTTP request"
KEY = "fuzz-key-1"
AUTH = {"Authorization": f"Bearer {KEY}"}
EXAMPLES = 150 if FULL else 8  # per route and mode
RAW = 100 if FULL else 10  # raw byte bodies per POST route
MIN_FULL = 50  # cases per route and mode a `make faults` run must have sent (of EXAMPLES asked for)
SHIPPED = str(Path(__file__).resolve().parents[2] / "src" / "prefalign" / "assets" / "imdb-lm")


def _checks() -> list:
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi import checks

    return [not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
            checks.response_schema_conformance, checks.ignored_auth, checks.negative_data_rejection]


@contextmanager
def on_loopback(app):
    """uvicorn serving `app` on 127.0.0.1 (a free port) from a thread: its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(app, log_level="critical", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


class Seen:
    """What a fuzz run sent and what failed, kept as it goes so a run that errors half way is still tallied."""

    def __init__(self):
        self.malformed, self.valid, self.failures, self.per = 0, 0, [], {}


def fuzz(url: str, examples: int, seen: Seen) -> None:
    """Every route of the server's schema, valid and invalid cases, into `seen`."""
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", headers=AUTH)
    for result in schema.get_all_operations():
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _cases(result.ok(), mode, url, examples, seen)


def takes_input(operation) -> bool:
    raw = operation.definition.raw
    return bool(raw.get("parameters") or raw.get("requestBody"))


def _cases(operation, mode, url: str, examples: int, seen: Seen) -> None:
    from schemathesis import GenerationMode
    from schemathesis.core.failures import FailureGroup

    checks, key, negative = _checks(), f"{operation.label} ({mode.value})", mode == GenerationMode.NEGATIVE
    seen.per[key] = [0, takes_input(operation)]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    def one(case):
        seen.per[key][0] += 1
        if negative:
            seen.malformed += 1
        else:
            seen.valid += 1
        try:
            case.call_and_validate(base_url=url, headers=AUTH, checks=checks)
        except (Exception, FailureGroup) as e:  # a check's failure, or the server gone: each one counted
            seen.failures.append((negative, f"{key}: {e}"[:3000]))

    try:
        one()
    except Unsatisfiable:  # no invalid request exists for a route that takes nothing (GET /health) ...
        if takes_input(operation) or not negative:  # ... and only for such a route
            raise


def raw_bodies(url: str, paths: list[str], examples: int, seen: Seen) -> None:
    """Bytes that are not the JSON a route wants (not UTF-8, cut short, out-of-range numbers, another
    type): a 4xx each."""
    import httpx

    with httpx.Client(headers={**AUTH, "Content-Type": "application/json"}, timeout=30) as client:
        for path in paths:
            _junk(client, url + path, examples, seen)


# sent every run, before the drawn ones: each once answered 500 by one server or the other
EDGES = [b'{"annotator": "al", "item": 1e999, "verdict": "a"}', b'{"annotator": "al", "item": NaN, "verdict": "a"}',
         b'{"annotator": "al", "item": 9223372036854775808, "verdict": "a"}', b'{"model": ', b"\xff\xfe{}"]
JUNK = st.one_of(st.binary(max_size=200), st.text(max_size=50).map(str.encode),
                 st.sampled_from([b"[]", b"null", b'{"a": ' * 50, b'{"prompt": "x", "max_tokens": -1e999}']))


def _junk(client, url: str, examples: int, seen: Seen) -> None:
    import httpx

    @given(body=JUNK)
    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def one(body):
        seen.malformed += 1
        try:
            status = client.post(url, content=body).status_code
        except httpx.HTTPError as e:
            status = repr(e)
        if not (isinstance(status, int) and 400 <= status < 500):
            seen.failures.append((True, f"POST {url} {body[:80]!r}: {status}"))

    for edge in EDGES:
        one = example(body=edge)(one)
    one()


def record(seen: Seen, error: BaseException | None = None) -> None:
    """The malformed cases sent, each survived or lost; a run that broke off before its end is one more
    lost (whatever it was sending then was never judged)."""
    lost = sum(negative for negative, _ in seen.failures)
    if seen.malformed - lost:
        tally(KIND, True, count=seen.malformed - lost)
    if lost:
        tally(KIND, False, lost=lost, count=lost, detail=next(f for negative, f in seen.failures if negative)[:500])
    if error is not None:
        tally(KIND, False, lost=1, detail=f"the fuzz run broke off: {error!r}"[:500])


def check(seen: Seen, server: str) -> None:
    failures = [f for _, f in seen.failures]
    assert not failures, "\n\n".join(failures)
    assert seen.valid >= 4 * EXAMPLES and seen.malformed >= 4 * EXAMPLES, (seen.valid, seen.malformed)
    # every route and mode got its share (a route that takes nothing has one request to send, and no
    # malformed one); a `make test` run asks for so few that hypothesis's early stop shows less
    least = MIN_FULL if FULL else 2
    short = {k: n for k, (n, inputs) in seen.per.items() if n < (least if inputs else int(k.endswith("(positive)")))}
    assert not short, f"{server}: routes and modes that got fewer than {least} cases: {short}"


def test_serve_answers_every_request_its_schema_allows_or_breaks_without_a_5xx():
    import torch

    from prefalign.serve.api import Limits
    from prefalign.serve.server import build

    threads = torch.get_num_threads()
    # small requests on one thread (OpenMP spin-waits on a busy machine made each one take seconds)
    app, engine = build([SHIPPED], limits=Limits(max_tokens=8, max_prompts=4), max_batch=4, api_key=KEY,
                        chat_template="chatml", threads=1)
    seen = Seen()
    try:
        with on_loopback(app) as url:
            fuzz(url, EXAMPLES, seen)
            raw_bodies(url, ["/v1/completions", "/v1/chat/completions"], RAW, seen)
            stats = json.loads(_get(url + "/stats"))
            pages = [_status(url + page) for page in ("/docs", "/redoc")]
    except BaseException as e:  # tallied, then raised
        record(seen, e)
        raise
    finally:
        engine.stop()
        torch.set_num_threads(threads)
    record(seen)
    check(seen, "serve")
    assert stats["requests"] >= EXAMPLES  # the valid cases reached the model
    assert pages == [404, 404]  # FastAPI's docs pages load a CDN's script: not served


def test_review_answers_every_request_its_schema_allows_or_breaks_without_a_5xx(tmp_path):
    from prefalign.review.items import Item
    from prefalign.review.server import guarded
    from prefalign.review.store import Store

    store = Store(tmp_path / "labels.sqlite")
    store.create([Item(f"prompt {i}", f"first {i}", f"second {i}", "chosen", "rejected", f"pairs.jsonl:{i}")
                  for i in range(1, 4)], {"mode": "pairs", "file": "pairs.jsonl"}, 2)
    seen = Seen()
    try:
        with on_loopback(guarded(store, KEY)) as url:
            fuzz(url, EXAMPLES, seen)
            raw_bodies(url, ["/api/judge", "/api/undo"], RAW, seen)
    except BaseException as e:  # tallied, then raised
        record(seen, e)
        raise
    record(seen)
    check(seen, "review")


def test_a_blank_key_is_no_key(tmp_path):
    """PREFALIGN_API_KEY= (set, empty) on loopback: no key, as check_host reads it (the guard used to
    want `Authorization: Bearer ` with nothing after it, so every request was a 401)."""
    from prefalign.review.items import Item
    from prefalign.review.server import guarded
    from prefalign.review.store import Store

    store = Store(tmp_path / "labels.sqlite")
    store.create([Item("p", "a", "b", "chosen", "rejected", "f:1")], {"mode": "pairs", "file": "f"}, 1)
    with on_loopback(guarded(store, "")) as url:
        assert json.loads(_get(url + "/api/next?annotator=al"))["item"]["id"] == 1


def _get(url: str) -> str:
    import urllib.request

    request = urllib.request.Request(url, headers=AUTH)
    with urllib.request.urlopen(request, timeout=30) as r:
        return r.read().decode()


@pytest.mark.parametrize("server", ["serve", "review"])
def test_only_loopback_binds_without_a_key(server):
    """Either server refuses any other address (a blank key is no key) before it binds anything."""
    from prefalign.errors import ConfigError
    from prefalign.review.server import check_host as review
    from prefalign.serve.host import check_host as serve

    check = {"serve": serve, "review": review}[server]
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        check(host, None)
    for host in ("0.0.0.0", "::", "", "192.168.1.10", "10.0.0.1", "127.0.0.1.nip.io", "localhost.example.com",
                 "127.1", "example.com"):
        for key in (None, ""):
            with pytest.raises(ConfigError, match="not a loopback address"):
                check(host, key)
        check(host, "a-key")


def _status(url: str) -> int:
    import urllib.error

    try:
        _get(url)
        return 200
    except urllib.error.HTTPError as e:
        return e.code
