"""Fuzzed data files through every reader and shape, into `data stats`, `data curate` and `data split` (the
library functions the commands call): arbitrary bytes, truncated files, deep nesting, huge lines, wrong
encodings, mixed shapes in one file, CSV quoting. Whatever the input, nothing crashes and nothing is lost:

- a whole file may be refused only with a DataError naming it (UTF-16/32, a .gz or Parquet/Arrow file
  that cannot be read from its first row, a file whose type cannot be told), and then by every command;
- otherwise every row ends in exactly one of kept or quarantined: the output files' lines are the counts,
  each line traceable to its source line, each source line to exactly one outcome, and the three commands
  agree on the counts; a bad JSONL line's quarantine entry holds its exact bytes.
"""

from __future__ import annotations

import base64
import csv
import gzip
import io
import json
import re
import shutil
import zlib
from collections import Counter
from decimal import Decimal
from pathlib import Path

import hypothesis.strategies as st
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fuzzkit import Runs, fuzz_settings, json_lines, json_whole, jsonl_oracle, jsonl_whole
from hypothesis import given

from prefalign.data.curate import CurateConfig, ReadOptions, SplitConfig, compute_stats, curate, split
from prefalign.data.shapes import SHAPES
from prefalign.errors import DataError

KIND = "fuzzed data file"
SET_ASIDE = {"duplicate", "conflict", "filtered"}

# ---------------------------------------------------------------- inputs

# text that has broken tools before: zero-width, RTL override, combining marks, emoji, BOM, NUL, lone
# surrogates (written as JSON \ud800 escapes), CSV's quote/delimiter/line breaks, a chat special token
WEIRD = ["", " ", "\u200b", "\u202e", "e\u0301", "\U0001f600", "\u05e9\u05dc\u05d5\u05dd", "\r\n", "\r", "\n", '"',
         ",", "\t", "\ufeff", "\x00", "\ud800", "\\", "<|im_end|>", "\n\nHuman:", "\n\nAssistant:", "[", "{",
         "true", "a", "b", "hi"]
TEXT = st.one_of(st.text(max_size=10), st.lists(st.sampled_from(WEIRD), max_size=4).map("".join))


class Deep:
    """A value nested `depth` arrays deep (written by hand: json.dumps itself recurses per level)."""

    def __init__(self, depth: int):
        self.depth = depth


def encode(v, utf8: bool = False) -> str:
    """JSON text on one line: ASCII (json.dumps's default), or with `utf8` non-ASCII characters written
    as themselves, as most real files have them (an unpaired surrogate, which UTF-8 cannot hold, still
    as a \\u escape)."""
    if isinstance(v, Deep):
        return "[" * v.depth + "1" + "]" * v.depth
    if isinstance(v, dict):
        return "{" + ", ".join(encode(str(k), utf8) + ": " + encode(x, utf8) for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(encode(x, utf8) for x in v) + "]"
    text = json.dumps(v, ensure_ascii=not utf8)  # NaN/Infinity as Python's json writes (and reads) them
    return re.sub("[\ud800-\udfff]", lambda m: f"\\u{ord(m.group()):04x}", text) if utf8 else text


SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-2, 2), st.floats(), TEXT,
                   st.sampled_from([1, 10, 400, 990, 3000]).map(Deep),
                   st.sampled_from([1000, 140_000]).map(lambda n: "x" * n))  # over csv's 128 KiB cell limit
ANY = st.recursive(SCALAR, lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(TEXT, c, max_size=3)),
                   max_leaves=6)
ROLE = st.sampled_from(["user", "assistant", "system", "tool", "human", "gpt", "bad"])


def msgs(roles: list[str], key="role", text="content"):
    return st.tuples(*[st.fixed_dictionaries({key: st.just(r), text: TEXT}) for r in roles]).map(list)


def hh(t):
    return t.map(lambda s: "\n\nHuman: q" + s + "\n\nAssistant: " + s)


# one generator per shape of data/shapes.py: well-formed rows, which mutations then break
SHAPED = {
    "pairs": st.fixed_dictionaries({"prompt": TEXT, "chosen": TEXT, "rejected": TEXT}),
    "conversation": st.fixed_dictionaries({"chosen": msgs(["user", "assistant"]),
                                           "rejected": msgs(["user", "assistant"])}),
    "hh": st.fixed_dictionaries({"chosen": hh(TEXT), "rejected": hh(TEXT)}),
    "sharegpt": st.fixed_dictionaries({"conversations": msgs(["human"], "from", "value"),
                                       "chosen": msgs(["gpt"], "from", "value").map(lambda m: m[0]),
                                       "rejected": msgs(["gpt"], "from", "value").map(lambda m: m[0])}),
    "kto": st.fixed_dictionaries({"prompt": TEXT, "completion": TEXT,
                                  "label": st.one_of(st.booleans(), st.sampled_from([0, 1, 2, "yes"]))}),
    "sft": st.fixed_dictionaries({"messages": st.lists(ROLE, min_size=1, max_size=4).flatmap(msgs)}),
    "ranked": st.fixed_dictionaries({"prompt": TEXT, "responses": st.lists(TEXT, max_size=4),
                                     "scores": st.lists(st.one_of(st.integers(-3, 3), st.floats()), max_size=4)}),
}
assert set(SHAPED) == set(SHAPES)


class Mutated(dict):
    """A row a mutation broke (or may have): what makes an example a malformed input, an injected fault."""


@st.composite
def mutated(draw, row):
    """A row with a key dropped, a value swapped for anything (deep, huge, wrong type) or a key added."""
    how = draw(st.sampled_from(["keep", "keep", "drop", "swap", "add"]))
    row = dict(row) if how == "keep" else Mutated(row)
    if how == "drop" and row:
        row.pop(draw(st.sampled_from(sorted(row))))
    elif how == "swap" and row:
        row[draw(st.sampled_from(sorted(row)))] = draw(ANY)
    elif how == "add":
        row[draw(TEXT)] = draw(ANY)
    return row


class Text:
    """A row written verbatim: broken JSON, a stray line."""

    def __init__(self, text: str):
        self.text = text


ROW = st.one_of(st.sampled_from(sorted(SHAPED)).flatmap(lambda s: SHAPED[s]).flatmap(mutated),
                ANY.map(lambda v: Mutated(v) if isinstance(v, dict) else v),  # anything: no shape's record
                st.sampled_from(['{"prompt": "p", "chosen": ', "not json", "{}", "[]", '{"a": 1,}']).map(Text))
ROWS = st.lists(ROW, max_size=6)  # shapes mixed in one file


def malformed(rows: list) -> bool:
    """A row that is not a shape's record as generated: broken text, a mutation, a value not an object."""
    return any(isinstance(r, (Text, Mutated)) or not isinstance(r, dict) for r in rows)


def cell(v, utf8: bool = False) -> str:
    return v if isinstance(v, str) else "" if v is None else encode(v, utf8)


def write(rows: list, kind: str, path: Path, blanks: list[bool], typed: str | None = None,
          utf8: bool = False) -> list[int]:
    """`rows` as a `kind` file; the line each non-blank row starts on (where a reader must place it).
    JSON is written ASCII-escaped, or with `utf8` its non-ASCII characters as UTF-8 bytes."""
    if kind == "jsonl":  # encode() writes one line: \n and \r inside strings are escaped (U+2028 may be raw)
        lines, starts = [], []
        for r, blank in zip(rows, blanks + [False] * len(rows), strict=False):
            if blank:
                lines.append("   ")
            lines.append(r.text if isinstance(r, Text) else encode(r, utf8))
            starts.append(len(lines))
        data = "\n".join(lines) + "\n"
    elif kind == "json":
        items = [r for r in rows if not isinstance(r, Text)]
        data = "[\n" + ",\n".join(encode(r, utf8) for r in items) + "\n]\n"
        starts = list(range(2, 2 + len(items)))
    elif kind in ("csv", "tsv"):
        data, starts = _csv(rows, "\t" if kind == "tsv" else ",", utf8)
    else:
        _arrow(rows, kind, path, typed)
        return list(range(1, 1 + sum(isinstance(r, dict) for r in rows)))
    path.write_bytes(data.encode("utf-8", errors="surrogatepass"))
    return starts


def _csv(rows: list, delimiter: str, utf8: bool = False) -> tuple[str, list[int]]:
    dicts = [r for r in rows if isinstance(r, dict)]
    header = sorted({str(k) for r in dicts for k in r}) or ["prompt"]
    buf = io.StringIO()
    # csv quotes a cell holding a character of its line terminator: with \r\n, any \r or \n (with \n alone a
    # lone \r goes out bare and ends the row early for every reader, a file the tests do not claim to read)
    w = csv.writer(buf, delimiter=delimiter, lineterminator="\r\n")
    w.writerow(header)
    starts = []
    for r in dicts:
        # a reader counts lines as the file iterates them: \r, \n and \r\n each end one
        line = 1 + len(re.findall(r"\r\n|\r|\n", buf.getvalue()))
        cells = [cell(r.get(k), utf8) for k in header]
        w.writerow(cells)
        if any(c.strip() for c in cells):  # a row of empty cells is a blank line: no record
            starts.append(line)
    return buf.getvalue(), starts


# Parquet/Arrow columns JSON has no type for: a problem's `raw` must still be written (it was a TypeError)
TYPED = {"binary": (pa.binary(), b"\xff\x00"), "timestamp": (pa.timestamp("s"), 1), "date": (pa.date32(), 1),
         "decimal": (pa.decimal128(5, 2), Decimal("1.50")), "list": (pa.list_(pa.int8()), [1]),
         "struct": (pa.struct([("a", pa.string())]), {"a": "x"})}


def _arrow(rows: list, kind: str, path: Path, typed: str | None = None) -> None:
    """Parquet/Arrow hold valid UTF-8 only (an unpaired surrogate is replaced); every column text, and one
    `typed` column of another type."""
    def utf8(text: str) -> str:
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")

    dicts = [{utf8(str(k)): v for k, v in r.items()} for r in rows if isinstance(r, dict)]
    header = sorted({k for r in dicts for k in r}) or ["prompt"]
    table = pa.table({k: [utf8(cell(r[k])) if k in r else None for r in dicts] for k in header})
    if typed:
        kind_, value = TYPED[typed]
        table = table.append_column(typed, pa.array([value] * len(dicts), kind_))
    if kind == "parquet":
        pq.write_table(table, path)
    else:
        with pa.ipc.new_stream(str(path), table.schema) as w:
            w.write_table(table)


# ---------------------------------------------------------------- the property


def read_lines(path: Path) -> list[dict]:
    text = path.read_bytes().decode("utf-8")  # strict: every output line is valid UTF-8
    rows = [json.loads(line) for line in text.split("\n")[:-1]]  # JSONL: \n ends a line (U+2028 may be in one)
    for r in rows:
        json.dumps(r, ensure_ascii=False).encode("utf-8")  # and holds no unpaired surrogate
    return rows


def within(file: str, path: Path) -> bool:
    """The file a row came from is the input, or one of its files (a datasets folder's Arrow files)."""
    return file == str(path) or file.startswith(f"{path}/")


def source_line(record: dict, path: Path) -> int:
    file, _, where = record["source"].rpartition(":")
    assert within(file, path), record["source"]
    return int(where.removeprefix("row "))


def check(path: Path, opts: dict, runs: Runs, *, starts: list[int] | None = None, lines: list[bytes] | None = None,
          conflicts: str = "drop", dedup: bool = True, whole: set[int] = frozenset(), rows: int = 0) -> None:
    """The property (module docstring); the input rows it finds lost are added to `runs` before it asserts.

    `starts`: the line of every row, when the test knows them all; `whole`: lines of rows that are whole
    in the file (before a cut, say) and must each have an outcome; `rows`: how many rows at least."""
    out = path.parent / "out"
    try:
        stats = compute_stats(path, ReadOptions(**opts))
    except DataError as e:
        runs.example_lost += max(len(whole), rows)
        assert not whole and not rows, f"refused whole, though {max(len(whole), rows)} rows are readable: {e}"
        assert str(path) in str(e), f"a whole-file error must name the file: {e}"
        for command in (lambda: curate(path, out / "k.jsonl", out / "q.jsonl", CurateConfig(**opts)),
                        lambda: split(path, out / "split", SplitConfig(**opts))):
            try:
                command()
            except DataError as again:
                assert str(again) == str(e)
            else:
                raise AssertionError("stats refused the file, another command read it")
        return
    res = curate(path, out / "k.jsonl", out / "q.jsonl", CurateConfig(**opts, conflicts=conflicts, dedup=dedup))
    kept, quarantined = read_lines(out / "k.jsonl"), read_lines(out / "q.jsonl")
    aside = [q for q in quarantined if q["kind"] in SET_ASIDE]  # good records not kept (no problem kind is one)
    problems = [q for q in quarantined if q["kind"] not in SET_ASIDE]
    assert len(kept) == res.kept and len(problems) == res.rows_invalid
    assert Counter(q["kind"] for q in aside) == res.set_aside
    # the three commands agree
    assert (stats.records, stats.invalid, stats.pairs + stats.unpaired) == (res.rows, res.rows_invalid,
                                                                           res.records_valid)
    counts = split(path, out / "split", SplitConfig(**opts))
    assert (counts.get("rows", 0), counts.get("invalid", 0)) == (res.rows, res.rows_invalid)
    assert counts.get("train", 0) + counts.get("eval", 0) == res.records_valid
    for name in ("train", "eval", "invalid"):
        file = out / "split" / ("quarantine.jsonl" if name == "invalid" else f"{name}.jsonl")
        assert (len(read_lines(file)) if file.exists() else 0) == counts.get(name, 0)
    # each line traceable to its source; each source row to exactly one outcome
    for q in problems:
        assert within(q["file"], path) and (q.get("line") or q.get("row")) >= 1
    valid = {source_line(r, path) for r in kept} | {source_line(q["raw"], path) for q in aside}
    invalid = [q.get("line") or q.get("row") for q in problems]
    missing = set(whole) - valid - set(invalid)
    runs.example_lost += max(len(missing), rows - res.rows)
    assert not missing and res.rows >= rows, (sorted(missing), res.rows, rows)
    if starts is None:
        return
    runs.example_lost += len(set(starts) - valid - set(invalid))
    assert not valid & set(invalid), "a row both kept and quarantined"
    assert Counter(valid) + Counter(invalid) == Counter(starts), (starts, valid, invalid)
    assert res.rows == len(starts) and res.rows - res.rows_invalid == len(valid)
    if lines is not None:  # JSONL: a quarantined line holds the very bytes of its source line
        for q in problems:
            raw = base64.b64decode(q["raw_base64"]) if "raw_base64" in q else q["raw"].encode("utf-8", "surrogatepass")
            assert raw == lines[q["line"] - 1].strip()


def rows_oracle(ref: Path, data: bytes, kind: str, junk: bool) -> dict:
    """What check() is told of `data`, `ref` re-encoded or with bytes inserted (`junk`: the row they land in
    may merge with a neighbour): each JSONL line's or JSON element's outcome, else how many rows at least."""
    if kind == "jsonl":
        starts, lines = jsonl_oracle(data.removeprefix(b"\xef\xbb\xbf"))
        return {"starts": starts, "lines": lines}
    if kind == "json" and (starts := json_lines(data)) is not None:
        return {"starts": starts}
    try:
        reference = compute_stats(ref, ReadOptions()).records
    except DataError:
        return {}
    return {"rows": reference - 1 if junk else reference}


def new_dir(tmp_path: Path) -> Path:
    """An empty folder for one example (the same one each time: thousands of examples leave no litter)."""
    folder = tmp_path / "example"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    return folder


# ---------------------------------------------------------------- the tests

FORMATS = ["jsonl", "json", "csv", "tsv", "parquet", "arrow"]
SHAPE_OPTS = st.sampled_from(["auto", *SHAPES])


@pytest.mark.parametrize("kind", FORMATS)
def test_structured_rows_every_reader_and_shape(tmp_path, kind):
    runs = Runs(KIND)

    @fuzz_settings(20, 500)
    @given(ROWS, SHAPE_OPTS, st.lists(st.booleans(), max_size=6), st.sampled_from(["drop", "keep_first", "keep"]),
           st.booleans(), st.sampled_from([None, None, *TYPED]), st.booleans())
    def prop(rows, shape, blanks, conflicts, dedup, typed, utf8):
        with runs.example(malformed(rows) or typed is not None):
            path = new_dir(tmp_path) / f"data.{kind}"
            starts = write(rows, kind, path, blanks, typed, utf8)
            lines = path.read_bytes().split(b"\n") if kind == "jsonl" else None
            check(path, {"format": shape}, runs, starts=starts, lines=lines, conflicts=conflicts, dedup=dedup)

    runs.run(prop)


@pytest.mark.parametrize("name", ["x.jsonl", "x.json", "x.csv", "x.tsv", "x.parquet", "x.arrow", "x.jsonl.gz",
                                  "x.csv.gz", "x.data"])
def test_arbitrary_bytes(tmp_path, name):
    runs = Runs(KIND)

    @fuzz_settings(15, 400)
    @given(st.one_of(st.binary(max_size=200), st.lists(st.sampled_from(
        [b"{", b"}", b"[", b"]", b'"', b",", b":", b"\n", b"\r", b" ", b"\\", b'"prompt"', b'"chosen"', b'"a"',
         b"\xff", b"\xe9", b"\xf0\x9f", b"\x00", b"\xef\xbb\xbf", b"\xff\xfe", b"1e5"]), max_size=40).map(b"".join)))
    def prop(data):
        with runs.example(bool(data)):  # any bytes but none (an empty file) are a malformed file
            path = new_dir(tmp_path) / name
            path.write_bytes(data)
            plain_jsonl = name == "x.jsonl" and not data.startswith((b"\xff\xfe", b"\xfe\xff"))
            starts, lines = jsonl_oracle(data.removeprefix(b"\xef\xbb\xbf")) if plain_jsonl else (None, None)
            check(path, {}, runs, starts=starts, lines=lines)

    runs.run(prop)


@pytest.mark.parametrize("kind,gz", [(k, False) for k in FORMATS] + [(k, True) for k in ("jsonl", "json", "csv")])
def test_truncated_files(tmp_path, kind, gz):
    """A valid file cut anywhere, plain or gzipped: the rows before the cut are read, the cut one quarantined
    (or the whole file refused by name when nothing of it can be read)."""
    runs = Runs(KIND)

    @fuzz_settings(10, 300)
    @given(ROWS.filter(len), st.floats(0, 1), st.booleans())
    def prop(rows, cut, utf8):
        with runs.example():
            folder = new_dir(tmp_path)
            whole = folder / f"whole.{kind}"
            write(rows, kind, whole, [], utf8=utf8)
            data = whole.read_bytes()
            if gz:
                data = gzip.compress(data)
            path = folder / (f"data.{kind}" + (".gz" if gz else ""))
            path.write_bytes(data[:int(len(data) * cut)])
            runs.malformed = int(len(data) * cut) < len(data)
            # what can be read before the cut, found without the readers
            prefix = zlib.decompressobj(31).decompress(path.read_bytes()) if gz else path.read_bytes()
            starts, lines = jsonl_oracle(prefix) if kind == "jsonl" and not gz else (None, None)
            whole_rows = {"json": json_whole, "jsonl": jsonl_whole}.get(kind, lambda _: set())(prefix)
            check(path, {}, runs, starts=starts, lines=lines, whole=whole_rows)

    runs.run(prop)


VALID_STATE = encode({"_data_files": [{"filename": "data.arrow"}]}).encode()
STATE = st.one_of(
    st.just({"_data_files": [{"filename": "data.arrow"}]}),
    st.fixed_dictionaries({"_data_files": st.one_of(ANY, st.lists(st.fixed_dictionaries({"filename": ANY})))}), ANY)


def test_datasets_folders(tmp_path):
    """save_to_disk folders whose state.json or dataset_dict.json hold anything (or are not JSON): read, or a
    DataError naming the folder's file."""
    runs = Runs(KIND)

    @fuzz_settings(15, 400)
    @given(ROWS, st.one_of(STATE.map(encode).map(lambda t: t.encode("utf-8", "surrogatepass")), st.binary(max_size=40)),
           st.one_of(st.none(), ANY.map(lambda v: {"splits": v}), st.just({"splits": ["train"]})))
    def prop(rows, state, splits):
        with runs.example(state != VALID_STATE or splits not in (None, {"splits": ["train"]})):
            folder = new_dir(tmp_path) / "ds"
            data = folder / "train" if splits else folder
            data.mkdir(parents=True)
            _arrow(rows, "arrow", data / "data.arrow")
            (data / "state.json").write_bytes(state)
            if splits is not None:
                (folder / "dataset_dict.json").write_text(encode(splits))
            check(folder, {}, runs)

    runs.run(prop)


ENCODINGS = ["utf-8", "utf-8-sig", "utf-16", "utf-32", "latin-1", "cp1252", "utf-8+junk"]


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_wrong_encodings(tmp_path, encoding):
    """UTF-16/32 (their BOM) is refused whole, by name; a UTF-8 BOM is read past and changes nothing;
    latin-1/cp1252 and stray bytes become per-row problems."""
    runs = Runs(KIND)

    @fuzz_settings(10, 300)
    @given(ROWS, st.sampled_from(["jsonl", "json", "csv"]), st.integers(0, 10**6), st.booleans())
    def prop(rows, kind, at, utf8):
        with runs.example():
            folder = new_dir(tmp_path)
            ref = folder / f"ref.{kind}"
            write(rows, kind, ref, [], utf8=utf8)
            text = ref.read_bytes().decode("utf-8", "surrogatepass")
            if encoding == "utf-8+junk":
                data = ref.read_bytes()
                data = data[:at % (len(data) + 1)] + b"\xc3\x28\xff" + data[at % (len(data) + 1):]
            else:
                data = text.encode(encoding, errors="replace" if encoding[0] in "lc" else "surrogatepass")
            runs.malformed = data != ref.read_bytes()
            path = folder / f"data.{kind}"
            path.write_bytes(data)
            if encoding in ("utf-16", "utf-32"):
                try:
                    compute_stats(path, ReadOptions())
                except DataError as e:
                    assert str(path) in str(e) and encoding.upper() in str(e)
                else:
                    raise AssertionError(f"a {encoding} file was read")
                check(path, {}, runs)
                return
            check(path, {}, runs, **rows_oracle(ref, data, kind, junk=encoding == "utf-8+junk"))
            if encoding == "utf-8-sig":  # the BOM read past: the same counts as without it
                assert (compute_stats(path, ReadOptions()).to_json() ==
                        {**compute_stats(ref, ReadOptions()).to_json()})

    runs.run(prop)


CSV_CELL = st.one_of(
    st.lists(st.sampled_from(['"', ",", "\t", "\n", "\r", "\r\n", " ", "a", "b", "\ufeff", "''", '""', "\\",
                              "x y", "\u200b", "\U0001f600"]), max_size=5).map("".join),
    st.sampled_from(["true", "False", "null", "1", "0.5", "[1, 2]", '{"a": 1}', "[]", '["x"]']))  # text, not JSON


def test_csv_quoting(tmp_path):
    """Pairs in CSV/TSV with quotes, delimiters and line breaks inside cells, quoted every way csv writes,
    with or without a BOM: every row found on its line; a kept row's texts are exactly the cells written."""
    runs = Runs(KIND)

    @fuzz_settings(30, 1000)
    @given(st.lists(st.tuples(CSV_CELL, CSV_CELL, CSV_CELL), max_size=5), st.sampled_from(["csv", "tsv"]),
           st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONNUMERIC]), st.booleans(),
           st.sampled_from(["\n", "\r\n"]))
    def prop(rows, kind, quoting, bom, end):
        # the faults injected: cells holding a quote, delimiter or line break, a BOM (else plain CSV)
        with runs.example(bom or any(c in cell for r in rows for cell in r for c in '"\r\n,\t')):
            path = new_dir(tmp_path) / f"pairs.{kind}"
            buf = io.StringIO()
            w = csv.writer(buf, delimiter="\t" if kind == "tsv" else ",", quoting=quoting, lineterminator=end)
            w.writerow(["prompt", "chosen", "rejected"])
            starts, cleaned = [], []
            for r in rows:
                r = tuple(c.replace("\r", "") for c in r) if end == "\n" else r  # see _csv
                line = 1 + len(re.findall(r"\r\n|\r|\n", buf.getvalue()))
                w.writerow(r)
                cleaned.append(r)
                if any(c.strip() for c in r):
                    starts.append(line)
            path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + buf.getvalue().encode("utf-8"))
            check(path, {}, runs, starts=starts, conflicts="keep", dedup=False)
            written = dict(zip(starts, [r for r in cleaned if any(c.strip() for c in r)], strict=True))
            for k in read_lines(path.parent / "out" / "k.jsonl"):
                assert (k["prompt"], k["chosen"], k["rejected"]) == written[source_line(k, path)]
            quarantined = read_lines(path.parent / "out" / "q.jsonl")
            assert not [q for q in quarantined if q["kind"] == "type"], "a text cell read as another type"
            if bom:  # Excel's BOM before the header is read past: the same records as without it
                plain = path.with_name(f"plain.{kind}")
                plain.write_bytes(path.read_bytes()[3:])
                assert compute_stats(path, ReadOptions()).to_json() == compute_stats(plain, ReadOptions()).to_json()

    runs.run(prop)
