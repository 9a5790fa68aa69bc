"""A JSON array with bytes that are not UTF-8, cut short in a .gz, or followed by text: only the element
holding the bad bytes is a problem (with its exact bytes) and the array is read on, as a JSONL file is read
past a bad line; a .json.gz that breaks off gives the rows before the break and one problem, as .jsonl.gz does."""

import gzip
import json

import pytest

from prefalign.data import readers
from prefalign.data.readers import Row, read_rows

PAIRS = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(3)]


def array(records: list[bytes]) -> bytes:
    return b"[\n" + b",\n".join(records) + b"\n]\n"


def outcome(path):
    """(line, 'row' | problem kind, raw bytes of a problem) per item read."""
    out = []
    for item in read_rows(path):
        if isinstance(item, Row):
            out.append((item.where.line, "row", None))
        else:
            raw = item.raw if isinstance(item.raw, bytes) else item.raw.encode()
            out.append((item.where.line, item.kind, raw))
    return out


def write(tmp_path, name, data, gz):
    path = tmp_path / (name + ".gz" if gz else name)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, readers.CHUNK_BYTES])
def test_a_latin1_byte_costs_only_its_record(tmp_path, monkeypatch, chunk, gz):
    monkeypatch.setattr(readers, "CHUNK_BYTES", chunk)
    records = [json.dumps(r).encode() for r in PAIRS]
    records[1] = records[1].replace(b"p1", b"caf\xe9")  # latin-1 'é'
    path = write(tmp_path, "x.json", array(records), gz)
    assert outcome(path) == [(2, "row", None), (3, "utf8", records[1]), (4, "row", None)]


JUNK = b"\xc3\x28\xff"  # a lead byte without its continuation, and a byte UTF-8 never has


@pytest.mark.parametrize("chunk", [1, 3, 64])
@pytest.mark.parametrize("at", ["before the '['", "before the first", "inside a key", "inside a number",
                                "inside a \\u escape", "after a '\\'", "before a comma", "after a comma",
                                "before the ']'"])
def test_stray_bytes_outside_strings_cost_at_most_one_element(tmp_path, monkeypatch, chunk, at):
    monkeypatch.setattr(readers, "CHUNK_BYTES", chunk)
    r = [b'{"prompt": "p0", "n": 12, "e": "\\u00e9\\n", "chosen": "a", "rejected": "b"}']
    r += [json.dumps(x).encode() for x in PAIRS[1:]]
    data = array(r)
    where = {"before the '['": 0, "before the first": data.index(b"{"), "inside a \\u escape": data.index(b"u00") + 2,
             "after a '\\'": data.index(b"\\n") + 1, "inside a key": data.index(b"prompt") + 2,
             "inside a number": data.index(b"12") + 1, "before a comma": data.index(b"},") + 1,
             "after a comma": data.index(b",\n{") + 1, "before the ']'": data.rindex(b"}") + 1}[at]
    path = write(tmp_path, "x.json", data[:where] + JUNK + data[where:], False)
    got = outcome(path)
    problems = [(line, kind, raw) for line, kind, raw in got if kind != "row"]
    assert len(problems) == 1 and problems[0][1] == "utf8" and JUNK in problems[0][2], got
    assert len([x for x in got if x[1] == "row"]) >= len(r) - 1, got  # every other element still a row
    assert {line for line, _, _ in got} <= {1, 2, 3, 4}  # where the elements (or the bytes) stand


@pytest.mark.parametrize("kind", ["json", "jsonl"])
def test_a_gz_cut_short_gives_the_rows_before_the_break(tmp_path, kind):
    recs = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(2000)]
    lines = [json.dumps(x) for x in recs]
    text = "[\n" + ",\n".join(lines) + "\n]\n" if kind == "json" else "".join(x + "\n" for x in lines)
    packed = gzip.compress(text.encode())
    path = tmp_path / f"y.{kind}.gz"
    path.write_bytes(packed[:int(len(packed) * 0.9)])
    got = outcome(path)
    *rows, last = got
    assert all(kind == "row" for _, kind, _ in rows) and len(rows) > 1000
    assert last[1] == "corrupt" and last[0] == rows[-1][0] + 1
    assert [line for line, _, _ in rows] == list(range(rows[0][0], rows[0][0] + len(rows)))


# (line, outcome, raw) of inputs the pre-streaming reader made one `utf8` problem of, or read past in silence
CHANGED = {
    b'[{"a": "ok"},\n{"b": "\xff"}]': [(1, "row", None), (2, "utf8", b'{"b": "\xff"}')],
    b"[1]\n\n\xfe": [(1, "row", None), (3, "utf8", b"\xfe")],
    b'[1,\r2,\r"\xe2\x82"]': [(1, "row", None), (1, "row", None), (1, "utf8", b'"\xe2\x82"')],  # lines end at \n
    b'[1,\r\n2,\r\n"ok",\r\n"\xc3("]': [(1, "row", None), (2, "row", None), (3, "row", None), (4, "utf8", b'"\xc3("')],
    b'["\xed\xa0\x80"]': [(1, "utf8", b'"\xed\xa0\x80"')],  # an encoded surrogate is not UTF-8
    b"[1, '\xc3\xa9']\xe2": [(1, "row", None), (1, "json", b"'\xc3\xa9']\xe2")],  # broken JSON, bytes kept
    b'{"a": x\n\xff': [(1, "json", b'{"a": x'), (2, "utf8", b"\xff")],  # read as JSONL: each line its own
    b"[ \n ]  trailing": [(2, "json", b"trailing")],
    b'[{"a": 1}]\n and then some {': [(1, "row", None), (2, "json", b"and then some {")],
}


@pytest.mark.parametrize("chunk", [1, 7, readers.CHUNK_BYTES])
@pytest.mark.parametrize("data", list(CHANGED))
def test_what_the_old_reader_read_otherwise(tmp_path, monkeypatch, data, chunk):
    monkeypatch.setattr(readers, "CHUNK_BYTES", chunk)
    assert outcome(write(tmp_path, "x.json", data, False)) == CHANGED[data]
