"""The JSON array reader reads CHUNK_BYTES at a time (1 MiB): with the chunk shrunk to a few bytes, every
record, multi-byte UTF-8 character, `\\u` escape and stray byte of the fuzzed files lands across chunk
edges, where a streaming reader goes wrong. The property is test_fuzz_readers.py's, with every row placed."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from fuzzkit import Runs, fuzz_settings
from hypothesis import given
from test_fuzz_readers import KIND, ROWS, check, malformed, new_dir, rows_oracle, write

from prefalign.data import readers
from prefalign.data.curate import ReadOptions, compute_stats

JUNK = b"\xc3\x28\xff"
WIDE = {"prompt": "caf\u00e9 \u65e5\u672c \U0001f389", "chosen": "\u00fc\u00fc", "rejected": "\u03a9\U0001f600"}


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64])
def test_json_read_in_tiny_chunks(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(readers, "CHUNK_BYTES", chunk)
    runs = Runs(KIND)

    @fuzz_settings(5, 100)  # files under 20 kB: a 1-byte chunk reads them a byte at a time
    @given(ROWS.filter(lambda rows: len(repr(rows)) < 20_000), st.sampled_from(["json", "jsonl"]),
           st.one_of(st.none(), st.integers(0, 10**6)), st.integers(0, 6))
    def prop(rows, kind, junk_at, at):
        with runs.example(malformed(rows) or junk_at is not None):
            path = new_dir(tmp_path) / f"data.{kind}"
            rows = rows[:at] + [WIDE] + rows[at:]  # characters of 2, 3 and 4 bytes in every file
            starts = write(rows, kind, path, [], utf8=True)
            if junk_at is None:
                lines = path.read_bytes().split(b"\n") if kind == "jsonl" else None
                check(path, {}, runs, starts=starts, lines=lines)
            else:
                ref, data = path.with_name(f"ref.{kind}"), path.read_bytes()
                path.rename(ref)
                at = junk_at % (len(data) + 1)
                path.write_bytes(data[:at] + JUNK + data[at:])
                check(path, {}, runs, **rows_oracle(ref, path.read_bytes(), kind, junk=True))
            assert stats(path, chunk) == stats(path, DEFAULT), "the chunk size changed what was read"

    runs.run(prop)


DEFAULT = readers.CHUNK_BYTES


def stats(path, chunk: int) -> dict:
    saved, readers.CHUNK_BYTES = readers.CHUNK_BYTES, chunk
    try:
        return compute_stats(path, ReadOptions()).to_json()
    finally:
        readers.CHUNK_BYTES = saved
