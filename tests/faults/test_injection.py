"""Injection attempts (issue 16 §3): what a data file or an annotator writes stays data.

- module:function: the reward/judge callable runs the user's code by design, so only the config or the
  command line may name it; a data file whose rows name one (and whose prompts look like one) is read
  as text, and the code it names never loads. Every place that builds a judge takes its spec from a
  config field (an AST check, so a new one cannot slip in reading it from a row).
- SQL: the review file's queries are constants with `?`/`:name` parameters (an AST check), and text
  that would break a string-built query is stored and read back exactly by a real server.
- HTML/JS: the review page, in a real headless Chromium, shows answers, prompts, an annotator's name,
  a comment, a file's name and the summary as text: no script runs (each payload would set
  window.__pwned), nothing is blocked by the Content-Security-Policy (it would have been markup), and
  the text is on the page literally.
Every payload is tallied as an "injection attempt"."""

from __future__ import annotations

import ast
import json
import sqlite3
from pathlib import Path
from urllib.parse import quote

import pytest
from faultkit import tally

from conftest import headless_chromium, listening, write_jsonl

KIND = "injection attempt"
SRC = Path(__file__).resolve().parents[2] / "src" / "prefalign"
EVIL = """from pathlib import Path
Path(__file__).with_name("RAN").write_text("the data file's code ran")
def boom(prompts, completions):
    return [1.0] * len(completions)
"""
GOOD = "def score(prompts, completions):\n    return [float(len(c)) for c in completions]\n"


def test_a_data_file_cannot_name_the_code_that_scores_it(tmp_path):
    from prefalign.feedback.label import LabelConfig, label

    (tmp_path / "evil.py").write_text(EVIL)
    (tmp_path / "good.py").write_text(GOOD)
    spec = f"{tmp_path / 'evil.py'}:boom"
    fields = ("judge", "reward", "reward_fn", "scorer")
    rows = [{"prompt": spec, "completions": ["short", "a longer one"], **dict.fromkeys(fields, spec)},
            {"prompt": "os:system", "completions": ["os:system", "subprocess:getoutput ls"], "judge": "os:system"}]
    samples = write_jsonl(tmp_path / "samples.jsonl", rows)
    code_like = {spec, "os:system", "subprocess:getoutput ls"}
    injected = sum(v in code_like for row in rows for value in row.values()
                   for v in (value if isinstance(value, list) else [value]))  # 9: each a module:function
    try:
        summary, error = label(LabelConfig(samples=str(samples), judge=f"{tmp_path / 'good.py'}:score",
                                           output=str(tmp_path / "pairs.jsonl")), log=lambda _: None), None
    except Exception as e:  # noqa: BLE001  (os.system called with two lists, say): tallied, then raised
        summary, error = None, e
    ran = (tmp_path / "RAN").exists()
    ok = not ran and error is None
    tally(KIND, ok, lost=0 if ok else injected, count=injected, detail="module:function in a data file")
    if error is not None:
        raise error
    assert not ran and summary["judge"] == "callable"
    pairs = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert [(p["chosen"], p["prompt"]) for p in pairs] == [("a longer one", spec),
                                                           ("subprocess:getoutput ls", "os:system")]


BUILDERS = {"make_judge", "CallableJudge", "load_callable", "RemotePairwiseJudge"}
JUDGE_FIELDS = {"judge", "reward"}


def judge_specs(source: str, inside_judges: bool) -> list[tuple[int, str]]:
    """(line, what) for each judge built from anything but a config's judge/reward field (`cfg.judge`);
    judges/ itself passes on a parameter of the function it is in (`spec`; data stats' `--judge`, whose
    value the CLI takes from its own flag), never a value it read."""
    bad, tree = [], ast.parse(source)
    params: dict[int, set[str]] = {}  # call node -> the parameters of the functions around it
    for f in ast.walk(tree):
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(f):
                params.setdefault(id(inner), set()).update(a.arg for a in f.args.args + f.args.kwonlyargs)
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in BUILDERS):
            continue
        arg = node.args[0] if node.args else None
        from_config = isinstance(arg, ast.Attribute) and isinstance(arg.value, ast.Name) \
            and arg.value.id == "cfg" and arg.attr in JUDGE_FIELDS
        passed_on = inside_judges and isinstance(arg, ast.Name) and arg.id in params.get(id(node), set())
        if not (from_config or passed_on):
            bad.append((node.lineno, ast.unparse(node)[:120]))
    return bad


def test_only_a_config_field_names_a_judge():
    from prefalign.eval.evaluate import EvalConfig
    from prefalign.feedback.iterate import IterateConfig
    from prefalign.feedback.label import LabelConfig

    found, calls = [], 0
    for file in sorted(SRC.rglob("*.py")):
        source = file.read_text(encoding="utf-8")
        calls += sum(source.count(f"{b}(") for b in BUILDERS)
        found += [f"{file.relative_to(SRC)}:{line}: {what}" for line, what in judge_specs(
            source, file.parent.name == "judges")]
    assert calls >= 6 and not found, found  # label, iterate, eval, PPO build judges; all from cfg.judge/reward
    for config in (EvalConfig, IterateConfig, LabelConfig):  # ...which are config fields (StrictModel)
        assert "judge" in config.model_fields
    assert judge_specs("make_judge(row['judge'])\n", False) and judge_specs("CallableJudge(spec)\n", False)
    # inside judges/: a parameter passes; a value read inside the function, or a name from outside, does not
    assert not judge_specs("def f(spec):\n    return make_judge(spec)\n", True)
    assert judge_specs("def f(path):\n    spec = read(path)\n    return make_judge(spec)\n", True)
    assert judge_specs("spec = read(p)\nmake_judge(spec)\n", True)


SQL_CALLS = {"execute", "executemany", "executescript"}


def _constant_sql(node) -> bool:
    """A query written in the source: a string, an UPPER_CASE constant (SCHEMA, self.OPEN_ITEMS), or
    those joined with + or an f-string of them; never anything a request or a file brings."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, (ast.Name, ast.Attribute)):
        name = node.id if isinstance(node, ast.Name) else node.attr
        return name.isupper()
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _constant_sql(node.left) and _constant_sql(node.right)
    if isinstance(node, ast.JoinedStr):
        return all(_constant_sql(v.value if isinstance(v, ast.FormattedValue) else v) for v in node.values)
    return False


def built_sql(source: str) -> list[int]:
    return [node.lineno for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Call)
            and getattr(node.func, "attr", None) in SQL_CALLS and node.args and not _constant_sql(node.args[0])]


def test_sql_is_written_in_the_source_and_takes_values_as_parameters():
    queries = 0
    for file in sorted(SRC.rglob("*.py")):
        source = file.read_text(encoding="utf-8")
        queries += sum(source.count(f".{c}(") for c in SQL_CALLS)
        assert not built_sql(source), f"{file}: SQL built from values at lines {built_sql(source)}"
    assert queries >= 20  # the review store's queries were all seen
    assert built_sql("con.execute(f'SELECT * FROM items WHERE id = {item}')\n") == [1]
    assert built_sql("con.execute('SELECT ' + column)\n") == [1]
    assert built_sql("con.execute(f'SELECT COUNT(*) FROM ({self.OPEN_ITEMS})', args)\n") == []


# every payload sets window.__pwned if it ever runs as script
XSS = {"prompt": 'Say <script>window.__pwned = "prompt"</script> hi',
       "chosen": '<img src=x onerror="window.__pwned = \'chosen\'"> yes',
       "rejected": '</div><svg onload="window.__pwned = \'rejected\'"></svg> no'}
NAME = '<img src=x onerror="window.__pwned=1">'  # an annotator's name
COMMENT = '<script>window.__pwned = "comment"</script>'
FILE = "pairs<svg onload=window.__pwned=2>.jsonl"  # items' names come from it ("chosen in FILE")
SQL = {"annotator": "Robert'); DROP TABLE judgements;--", "comment": "'); DROP TABLE items; --",
       "better": "x' OR '1'='1\" --; SELECT * FROM meta"}


@pytest.fixture(scope="module")
def review(tmp_path_factory):
    from test_review import Server

    root = tmp_path_factory.mktemp("review")
    pairs = write_jsonl(root / FILE, [XSS, XSS])
    server = Server(["--pairs", pairs, "-o", root / "labels.sqlite", "--per-item", "2"],  # --host not given
                    root / "server.log")
    yield server, root / "labels.sqlite"
    server.stop()


def test_text_that_would_break_a_query_is_stored_and_read_back_exactly(review):
    from test_review import call

    server, db = review
    assert listening(int(server.url.rsplit(":", 1)[1])) == {"127.0.0.1"}  # loopback when no --host is given
    try:
        who = quote(SQL["annotator"])
        item = call(f"{server.url}/api/next?annotator={who}")["item"]["id"]
        judged = {"annotator": SQL["annotator"], "item": item, "verdict": "a", "comment": SQL["comment"],
                  "better": SQL["better"]}
        call(f"{server.url}/api/judge", judged)
        undone = call(f"{server.url}/api/undo", {"annotator": SQL["annotator"]})["undone"]
        call(f"{server.url}/api/judge", judged)
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            rows = con.execute("SELECT annotator, comment, better FROM judgements").fetchall()
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            items = con.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        finally:
            con.close()
    except Exception:  # the server failed the text: every payload counted as lost, then raised
        tally(KIND, False, lost=len(SQL), count=len(SQL), detail="SQL in a judgement's text")
        raise
    intact = rows == [tuple(SQL.values())] and {"items", "judgements", "meta"} <= tables and items == 2
    ok = intact and (undone["comment"], undone["better"]) == (SQL["comment"], SQL["better"])
    tally(KIND, ok, lost=0 if ok else len(SQL), count=len(SQL), detail="SQL in a judgement's text")
    assert (undone["comment"], undone["better"]) == (SQL["comment"], SQL["better"])
    assert intact, (rows, tables, items)


def test_the_review_page_shows_markup_as_text_and_runs_none_of_it(review, tmp_path):
    server, _ = review
    try:
        shown, texts, status, comment, summary, pwned, blocked = _page(server, tmp_path)
    except Exception:  # the page broke before it could be judged: every payload counted as lost, then raised
        tally(KIND, False, lost=len(XSS) + 3, count=len(XSS) + 3, detail="HTML/JS on the review page")
        raise
    # the summary lists each annotator in its `annotators` row, a JSON object shown as text: the name as JSON
    # writes it (its quotes escaped). The name bare is only in the Cohen's kappa row, which exists only when a
    # second annotator judged the same item: the SQL test's, when it ran first (the page test alone failed)
    literal = (texts[0] == XSS["prompt"] and {texts[1], texts[2]} == {XSS["chosen"], XSS["rejected"]}
               and texts[3] == f"annotator: {NAME}" and FILE in status and comment == COMMENT
               and f"{json.dumps(NAME)}:1" in summary)
    ok = shown and pwned is None and not blocked and literal
    tally(KIND, ok, lost=0 if ok else len(XSS) + 3, count=len(XSS) + 3, detail="HTML/JS on the review page")
    assert shown and pwned is None and not blocked, (pwned, blocked)
    assert literal, (texts, status, comment, summary)


def _page(server, tmp_path) -> tuple:
    """The review page driven in a real Chromium with the payloads: what it showed and whether any ran."""
    browser = headless_chromium(tmp_path / "profile")
    try:
        browser.get(f"{server.url}/?annotator={quote(NAME)}")
        shown = _wait(browser, "return document.body.dataset.item !== undefined && "
                               "!document.querySelector('button:disabled')")
        texts = _texts(browser, "prompt", "answer-a", "answer-b", "who")
        browser.find_element("id", "comment").send_keys(COMMENT)
        browser.find_element("id", "btn-a").click()
        _wait(browser, "return document.getElementById('status').textContent.startsWith('Saved')")
        status = _texts(browser, "status")[0]
        browser.find_element("id", "undo-done" if _done(browser) else "undo").click()
        _wait(browser, "return document.getElementById('status').textContent.startsWith('Undone')")
        comment = browser.execute_script("return document.getElementById('comment').value;")
        browser.find_element("id", "btn-b").click()  # judged again, the comment as it came back
        _wait(browser, "return document.getElementById('status').textContent.startsWith('Saved')")
        browser.find_element("css selector", "#summary > summary").click()
        _wait(browser, "return document.getElementById('summary-table').rows.length > 0")
        summary = _texts(browser, "summary-table")[0]
        pwned = browser.execute_script("return window.__pwned;")
        blocked = [e["message"] for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]
    finally:
        browser.quit()
    return shown, texts, status, comment, summary, pwned, blocked


def _wait(browser, script: str, timeout: float = 15) -> bool:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout).until(lambda b: b.execute_script(script))


def _texts(browser, *ids: str) -> list[str]:
    return [browser.execute_script(f"return document.getElementById({i!r}).textContent;") for i in ids]


def _done(browser) -> bool:
    return browser.execute_script("return !document.getElementById('done').hidden;")
