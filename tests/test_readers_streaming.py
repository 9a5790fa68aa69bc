"""read_json_array streams: chunked reads, records and characters split across chunk edges, line numbers
counted once, bounded memory, linear time, and every record and problem exactly as before streaming."""

import gzip
import json
import time
import tracemalloc
from pathlib import Path

import pytest

from prefalign.data import readers
from prefalign.data.readers import Location, Problem, Row, _decode, read_json_array, read_jsonl

CHUNKS = [1, 7, 64, readers.CHUNK_BYTES]


def reference_read_json_array_before_streaming(path: Path):
    """ORACLE ONLY: the pre-streaming read_json_array, copied verbatim (whole-file read, quadratic
    line_of). The streaming reader must give exactly its output on every input."""
    with readers._open_binary(path) as f:
        data = f.read()
    text = _decode(data, Location(str(path), 1))
    if isinstance(text, Problem):
        # Find the first bad line so the message points somewhere useful.
        for number, line in enumerate(data.splitlines(), start=1):
            bad = _decode(line, Location(str(path), number))
            if isinstance(bad, Problem):
                yield bad
                return
        yield text
        return
    decoder = json.JSONDecoder()
    pos, n = 0, len(text)

    def skip_ws(i: int) -> int:
        while i < n and text[i] in " \t\r\n":
            i += 1
        return i

    def line_of(i: int) -> int:
        return text.count("\n", 0, i) + 1

    pos = skip_ws(pos)
    if pos >= n or text[pos] != "[":
        if pos < n and text[pos] == "{":
            yield from read_jsonl(path)  # one object per line, despite the .json name
            return
        yield Problem(Location(str(path), line_of(pos)), "", "expected a JSON array of records", "json",
                      raw=text[:200])
        return
    pos = skip_ws(pos + 1)
    if pos < n and text[pos] == "]":
        return
    while pos < n:
        where = Location(str(path), line_of(pos))
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            rest = text[pos:]
            yield Problem(where, "", f"broken JSON: {e.msg} (line {e.lineno}, column {e.colno}); "
                          "the rest of the array cannot be read", "json", raw=rest)
            return
        yield Row(where, value, text[pos:end])
        pos = skip_ws(end)
        if pos < n and text[pos] == ",":
            pos = skip_ws(pos + 1)
        elif pos < n and text[pos] == "]":
            return
        else:
            yield Problem(Location(str(path), line_of(pos)), "", "expected ',' or ']' between records",
                          "json", raw=text[pos:pos + 200])
            return


def write(path: Path, data: bytes, gz: bool) -> Path:
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def array_text(records, indent=None, sep=",\n") -> tuple[str, list[tuple[int, object, str]]]:
    """The array's text and, per record, (line where its text starts, value, text): the line comes from
    counting newlines before the record's offset, independently of the reader."""
    parts, expected, newlines = ["[\n"], [], 1
    for i, record in enumerate(records):
        if i:
            parts.append(sep)
            newlines += sep.count("\n")
        raw = json.dumps(record, indent=indent, ensure_ascii=False)
        expected.append((newlines + 1, record, raw))
        parts.append(raw)
        newlines += raw.count("\n")
    return "".join(parts) + "\n]\n", expected


NON_ASCII = ["é", "日本語", "🎉", "ü" * 3, "Ωmega", "a🎉b日c"]
ARRAYS = {
    "small": ([{"a": 1}, {"b": 2}], None),
    "nested": ([{"m": [{"role": "user", "content": "hi"}, {"x": {"y": [1, [2, [3]]]}}]}] * 3, None),
    "tricky strings": ([{"s": "a,b]"}, {"s": "[{"}, {"s": 'he said "hi", ok]'}, {"s": "two\nlines"},
                        {"s": "back\\slash\\"}, {"s": "}{][,:"}, "bare ], string"], None),
    "pretty-printed": ([{"prompt": f"q{i}", "chosen": ["a", {"b": i}], "rejected": None} for i in range(6)],
                       2),
    "numbers and literals": ([1.5e3, 12345678, -0.25, 1e-07, 0, -0.0, True, False, None, 10**20, 2.5], None),
    "record bigger than a chunk": ([{"a": 1}, {"big": "x" * 5000, "n": list(range(300))}, {"c": 3}], None),
    "non-ASCII across chunk edges": ([{"t": NON_ASCII[i % 6] * (i % 5 + 1), "k": i} for i in range(40)],
                                     None),
    # separators wider than a chunk make refills land in the whitespace after a multi-line record, where
    # a line counter that forgets the text dropped at a refill goes wrong
    "wide separators": ([{"a": [i, {"b": "c"}]} for i in range(30)], 2, ",\n\n \t\r" + " \n" * 40),
}


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("name", list(ARRAYS))
def test_rows_and_lines_match_json_load(tmp_path, monkeypatch, name, chunk, gz):
    monkeypatch.setattr(readers, "CHUNK_BYTES", chunk)
    text, expected = array_text(*ARRAYS[name])
    path = write(tmp_path / "a.json", text.encode(), gz)
    items = list(read_json_array(path))
    assert all(isinstance(item, Row) for item in items)
    with readers._open_binary(path) as f:
        assert [item.value for item in items] == json.load(f)
    assert [(item.where, item.value, item.raw) for item in items] == [
        (Location(str(path), line), value, raw) for line, value, raw in expected]


def test_the_non_ascii_case_really_splits_characters_across_7_byte_chunks():
    text, _ = array_text(ARRAYS["non-ASCII across chunk edges"][0])
    offset, split = 0, 0
    for ch in text:
        size = len(ch.encode())
        split += size > 1 and offset // 7 != (offset + size - 1) // 7
        offset += size
    assert split >= 10


@pytest.mark.parametrize("chunk", range(1, 13))
def test_numbers_cut_at_every_chunk_edge(tmp_path, monkeypatch, chunk):
    # '1.' of '1.5' or '2e' of '2e+7' decodes on its own: a number ending where the window ends is
    # only trusted once a few more characters are in
    monkeypatch.setattr(readers, "CHUNK_BYTES", chunk)
    numbers = ["1.5", "2e+7", "-3.25E-2", "4e5", "1234567", "-0.0", "6.0e1", "7E+1"] * 12
    text = "[" + ",".join(numbers) + "]"
    path = write(tmp_path / "n.json", text.encode(), False)
    assert [item.raw for item in read_json_array(path)] == numbers
    assert [item.value for item in read_json_array(path)] == json.loads(text)


def test_record_bigger_than_the_default_chunk(tmp_path):
    text, expected = array_text([{"a": 1}, {"huge": "é" * readers.CHUNK_BYTES}, {"b": [2] * 1000}], 1)
    path = write(tmp_path / "a.json", text.encode(), False)
    assert [(r.where.line, r.value, r.raw) for r in read_json_array(path)] == expected


# Bytes that are not UTF-8 and text after the closing ']' are not read as the old reader did (it made the
# first bad line the file's only problem, and ignored text after the array): test_readers_bad_bytes.py
ERRORS = {
    "empty file": b"",
    "whitespace only": b"  \n\n \t\r\n  ",
    "a string, not an array": b'  \n  "abc"',
    "a number, not an array": b"\n\n42",
    "long non-array": b"\n" + b"z" * 500,
    "objects one per line": b'{"a": 1}\n\n{"b": 2}\n{"c": \n',
    "byte order mark": "\ufeff[1]".encode(),
    "only an opening bracket": b"[",
    "missing comma": b'[{"a": 1}\n {"b": 2}]',
    "missing ']' at the end": b'[{"a": 1},\n{"b": 2}',
    "missing ']' after whitespace": b'[{"a": 1},\n{"b": 2}\n\n  \n',
    "trailing comma at the end": b"[1, 2,\n",
    "trailing comma before ']'": b"[1,\n]",
    "garbage between records": b"[1 x 2]",
    "long garbage after a record": b"[1,\n2 " + b"y\n" * 300 + b"]",
    "invalid literal": b'[{"a": 1},\n{"b": tru}]',
    "unterminated string": b'[{"a": 1},\n {"b": "never closed\n , 2]',
    "error deep inside a multi-line record": b'[\n {"a": 1,\n  "b": [1, 2,\n   }\n]',
    "error mid-line after other records": b'[1, 2, 3, {"a": x}]',
    "error far along a long first line": b"[" + b"1, " * 100 + b'{"a": x}]',
    "broken record early, long tail": b'[{"a": x},\n' + b'{"b": 1},\n' * 2000 + b"]",
    "control character in a string": b'[{"a": "tab\there"}]',
    "number cut short: 1.": b"[1.]",
    "number cut short: 1e": b"[2, 1e]",
    "lone minus": b"[-]",
    "leading zero": b"[01]",
    "exponents": b"[1.5e+3, 2E-2, -0, 7e1]",
    "infinities": b"[Infinity, -Infinity, 1]",
}


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, readers.CHUNK_BYTES])
@pytest.mark.parametrize("name", list(ERRORS))
def test_malformed_input_gives_what_the_old_reader_gave(tmp_path, monkeypatch, name, chunk, gz):
    monkeypatch.setattr(readers, "CHUNK_BYTES", chunk)
    path = write(tmp_path / "bad.json", ERRORS[name], gz)
    expected = list(reference_read_json_array_before_streaming(path))
    assert list(read_json_array(path)) == expected


def test_error_positions_are_file_lines_and_columns(tmp_path, monkeypatch):
    # spelled out once so the oracle comparison above is not the only guard on the translated position
    monkeypatch.setattr(readers, "CHUNK_BYTES", 7)
    path = write(tmp_path / "bad.json", b'[1,\n  2, {"a":\n  x}]', False)
    *rows, problem = read_json_array(path)
    assert [r.where.line for r in rows] == [1, 2]
    assert problem.where.line == 2 and "(line 3, column 3)" in problem.message
    assert problem.raw == '{"a":\n  x}]'


def test_a_record_much_bigger_than_the_chunk_is_decoded_in_linear_time(tmp_path, monkeypatch):
    # The window at least doubles before each retry of an unfinished record, so an 8 MB record read
    # 4 KiB at a time is decoded about a dozen times, not two thousand (which takes many seconds).
    monkeypatch.setattr(readers, "CHUNK_BYTES", 4096)
    record = {"s": "x" * 4_000_000, "n": list(range(600_000))}
    path = write(tmp_path / "big.json", json.dumps([record, 1]).encode(), False)
    started = time.perf_counter()
    first, second = read_json_array(path)
    elapsed = time.perf_counter() - started
    assert first.value == record and second.value == 1
    assert elapsed < 2.0, f"{elapsed:.2f}s"


def write_big_array(path: Path, records: int, text_size: int) -> None:
    filler = "x" * text_size
    with open(path, "w") as f:
        f.write("[\n")
        for start in range(0, records, 1000):
            rows = (json.dumps({"id": i, "chosen": filler, "rejected": "no"})
                    for i in range(start, min(start + 1000, records)))
            f.write(("," if start else "") + "\n,".join(rows) + "\n")
        f.write("]\n")


def test_a_50mb_array_is_read_in_bounded_memory(tmp_path):
    path = tmp_path / "big.json"
    write_big_array(path, 50_000, 1000)
    size = path.stat().st_size
    assert size > 50e6
    tracemalloc.start()
    try:
        count = 0
        for item in read_json_array(path):
            assert isinstance(item, Row)
            count += 1
            last_line = item.where.line
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 50_000 and last_line == 50_001
    # the pre-streaming reader peaked at about twice the file size (the bytes plus the decoded text)
    assert peak < 10e6, f"peak {peak / 1e6:.1f} MB for a {size / 1e6:.0f} MB file"


def test_line_numbers_cost_linear_time(tmp_path):
    # 20k pretty-printed records (1.5 MB): the old line_of rescanned the text for every record and took
    # 3-6 s here; counting only new text takes well under 0.1 s, so 1 s leaves room for a slow machine.
    path = tmp_path / "many.json"
    records = [{"id": i, "prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(20_000)]
    text, expected = array_text(records, indent=1)
    path.write_text(text)
    started = time.perf_counter()
    lines = [item.where.line for item in read_json_array(path)]
    elapsed = time.perf_counter() - started
    assert lines == [line for line, _, _ in expected]
    assert elapsed < 1.0, f"{elapsed:.2f}s for 20k records"
