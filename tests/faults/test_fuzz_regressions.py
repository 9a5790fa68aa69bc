"""Every crash the fuzzers found (hypothesis in test_fuzz_readers.py, atheris in scripts/fuzz_readers.py), with
its input inline, and what prefalign does with it now; and a few seconds of the atheris target itself, so it
cannot rot. (Config crashes are pinned in test_fuzz_config.py.)"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from faultkit import tally

from prefalign.data import load_records
from prefalign.data.curate import CurateConfig, ReadOptions, compute_stats, curate
from prefalign.data.records import json_line
from prefalign.errors import DataError

KIND = "fuzzed data file"
ROOT = Path(__file__).resolve().parents[2]
PAIR = b'{"prompt": "p", "chosen": "a", "rejected": "b"}'


def deep(n: int) -> bytes:
    return b"[" * n + b"]" * n


# (file name, bytes, what happens): "error: TEXT" a DataError naming the file, else the problems'
# (line, kind) and the number of records read. Each crashed before its fix with the error named.
FOUND = {
    "gzip that is not gzip (BadGzipFile)": ("x.jsonl.gz", b"{", "error: cannot be decompressed"),
    "gzip cut short (EOFError)": ("x.jsonl.gz", gzip.compress(PAIR + b"\n" + PAIR.replace(b'"a"', b'"c"') + b"\n"
                                                             + b"x" * 3000)[:-20], ([(3, "corrupt")], 2)),
    "JSONL nested 100000 deep (RecursionError)": ("x.jsonl", deep(100_000) + b"\n" + PAIR + b"\n", ([(1, "json")], 1)),
    "JSON array element nested too deep (RecursionError)": (
        "x.json", b"[\n" + deep(5000) + b",\n" + PAIR + b"\n]", ([(2, "json")], 1)),
    "CSV cell over 128 KiB (_csv.Error)": ("x.csv", b"prompt,chosen,rejected\n" + b"p" * 140_000 + b",a,b\n",
                                           ([], 1)),
    "CSV cell nested 5000 deep (RecursionError)": ("x.csv", b"prompt,chosen,rejected\n" + deep(5000) + b",a,b\n",
                                                   ([], 1)),
    "CSV header not UTF-8 (UnicodeEncodeError writing the quarantine)": ("x.csv", b"\xe0\np\n", ([(2, "utf8")], 0)),
    "a key that is an unpaired surrogate (UnicodeEncodeError)": ("x.jsonl", b'{"\\ud800": 1}\n', ([(1, "shape")], 0)),
    "a message name that is an unpaired surrogate (kept; UnicodeEncodeError)": (
        "x.jsonl", b'{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "name": '
                   b'"\\udc00"}], "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", '
                   b'"content": "b"}]}\n', ([(1, "utf8")], 0)),
    "a list as a sharegpt speaker (TypeError: unhashable)": (
        "x.jsonl", b'{"conversations": [{"from": ["human"], "value": "q"}], "chosen": {"from": "gpt", "value": "a"},'
                   b' "rejected": {"from": "gpt", "value": "b"}}\n', ([(1, "roles")], 0)),
    "UTF-8 BOM before a CSV header (every row: no shape)": ("x.csv", b"\xef\xbb\xbfprompt,chosen,rejected\np,a,b\n",
                                                            ([], 1)),
    "UTF-8 BOM before JSONL (first line: broken JSON)": ("x.jsonl", b"\xef\xbb\xbf" + PAIR + b"\n", ([], 1)),
    "UTF-16 file (a utf8 problem per line)": ("x.jsonl", (PAIR.decode() + "\n").encode("utf-16"), "error: UTF-16"),
    "random bytes as Parquet (ArrowInvalid)": ("x.parquet", b"PAR1\x00\x01", "error: not a readable Parquet"),
    "random bytes as Arrow (OSError)": ("x.arrow", b"\xff\xff\xff\xff\x10\x00", "error: not a readable Arrow"),
    # Python refuses to convert an integer of over 4300 digits (ValueError, not a JSONDecodeError)
    "JSONL integer of 5000 digits (ValueError)": ("x.jsonl", b'{"n": ' + b"1" * 5000 + b"}\n" + PAIR + b"\n",
                                                  ([(1, "json")], 1)),
    "JSON array integer of 5000 digits (ValueError)": ("x.json", b"[\n" + b"1" * 5000 + b",\n" + PAIR + b"\n]",
                                                       ([(2, "json")], 1)),
    "CSV score of 5000 digits (ValueError)": ("x.csv", b"prompt,responses,scores\np,\"[\"\"a\"\", \"\"b\"\"]\",\"[1, "
                                              + b"1" * 5000 + b']"\n', ([(2, "type")], 0)),
}


@pytest.mark.parametrize("case", list(FOUND))
def test_found_crash(case, tmp_path):
    name, data, expect = FOUND[case]
    path = tmp_path / name
    path.write_bytes(data)
    survived = False
    try:
        if isinstance(expect, str):
            with pytest.raises(DataError) as e:
                compute_stats(path, ReadOptions())
            assert str(e.value).startswith(str(path)) and expect.removeprefix("error: ") in str(e.value)
        else:
            problems, kept = expect
            res = curate(path, tmp_path / "k.jsonl", tmp_path / "q.jsonl", CurateConfig())
            quarantined = [json.loads(x) for x in (tmp_path / "q.jsonl").read_text(encoding="utf-8").splitlines()]
            assert [(q["line"], q["kind"]) for q in quarantined] == problems
            assert res.kept == kept == len((tmp_path / "k.jsonl").read_text(encoding="utf-8").splitlines())
        survived = True
    finally:
        tally(KIND, survived=survived, detail=case)


def test_parquet_columns_json_cannot_hold(tmp_path):
    """Bytes and timestamps in a Parquet row that becomes a problem: curate raised TypeError writing its raw."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"blob": [b"\xff\x00"], "when": pa.array([1], pa.timestamp("s"))}), path)
    held, q = False, []
    try:  # tallied once the checks have decided
        res = curate(path, tmp_path / "k.jsonl", tmp_path / "q.jsonl", CurateConfig())
        q = [json.loads(x) for x in (tmp_path / "q.jsonl").read_text(encoding="utf-8").splitlines()]
        assert res.rows_invalid == 1 and q[0]["raw"] == {"blob": "/wA=", "when": "1970-01-01 00:00:01"}
        held = True
    finally:
        tally(KIND, survived=held, lost=int(not q), detail="Parquet bytes and timestamp columns")


def test_a_quarantine_line_keeps_an_unpaired_surrogate():
    """No input reaches a problem with one today (they are named, not quoted); should one, its line is
    written \\u-escaped and reads back the same, where plain UTF-8 output raised UnicodeEncodeError."""
    obj = {"problem": "key \ud800", "raw": {"\udc80": "caf\xe9"}}
    line = json_line(obj)
    assert json.loads(line) == obj and line.encode("utf-8") and "\\ud800" in line
    assert json_line({"a": "caf\xe9"}) == '{"a": "caf\xe9"}'  # without one: UTF-8 as it was, not escaped


def fuzz_script():
    spec = importlib.util.spec_from_file_location("fuzz_readers", ROOT / "scripts" / "fuzz_readers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# the first crashes the atheris target found, run against the code before the fixes (the inputs libFuzzer
# wrote, verbatim: the first byte picks the file type and shape; benchmarks/results/fuzz-readers.md)
ATHERIS_FOUND = {
    "CSV header with a latin-1 byte (UnicodeEncodeError), 12th input":
        (b'\x02prompt,cho\xa4en,rejected\n"a ""q""",yes,"no,\nreally"\n', [(2, "utf8")]),
    "gzip cut in its header (EOFError), 272nd input": (b'mt": "p", "re, "c"], "scores": [2, 2, 2]}\n', "error"),
    "TSV header of NULs and a cp1252 byte (UnicodeEncodeError), 88th input":
        (b"\x03prompt\tcompletion" + b"\x00" * 41 + b"\x94" + b"\x00" * 62 + b"\tlabel\nhi\tyes\ttrue\n",
         [(2, "utf8")]),
    # found in CI (a 3-second run, 2026-12-08): a U+2028 in a quarantined CSV row, written raw, split the
    # quarantine line for a reader that splits on it (str.splitlines); shrunk by hand to the same failure,
    # with U+0085 and U+2029 in a kept row too
    "a Unicode line break inside a CSV field (a JSONL line split by str.splitlines)":
        (b'\x02prompt,chosen,rejected\n"a\xe2\x80\xa8b"\np,"c\xc2\x85d","e\xe2\x80\xa9"\n', [(2, "csv")]),
}


@pytest.mark.parametrize("case", list(ATHERIS_FOUND))
def test_found_by_atheris(case, tmp_path):
    fz = fuzz_script()
    data, expect = ATHERIS_FOUND[case]
    kind, body, fmt = fz.as_file(data)
    path = tmp_path / f"input.{kind}"
    path.write_bytes(body)
    survived = False
    try:
        fz.check(path, fmt, tmp_path / "out")  # the fuzzer's own property
        if expect == "error":
            with pytest.raises(DataError, match="cannot be decompressed"):
                compute_stats(path, ReadOptions(format=fmt))
        else:
            quarantined = (tmp_path / "out" / "q.jsonl").read_text(encoding="utf-8").splitlines()
            assert [(q["line"], q["kind"]) for q in map(json.loads, quarantined)] == expect
        survived = True
    finally:
        tally(KIND, survived=survived, detail=case)


def test_the_fuzzer_knows_every_shape():
    from prefalign.data.shapes import SHAPES

    assert fuzz_script().FORMATS == ("auto", *SHAPES)


def test_bom_and_deep_values_read_as_without_them(tmp_path):
    """What the cases above fixed, read back: the BOM changes nothing, a too-deep array is skipped whole."""
    plain, bom = tmp_path / "a.csv", tmp_path / "b.csv"
    plain.write_bytes(b"prompt,chosen,rejected\np,a,b\n")
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    arr = tmp_path / "c.json"
    arr.write_bytes(b'[{"prompt": "' + b"]" * 10 + b'", "x": ' + deep(3000) + b"},\n" + PAIR + b"]")

    def bom_read_past():
        assert [r.to_json()["prompt"] for r in load_records(bom)[0]] == ["p"]
        assert compute_stats(bom, ReadOptions()).to_json() == compute_stats(plain, ReadOptions()).to_json()

    def deep_skipped():
        records, problems = load_records(arr)
        assert [p.where.line for p in problems] == [1] and len(records) == 1 and problems[0].raw.endswith("]}")

    for name, checks in (("a UTF-8 BOM before a CSV header", bom_read_past),
                         ("a deep JSON element with brackets in a string", deep_skipped)):
        held = False
        try:  # each file tallied once its checks have decided
            checks()
            held = True
        finally:
            tally(KIND, survived=held, detail=name)


def test_the_atheris_target_runs(tmp_path):
    """scripts/fuzz_readers.py for 3 seconds (make fuzz runs it for FUZZ_SECONDS): it starts, fuzzes,
    finds nothing, exits 0."""
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "fuzz_readers.py"), "-max_total_time=3",
                          f"-artifact_prefix={tmp_path}/", str(tmp_path / "corpus")],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    done = re.search(r"Done (\d+) runs", run.stderr)
    held = False
    try:  # one fuzzing run, tallied once the checks have decided (its inputs are mostly valid files)
        assert run.returncode == 0 and done and int(done.group(1)) > 10, run.stderr[-3000:]
        assert not list(tmp_path.glob("crash-*"))
        assert len(list((tmp_path / "corpus").iterdir())) > len(fuzz_script().SEEDS)  # seeded, then grown
        held = True
    finally:
        tally(KIND, survived=held, detail=f"atheris, 3 s, {done.group(1) if done else '?'} inputs")


def test_the_atheris_check_counts_the_rows(tmp_path):
    """The target's oracle, counted without the readers: a JSON array whose one latin-1 byte hid its other
    records (one `utf8` problem, 1 row of 3) failed it; each record is a row of its own now."""
    fz = fuzz_script()
    array = b'[\n{"prompt": "p1", "chosen": "a", "rejected": "b"},\n{"prompt": "caf\xe9", "chosen": "a", ' \
            b'"rejected": "b"},\n{"prompt": "p3", "chosen": "a", "rejected": "b"}\n]\n'
    path = tmp_path / "input.json"
    path.write_bytes(array)
    assert fz.expected_rows(path) == (3, False)
    fz.check(path, "auto", tmp_path / "out")
    path = tmp_path / "input.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + PAIR + b"\n \t\n\xff\n" + PAIR.replace(b'"a"', b'"c"'))
    assert fz.expected_rows(path) == (3, True)
    fz.check(path, "auto", tmp_path / "out")


def test_serve_schema_bounds_are_the_bounds_it_accepts():
    """make faults' schemathesis run found `top_k: -1` (vLLM's "off") accepted while the schema said
    minimum 0: a client generated from the schema could not send it, and a fuzzer's "invalid" request
    got a 200. Every integer bound the schema states is the edge of what the body accepts."""
    pytest.importorskip("fastapi")
    from pydantic import ValidationError

    from prefalign.serve.schemas import ChatBody, CompletionBody
    bodies = {CompletionBody: {"model": "m", "prompt": "a"},
              ChatBody: {"model": "m", "messages": [{"role": "user", "content": "a"}]}}
    for cls, base in bodies.items():
        for name, prop in cls.model_json_schema()["properties"].items():
            if prop.get("type") != "integer" or "minimum" not in prop:
                continue
            cls.model_validate({**base, name: prop["minimum"]})
            with pytest.raises(ValidationError):
                cls.model_validate({**base, name: prop["minimum"] - 1})
        # the second run found `presence_penalty: false` taken for its neutral 0: JSON's booleans are
        # not numbers (the schema's enum and type say so; Python's False == 0 does not)
        for name, prop in cls.model_json_schema()["properties"].items():
            if name in base or prop.get("type") == "boolean" or any(b.get("type") == "boolean"
                                                                   for b in prop.get("anyOf", [])):
                continue
            for value in (True, False):
                with pytest.raises(ValidationError):
                    cls.model_validate({**base, name: value})


def test_a_gz_cut_before_its_fourth_byte_gives_what_it_holds(tmp_path):
    """make faults: `[]` + newline gzipped and cut at 3/4 was refused whole ("cannot be decompressed"), as
    gzip's read(4) raises on a cut stream of fewer than 4 bytes; zlib reads the line. An empty .gz stays an
    empty file, and a .gz with no decompressible byte is still refused by name."""
    data = gzip.compress(b"[]\n")
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(data[:int(len(data) * 0.75)])
    stats = compute_stats(cut, ReadOptions())
    assert stats.records == 2 and stats.invalid == 2  # the row read (a list is not a pair) and the cut
    (tmp_path / "empty.jsonl.gz").write_bytes(b"")
    assert compute_stats(tmp_path / "empty.jsonl.gz", ReadOptions()).records == 0
    (tmp_path / "header.jsonl.gz").write_bytes(data[:10])
    with pytest.raises(DataError, match="cannot be decompressed"):
        compute_stats(tmp_path / "header.jsonl.gz", ReadOptions())


def test_utf16_starting_with_nul_is_refused_as_what_it_may_be(tmp_path):
    """make faults' third run: a UTF-16 file whose first character is NUL starts FF FE 00 00, UTF-32-LE's
    mark; it is refused whole (right) but was named UTF-32 only."""
    path = tmp_path / "data.jsonl"
    path.write_bytes(("\x00" + PAIR.decode() + "\n").encode("utf-16"))
    with pytest.raises(DataError, match="UTF-16") as e:
        compute_stats(path, ReadOptions())
    assert str(path) in str(e.value)
