"""`prefalign review` end to end: real servers on loopback, a real headless Chromium, the SQLite file read
back, `review export`, `data check` and a short DPO run on what people labelled; the arena's human win-rate
in `prefalign report`; concurrent annotators on two server processes sharing one file."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import headless_chromium, learnable_pairs, write_jsonl

SCRIPT = {"prompt": "Say hello <i>please</i>", "chosen": "Hello <script>window.pwned = 1</script><b>there</b>",
          "rejected": '<img src=x onerror="window.pwned = 2"> go away'}


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "prefalign", *map(str, args)], capture_output=True, text=True, **kw)


class Server:
    """`prefalign review ... --port 0` in its own process; its address read from its log."""

    def __init__(self, args, log: Path, timeout: float = 90):
        self.log = log
        start = log.stat().st_size if log.exists() else 0  # a restart appends to the same log
        with open(log, "a") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "prefalign", "review", *map(str, args), "--port", "0"],
                                         stdout=f, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(r"review: (http://[^/\s]+)/", log.read_text()[start:])
            if found:
                self.url = found.group(1)
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.proc.kill()
        pytest.fail(f"the review server did not start:\n{log.read_text()}")

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def call(url: str, body: dict | None = None, headers: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def judgements(db: Path) -> list[tuple]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute("SELECT item, annotator, verdict, comment, better FROM judgements ORDER BY id").fetchall()
    finally:
        con.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    b = headless_chromium(tmp_path_factory.mktemp("profile"), "--window-size=1280,860")
    yield b
    b.quit()


class Page:
    """One annotator's tab and what the test does in it, each step waiting for the server's answer."""

    def __init__(self, browser, handle: str):
        self.b, self.handle = browser, handle

    def js(self, script: str):
        self.b.switch_to.window(self.handle)
        return self.b.execute_script(script)

    def state(self) -> tuple[str, str]:
        return tuple(self.js("return [document.body.dataset.item, document.body.dataset.done];"))

    def wait(self, before: tuple[str, str] | None = None, timeout: float = 10) -> tuple[str, str]:
        """Until the page shows an item (a different state than `before`) and no request is in flight."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = self.js("return document.body.dataset.item !== undefined && "
                          "!document.querySelector('button:disabled') ? "
                          "[document.body.dataset.item, document.body.dataset.done] : null;")
            if now is not None and now != before:
                return tuple(now)
            time.sleep(0.02)
        raise AssertionError(f"the page did not change from {before}: {self.text('status')!r}")

    def until(self, script: str, timeout: float = 10) -> bool:
        """Whether `script` returned true within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.js(script) is True:
                return True
            time.sleep(0.02)
        return False

    def text(self, element_id: str) -> str:
        return self.js(f"return document.getElementById({element_id!r}).textContent;")

    def side(self, answer: str) -> str:
        """Which side ('a' or 'b') shows this answer."""
        shown = {s: self.text(f"answer-{s}") for s in ("a", "b")}
        assert answer in shown.values(), (answer, shown)
        return "a" if shown["a"] == answer else "b"

    def click(self, button_id: str) -> tuple[str, str]:
        before = self.state()
        self.b.switch_to.window(self.handle)
        self.b.find_element("id", button_id).click()
        return self.wait(before)

    def key(self, key: str) -> tuple[str, str]:
        from selenium.webdriver.common.action_chains import ActionChains

        before = self.state()
        self.js("document.activeElement.blur();")  # keys typed into a text box are text, not shortcuts
        ActionChains(self.b).send_keys(key).perform()
        return self.wait(before)

    def open(self, url: str) -> tuple[str, str]:
        self.b.switch_to.window(self.handle)
        self.b.get(url)
        return self.wait()

    def prefer(self, answer: str, how: str = "key") -> tuple[str, str]:
        """Judge the side showing `answer` better, with the mouse or the keyboard."""
        side = self.side(answer)
        return self.click(f"btn-{side}") if how == "mouse" else self.key(side)


def test_label_undo_resume_two_annotators_kill_restart_export_and_train(browser, tiny_models, tmp_path):
    rows = [SCRIPT] + learnable_pairs(8)  # item i + 1 is rows[i]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows)
    db, log, shots = tmp_path / "labels.sqlite", tmp_path / "server.log", tmp_path / "screenshots"
    shots.mkdir()
    args = ["--pairs", pairs, "-o", db, "--per-item", "2"]
    server = Server(args, log)
    try:
        # the first item as the API serves it to alice: no names before the judgement
        peek = call(f"{server.url}/api/next?annotator=alice")["item"]
        assert set(peek) == {"id", "prompt", "a", "b"}
        assert {peek["a"], peek["b"]} == {SCRIPT["chosen"], SCRIPT["rejected"]}

        # alice signs in through the form
        browser.get(server.url + "/")
        alice = Page(browser, browser.current_window_handle)
        # page.js shows the form; on a loaded machine it may run a moment after the load event
        shown = alice.until("return document.getElementById('login').hidden === false;")
        assert shown, (alice.text("status"), browser.get_log("browser"))
        browser.find_element("id", "name").send_keys("alice\n")
        assert alice.wait() == ("1", "0")
        assert "alice" in browser.current_url

        # markup in a prompt or an answer is text: shown verbatim, nothing parsed, nothing run
        assert alice.text("prompt") == SCRIPT["prompt"]
        assert {alice.text("answer-a"), alice.text("answer-b")} == {SCRIPT["chosen"], SCRIPT["rejected"]}
        assert alice.js("return document.querySelectorAll('#prompt *, #answer-a *, #answer-b *').length;") == 0
        assert alice.js("return window.pwned;") is None
        assert "chosen in" not in alice.js("return document.body.innerText;")  # names hidden until saved
        browser.find_element("tag name", "body").screenshot(str(shots / "1-script-as-text.png"))

        # the mouse: item 1 (agrees with the file), item 2 (disagrees, with a comment and a written answer)
        assert alice.prefer(SCRIPT["chosen"], "mouse") == ("2", "1")
        status = alice.text("status")
        assert "Saved" in status and "chosen in pairs.jsonl" in status and "rejected in pairs.jsonl" in status
        assert judgements(db) == [(1, "alice", "first", "", "")]  # committed before item 2 was shown
        browser.find_element("id", "comment").send_keys("too short")
        better = "it was a great film, with a fine plot."
        browser.find_element("id", "better").send_keys(better)
        browser.find_element("tag name", "body").screenshot(str(shots / "2-comment-and-better-answer.png"))
        assert alice.prefer(rows[1]["rejected"], "mouse") == ("3", "2")

        # typing in the comment box is not a judgement
        browser.find_element("id", "comment").send_keys("a b t x u")
        time.sleep(0.3)
        assert alice.state() == ("3", "2")

        # the keyboard: tie, both bad; then a mistake, undone with U and judged again
        assert alice.key("t") == ("4", "3")
        assert alice.key("x") == ("5", "4")
        assert alice.prefer(rows[4]["rejected"]) == ("6", "5")  # meant the chosen one
        assert alice.key("u") == ("5", "4")
        assert "Undone" in alice.text("status")
        assert alice.prefer(rows[4]["chosen"]) == ("6", "5")
        assert alice.text("progress").startswith("5 of 9")

        # reload: the same item, the same sides, the same progress
        sides = (alice.text("answer-a"), alice.text("answer-b"))
        browser.refresh()
        assert alice.wait() == ("6", "5")
        assert (alice.text("answer-a"), alice.text("answer-b")) == sides

        # bob, at the same time in another tab: k = 2, so he is shown the same items
        browser.switch_to.new_window("tab")
        browser.get(f"{server.url}/?annotator=bob")
        bob = Page(browser, browser.current_window_handle)
        assert bob.wait() == ("1", "0")
        assert bob.prefer(SCRIPT["chosen"], "mouse") == ("2", "1")
        assert bob.prefer(rows[1]["chosen"], "mouse") == ("3", "2")
        assert alice.prefer(rows[5]["chosen"]) == ("7", "6")
        assert bob.key("t") == ("4", "3")
        assert alice.text("progress").startswith("6 of 9")

        # SIGKILL mid-session: every saved judgement is in the file, nothing half-written
        saved = judgements(db)
        server.kill()
        assert len(saved) == 9 and judgements(db) == saved
        con = sqlite3.connect(db)
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        con.close()
    finally:
        server.stop()

    server = Server(args, log)  # the same command resumes
    try:
        assert alice.open(f"{server.url}/?annotator=alice") == ("7", "6")
        assert bob.open(f"{server.url}/?annotator=bob") == ("4", "3")
        assert bob.key("x") == ("5", "4")
        for page in (alice, bob):  # the rest agrees with the file
            while page.state()[0] != "none":
                page.prefer(rows[int(page.state()[0]) - 1]["chosen"])
        assert alice.open(f"{server.url}/?annotator=alice") == ("none", "9")
        assert alice.text("progress").startswith("9 of 9 · items complete 9 of 9")
        assert alice.js("return document.getElementById('done').hidden;") is False
        alice.js("document.getElementById('summary').open = true;")
        time.sleep(0.5)
        summary_text = alice.text("summary-table")
        assert "fleiss_kappa" in summary_text and "0.753" in summary_text
        browser.find_element("tag name", "body").screenshot(str(shots / "3-done-with-summary.png"))
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == [], errors
    finally:
        server.stop()
    print(f"screenshots: {shots}")

    # alice: first, second (+ a written answer), tie, both bad, first x5; bob: first, first, tie, both bad,
    # first x5. Cohen's kappa: p_o = 8/9, p_e = (6*7 + 1*1 + 1*1)/81 = 44/81, kappa = (72 - 44)/(81 - 44) = 28/37.
    # Fleiss' kappa (k = 2): p = (13, 1, 2, 2)/18, sum p^2 = 178/324; P_i = 1 for 8 items, 0 for item 2:
    # P = 8/9 = 288/324; kappa = (288 - 178)/(324 - 178) = 55/73.
    out = tmp_path / "export" / "pairs.jsonl"
    run = cli("review", "export", db, "-o", out, "--min-agreement", "0.66")
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["judgements"] == 18 and summary["annotators"] == {"alice": 9, "bob": 9}
    assert summary["verdicts"] == {"first": 13, "second": 1, "tie": 2, "both_bad": 2}
    assert summary["cohen_kappa"] == pytest.approx(28 / 37, abs=1e-12)
    assert summary["fleiss_kappa"] == pytest.approx(55 / 73, abs=1e-12) and summary["fleiss_items"] == 9
    assert summary["export"] == {"pairs": 8, "kept": 6, "written_answers": 2, "unjudged": 0, "min_agreement": 0.66,
                                 "set_aside": {"disagreement": 1, "tie": 1, "both_bad": 1}, "output": str(out),
                                 "quarantine": str(out.with_name("pairs.quarantine.jsonl"))}
    assert json.loads((out.parent / "review.json").read_text()) == summary
    exported = [json.loads(x) for x in out.read_text().splitlines()]
    kept = [(r["prompt"], r["chosen"], r["rejected"]) for r in exported if "written_by" not in r]
    assert kept == [(r["prompt"], r["chosen"], r["rejected"]) for i, r in enumerate(rows) if i not in (1, 2, 3)]
    written = [(r["chosen"], r["rejected"], r["written_by"]) for r in exported if "written_by" in r]
    assert written == [(better, rows[1]["chosen"], "alice"), (better, rows[1]["rejected"], "alice")]
    reasons = {json.loads(x)["item"]: json.loads(x)["kind"] for x in out.with_name("pairs.quarantine.jsonl").open()}
    assert reasons == {2: "disagreement", 3: "tie", 4: "both_bad"}

    check = cli("data", "check", out)
    assert check.returncode == 0 and "8 valid, 0 invalid" in check.stderr, check.stdout + check.stderr
    train = cli("train", "--method", "dpo", "--model", tiny_models["llama"], "--data", out, "-o", tmp_path / "dpo",
                "max_steps=2", "batch_size=4", "--no-progress")
    assert train.returncode == 0, train.stderr
    assert json.loads((tmp_path / "dpo" / "run.json").read_text())["steps"] == 2


def test_arena_human_win_rate_and_report(tiny_models, tmp_path):
    """--models A B: both answer the prompts; the summary is A's win-rate over B in eval.json's keys."""
    from prefalign.eval.metrics import win_rate

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in ("I loved the movie", "the plot was",
                                                                                 "hello", "why is it")])
    import prefalign

    # A: the shipped model (it writes English), B: a random tiny one; near-uniform random models sampled
    # with the same seeds (as the arena does) draw the same tokens, so two of those would tie throughout
    a, b = str(Path(prefalign.__file__).parent / "assets" / "imdb-lm"), str(tiny_models["llama"])
    db = tmp_path / "arena.sqlite"
    server = Server(["--models", a, b, "--prompts", prompts, "-o", db, "--per-item", "2", "--sample",
                     "max_new_tokens=8"], tmp_path / "arena.log")
    try:
        # which answer is model A's: the annotators here know it by its text (from the file)
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        answer_of = {i: json.loads(first) for i, first in con.execute("SELECT id, first FROM items")}
        con.close()
        # alice prefers model A on prompts 1-2, B on 3, tie on 4; bob: A, tie, both bad, B
        plan = {"alice": ["A", "A", "B", "tie"], "bob": ["A", "tie", "both_bad", "B"]}
        for who, verdicts in plan.items():
            if who == "bob":  # mid-labelling (k = 2): the page's summary gives no tally and no names
                blind = call(f"{server.url}/api/summary")
                assert blind["blinded"] is True and blind["judgements"] == 4, blind
                assert not {"model", "win_rate_baseline", "win_rate", "win_rate_ci95", "verdicts"} & set(blind)
                assert a not in json.dumps(blind) and b not in json.dumps(blind)
            state = call(f"{server.url}/api/next?annotator={who}")
            for want in verdicts:
                item = state["item"]
                assert item["a"] != item["b"]
                a_side = "a" if item["a"] == answer_of[item["id"]] else "b"
                side = {"A": a_side, "B": "b" if a_side == "a" else "a"}.get(want, want)
                state = call(f"{server.url}/api/judge", {"annotator": who, "item": item["id"], "verdict": side})
                # the models' names come back once the judgement is saved
                assert state["saved"][f"{a_side}_name"] == a and set(state["saved"].values()) >= {a, b}
            assert state["item"] is None
        summary = call(f"{server.url}/api/summary")  # every item judged twice: the whole summary
    finally:
        server.stop()
    assert summary["blinded"] is False
    # per prompt: (1 + 1)/2, (1 + 1/2)/2, (0 + 1/2)/2, (1/2 + 0)/2 -> mean (1 + .75 + .25 + .25)/4 = 0.5625
    outcomes = [1.0, 0.75, 0.25, 0.25]
    assert summary["mode"] == "arena" and summary["model"] == a and summary["win_rate_baseline"] == b
    assert summary["win_rate"] == pytest.approx(0.5625, abs=1e-12) and summary["win_rate_items"] == 4
    assert summary["win_rate_ci95"] == pytest.approx(list(win_rate(outcomes, seed=0)[1]), abs=1e-12)

    # in this process (the CLI's export is tested above): the report reads what the export wrote
    from prefalign.report.build import build_report
    from prefalign.review.export import export

    out = tmp_path / "human" / "pairs.jsonl"
    export(db, out)
    review = json.loads((out.parent / "review.json").read_text())
    assert review["win_rate"] == summary["win_rate"] and review["win_rate_ci95"] == summary["win_rate_ci95"]
    row = build_report([out.parent], tmp_path / "report", log=lambda _: None)["runs"][0]
    assert row["method"] == "human review" and row["human_win_rate"] == summary["win_rate"]
    assert row["human_win_rate_ci95"] == summary["win_rate_ci95"] and row["human_win_rate_baseline"] == b
    assert "| human | human review |" in (tmp_path / "report" / "report.md").read_text()


def test_concurrent_annotators_on_two_servers_share_one_file(tmp_path):
    """Six annotators at once, three on each of two server processes over one SQLite file, k = 2: every item
    ends with exactly 2 judgements, nobody judges an item twice, no request fails."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", learnable_pairs(15))
    db = tmp_path / "labels.sqlite"
    servers = [Server(["--pairs", pairs, "-o", db, "--per-item", "2"], tmp_path / f"s{i}.log") for i in range(2)]
    errors, counts = [], {}

    def annotate(who: str, url: str) -> None:
        try:
            state, n = call(f"{url}/api/next?annotator={who}"), 0
            while state["item"] is not None:
                state = call(f"{url}/api/judge", {"annotator": who, "item": state["item"]["id"], "verdict": "a"})
                n += 1
            counts[who] = n
        except (urllib.error.URLError, AssertionError) as e:
            errors.append(f"{who}: {e}")

    try:
        threads = [threading.Thread(target=annotate, args=(f"p{i}", servers[i % 2].url), name=f"p{i}")
                   for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        stuck = [t.name for t in threads if t.is_alive()]
        assert not stuck, f"annotator threads still waiting on the servers after 60 s: {stuck}"
    finally:
        for s in servers:
            s.stop()
    assert errors == []
    rows = judgements(db)
    per_item = {}
    for item, who, *_ in rows:
        per_item.setdefault(item, []).append(who)
    assert sorted(per_item) == list(range(1, 16)) and all(len(set(w)) == len(w) == 2 for w in per_item.values())
    assert sum(counts.values()) == len(rows) == 30


def test_the_server_starts_without_torch_and_refuses_bad_requests(tmp_path):
    samples = write_jsonl(tmp_path / "samples.jsonl", [  # `prefalign sample` output: completions 1-2 are an item
        {"prompt": p["prompt"], "completions": [p["chosen"], p["rejected"]], "ended": [True, True]}
        for p in learnable_pairs(2)])
    server = Server(["--samples", samples, "-o", tmp_path / "labels.sqlite"], tmp_path / "s.log")
    try:
        maps = Path(f"/proc/{server.proc.pid}/maps")
        if maps.exists():  # Linux: the libraries the process has loaded
            assert "libtorch" not in maps.read_text()
        item = call(f"{server.url}/api/next?annotator=al")["item"]
        bad = [({"annotator": "al", "item": item["id"], "verdict": "left"}, 422),
               ({"annotator": "", "item": item["id"], "verdict": "a"}, 422),
               ({"annotator": "al", "item": item["id"], "verdict": "a", "extra": 1}, 422),
               ({"annotator": "bo", "item": item["id"], "verdict": "a"}, 409)]  # not shown to bo
        for body, code in bad:
            with pytest.raises(urllib.error.HTTPError) as e:
                call(f"{server.url}/api/judge", body)
            assert e.value.code == code, body
        saved = call(f"{server.url}/api/judge", {"annotator": "al", "item": item["id"], "verdict": "a"})["saved"]
        assert {saved["a_name"], saved["b_name"]} == {"completion 1", "completion 2"}
        with pytest.raises(urllib.error.HTTPError) as e:  # twice
            call(f"{server.url}/api/judge", {"annotator": "al", "item": item["id"], "verdict": "b"})
        assert e.value.code == 409
        with urllib.request.urlopen(server.url + "/") as r:
            assert "script-src 'self'" in r.headers["Content-Security-Policy"]
    finally:
        server.stop()
    other = write_jsonl(tmp_path / "other.jsonl", learnable_pairs(3))
    run = cli("review", "--pairs", other, "-o", tmp_path / "labels.sqlite", "--port", "0")
    assert run.returncode == 2 and "holds the items of" in run.stderr
    run = cli("review", "--pairs", other, "--models", "a", "b", "-o", tmp_path / "x.sqlite")
    assert run.returncode == 2 and "one of --pairs" in run.stderr


def test_off_loopback_needs_a_key_which_the_page_sends_and_bodies_are_bounded(browser, tmp_path):
    """No key, no other address (refused before the file is made). With --api-key every /api route wants
    the bearer token; the page takes it from its address once (then drops it from there) and sends it.
    A body over 1 MiB is a 413, with or without a Content-Length."""
    import http.client

    pairs = write_jsonl(tmp_path / "pairs.jsonl", learnable_pairs(2))
    db = tmp_path / "labels.sqlite"
    run = cli("review", "--pairs", pairs, "-o", db, "--host", "0.0.0.0", "--port", "0",
              env={**os.environ, "PREFALIGN_REVIEW_KEY": ""}, timeout=60)  # it used to serve there, for ever
    assert run.returncode == 2 and "not a loopback address" in run.stderr and not db.exists(), run.stderr
    server = Server(["--pairs", pairs, "-o", db, "--api-key", "s3cret"], tmp_path / "s.log")
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            with pytest.raises(urllib.error.HTTPError) as e:
                call(f"{server.url}/api/next?annotator=al", headers=headers)
            assert e.value.code == 401
        with urllib.request.urlopen(server.url + "/") as r:  # the page itself holds no data
            assert r.status == 200
        auth = {"Authorization": "Bearer s3cret"}
        big = {"annotator": "al", "item": 1, "verdict": "a", "comment": "x" * (1 << 20)}
        try:  # the server answers the Content-Length at once, unread: the client may still be sending
            call(f"{server.url}/api/judge", big, headers=auth)
            raise AssertionError("a body over the limit was accepted")
        except urllib.error.HTTPError as e:
            assert e.code == 413 and "over the limit" in json.loads(e.read())["detail"]
        except (urllib.error.URLError, ConnectionError) as e:  # ...and then finds the connection closed on it
            assert isinstance(getattr(e, "reason", e), (BrokenPipeError, ConnectionResetError)), e
        assert call(f"{server.url}/api/next?annotator=al", headers=auth)["progress"]["done"] == 0  # nothing stored
        con = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=30)
        chunks = (b"x" * 65536 for _ in range(20))  # no Content-Length: counted as it arrives
        con.request("POST", "/api/judge", body=chunks, headers={**auth, "Content-Type": "application/json"},
                    encode_chunked=True)
        assert con.getresponse().status == 413
        con.close()

        browser.get(f"{server.url}/?annotator=al&key=s3cret")
        page = Page(browser, browser.current_window_handle)
        assert page.wait() == ("1", "0") and "key=" not in browser.current_url
        assert page.prefer(learnable_pairs(2)[0]["chosen"], "mouse") == ("2", "1")
        browser.refresh()  # the key stays with the tab
        assert page.wait() == ("2", "1")
    finally:
        server.stop()
