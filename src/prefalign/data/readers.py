"""Stream raw rows out of files: JSONL, JSON arrays, CSV, Parquet and `datasets.save_to_disk` folders.

Every reader is a generator of `Row`s in bounded memory (Parquet and Arrow go batch by batch; a JSON
array is decoded element by element). A row that cannot even be parsed comes out as a `Problem`
carrying the original text, so nothing is ever dropped silently.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .records import Location, Problem

FILE_TYPES = ("jsonl", "json", "csv", "parquet", "arrow")


@dataclass
class Row:
    where: Location
    value: Any  # the parsed object (a dict for well-formed rows)
    raw: Any  # what to write to a quarantine file: the original line/text where there is one


def detect_file_type(path: Path) -> str:
    if path.is_dir():
        return "arrow"
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for suffix, kind in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "json"), (".csv", "csv"),
                         (".tsv", "csv"), (".parquet", "parquet"), (".arrow", "arrow")):
        if name.endswith(suffix):
            return kind
    # No telling suffix: peek. A JSON array starts with '['; one object per line starts with '{'.
    with _open_binary(path) as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"["):
        return "json"
    if head.startswith(b"{"):
        return "jsonl"
    raise ValueError(f"{path}: cannot tell the file type from its name; pass --reader "
                     f"({', '.join(FILE_TYPES)})")


def _open_binary(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def _decode(data: bytes, where: Location) -> str | Problem:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        return Problem(where, "", f"not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})",
                       "utf8", raw=data)


def read_jsonl(path: Path) -> Iterator[Row | Problem]:
    with _open_binary(path) as f:
        for number, line in enumerate(f, start=1):
            where = Location(str(path), number)
            stripped = line.strip()
            if not stripped:
                continue  # blank lines separate nothing and carry no record
            text = _decode(stripped, where)
            if isinstance(text, Problem):
                yield text
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                yield Problem(where, "", f"broken JSON: {e.msg} at column {e.colno}", "json", raw=text)
                continue
            yield Row(where, value, text)


def read_json_array(path: Path) -> Iterator[Row | Problem]:
    """A top-level JSON array, decoded one element at a time so each keeps its line number."""
    with _open_binary(path) as f:
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


def _maybe_json(value: str) -> Any:
    """CSV cells that hold JSON lists/objects (message lists, score lists) are decoded."""
    s = value.strip()
    if s[:1] in ("[", "{"):
        try:
            return json.loads(s)
        except json.JSONDecodeError:
            return value
    if s.lower() in ("true", "false"):
        return s.lower() == "true"
    return value


def read_csv(path: Path) -> Iterator[Row | Problem]:
    with _open_binary(path) as fb:
        # surrogateescape keeps invalid bytes so each row can be checked on its own
        f = io.TextIOWrapper(fb, encoding="utf-8", errors="surrogateescape", newline="")
        delimiter = "\t" if path.name.lower().removesuffix(".gz").endswith(".tsv") else ","
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            return
        start = reader.line_num + 1
        for cells in reader:
            where = Location(str(path), start)
            start = reader.line_num + 1
            if not any(c.strip() for c in cells):
                continue
            joined = delimiter.join(cells)
            try:
                joined.encode("utf-8")
            except UnicodeEncodeError:
                yield Problem(where, "", "not valid UTF-8", "utf8",
                              raw=joined.encode("utf-8", errors="surrogateescape"))
                continue
            if len(cells) != len(header):
                yield Problem(where, "", f"has {len(cells)} cells, the header has {len(header)}", "csv",
                              raw=joined)
                continue
            yield Row(where, {h: _maybe_json(c) for h, c in zip(header, cells, strict=False)}, dict(zip(header, cells, strict=False)))


def _arrow_rows(batches, path: Path, offset: int = 0) -> Iterator[Row]:
    row = offset
    for batch in batches:
        for value in batch.to_pylist():
            row += 1
            yield Row(Location(str(path), row, "row"), value, value)


def read_parquet(path: Path) -> Iterator[Row | Problem]:
    import pyarrow.parquet as pq

    yield from _arrow_rows(pq.ParquetFile(path).iter_batches(batch_size=1024), path)


def read_arrow_dir(path: Path, split: str | None = None) -> Iterator[Row | Problem]:
    """A folder written by `datasets.Dataset.save_to_disk` (or a DatasetDict's split folder).

    The layout is a state.json naming Arrow IPC stream files; pyarrow reads them directly, so the
    `datasets` library is not needed at run time.
    """
    import pyarrow as pa

    path = Path(path)
    if path.is_file():
        files = [path]
    else:
        if (path / "dataset_dict.json").exists():
            splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
            chosen = split or ("train" if "train" in splits else splits[0])
            if chosen not in splits:
                raise ValueError(f"{path}: no split {chosen!r}; it has {', '.join(splits)}")
            path = path / chosen
        state = path / "state.json"
        if not state.exists():
            raise ValueError(f"{path}: not a datasets.save_to_disk folder (no state.json)")
        files = [path / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    row = 0
    for file in files:
        with pa.memory_map(str(file)) as source:
            try:
                reader = pa.ipc.open_stream(source)
            except pa.ArrowInvalid:
                reader = pa.ipc.open_file(source)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            else:
                batches = iter(reader)
            for item in _arrow_rows(batches, file, row):
                row = item.where.line
                yield item


def read_rows(path: str | Path, file_type: str = "auto", split: str | None = None) -> Iterator[Row | Problem]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    kind = detect_file_type(path) if file_type == "auto" else file_type
    if kind == "jsonl":
        return read_jsonl(path)
    if kind == "json":
        return read_json_array(path)
    if kind == "csv":
        return read_csv(path)
    if kind == "parquet":
        return read_parquet(path)
    if kind == "arrow":
        return read_arrow_dir(path, split)
    raise ValueError(f"unknown reader {kind!r}; choose one of: auto, {', '.join(FILE_TYPES)}")
