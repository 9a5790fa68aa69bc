"""Stream raw rows out of files: JSONL, JSON arrays, CSV, Parquet and `datasets.save_to_disk` folders.

Every reader is a generator of `Row`s in bounded memory (Parquet and Arrow go batch by batch; a JSON
array is decoded element by element). A row that cannot even be parsed comes out as a `Problem`
carrying the original text, so nothing is ever dropped silently.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import itertools
import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError
from .hub import data_files
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
    raise DataError(f"{path}: cannot tell the file type from its name; pass --reader "
                     f"({', '.join(FILE_TYPES)})")


# A byte-order mark at the start says the file is UTF-16 or UTF-32 (UTF-32-LE's starts with UTF-16-LE's,
# so it is looked for first). prefalign reads UTF-8: such a file is refused whole, before any row.
_WIDE_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"), (codecs.BOM_UTF16_LE, "UTF-16"),
              (codecs.BOM_UTF16_BE, "UTF-16"))
# What a damaged .gz (and a damaged Parquet/Arrow file, as _Unreadable) raises while it is read
_BROKEN = (OSError, EOFError, zlib.error)


class _Unreadable(Exception):
    """A Parquet or Arrow file pyarrow cannot read on (its own error, made one for _guarded)."""


def _open_binary(path: Path):
    """The file's bytes, decompressed (.gz), from after a UTF-8 byte-order mark (Excel writes one before
    a CSV's header; json.loads refuses it). A file that cannot be decompressed at all, or that is UTF-16
    or UTF-32, is a DataError naming it: none of its rows could be read."""
    gz = path.name.endswith(".gz")
    try:
        if gz:
            head = _gz_head(path)
        else:
            with open(path, "rb") as raw:
                head = raw.read(4)
    except _BROKEN as e:
        raise DataError(f"{path}: cannot be decompressed (its name ends in .gz): {e}") from None
    for bom, name in _WIDE_BOMS:
        if head.startswith(bom):
            # FF FE 00 00 is also UTF-16-LE's mark before a NUL character (make faults found one)
            also = " (or UTF-16 whose first character is NUL)" if bom == codecs.BOM_UTF32_LE else ""
            raise DataError(f"{path}: the file is {name}{also} (it starts with a {name} byte-order mark); "
                            f"prefalign reads UTF-8: convert it, e.g. iconv -f {name} -t UTF-8")
    f = gzip.open(path, "rb") if gz else open(path, "rb")
    try:
        f.seek(len(codecs.BOM_UTF8) if head.startswith(codecs.BOM_UTF8) else 0)
    except _BROKEN as e:  # a cut .gz holding nothing but a byte-order mark
        f.close()
        raise DataError(f"{path}: cannot be decompressed (its name ends in .gz): {e}") from None
    return f


def _gz_head(path: Path) -> bytes:
    """The first 4 bytes a .gz decompresses to, however early it was cut: gzip's read(4) raises on a cut
    stream holding fewer than 4 bytes (make faults: a cut `[]` line refused the file it could read)."""
    with open(path, "rb") as raw:
        z = zlib.decompressobj(31)
        head, seen = b"", 0
        while len(head) < 4 and (chunk := raw.read(1 << 16)):
            seen += len(chunk)
            head += z.decompress(chunk, 4 - len(head))
            while len(head) < 4 and z.unconsumed_tail:
                head += z.decompress(z.unconsumed_tail, 4 - len(head))
        if seen and not head and not z.eof:  # (an empty file is an empty stream, as gzip reads it)
            raise EOFError("Compressed file ended before any byte of it could be decompressed")
        return head


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
            except ValueError as e:  # valid JSON Python will not convert: an integer of over 4300 digits
                yield Problem(where, "", _undecodable(e), "json", raw=text)
                continue
            except RecursionError:
                yield Problem(where, "", TOO_DEEP, "json", raw=text)
                continue
            yield Row(where, value, text)


def _undecodable(e: ValueError) -> str:
    return f"cannot be decoded: {str(e).split(';')[0]}"


# json's decoder recurses once per level: a value nested about a thousand deep exhausts Python's stack
TOO_DEEP = "nested too deeply to decode (JSON arrays/objects inside each other about 1000 levels deep)"

# How many bytes each read takes from the file. Module-level so tests can shrink it to push records
# and multi-byte characters across chunk edges.
CHUNK_BYTES = 1 << 20
# A decoded value is only trusted when this many characters follow it (or the file has ended):
# a number cut at a chunk edge, like '1.' of '1.5' or '1e' of '1e+5', still decodes, just wrongly.
_LOOKAHEAD = 3
_NOT_WS = re.compile(r"[^ \t\r\n]")
_BRACKETS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.S)  # a whole JSON string, or one bracket
_SEPARATORS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{},]', re.S)  # ... or a comma
_ARRAY_START = re.compile(r"[\[{]")  # within the first 200 characters (the head), or not looked for
_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # a byte surrogateescape kept
_ESCAPE = 6  # the longest JSON escape, \uXXXX: a decode error at a '\\' may be about the 5 characters after it


def _bad_byte(text: str, i: int) -> bool:
    return i < len(text) and "\udc80" <= text[i] <= "\udcff"


def _raw(text: str) -> str | bytes:
    """What a problem quotes: the text, or its exact bytes when it holds bytes that are not UTF-8."""
    return text if _utf8(text) else text.encode("utf-8", errors="surrogateescape")


def _utf8_error(where: Location, text: str) -> Problem:
    bad = _NOT_UTF8.search(text)
    offset = len(text[:bad.start()].encode("utf-8", errors="surrogateescape"))
    return Problem(where, "", f"not valid UTF-8 (byte 0x{ord(bad.group()) - 0xDC00:02x} at offset {offset})",
                   "utf8", raw=text.encode("utf-8", errors="surrogateescape"))


class _TextWindow:
    """The decoded text of a file seen through a window that slides forward chunk by chunk.

    `buf[pos:]` is what has not been consumed yet. The line and column of `pos` are kept up to date by
    counting only the text consumed since the last look, so finding a record's line never rescans.
    """

    def __init__(self, f, chunk_bytes: int):
        self._f = f
        self._chunk = chunk_bytes
        # incremental, so a multi-byte character split between two reads decodes whole; surrogateescape
        # keeps a byte that is not UTF-8 as U+DC80..U+DCFF, so only the record holding it is a problem
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
        self.buf = ""
        self.pos = 0
        self.eof = False
        self.broken: Exception | None = None  # a .gz that breaks off: the data ends there, then this is raised
        self._mark = 0  # buf index that `_line`/`_col` describe; never past pos
        self._line = 1
        self._col = 0  # characters between the last newline and _mark

    def _sync(self) -> None:
        newlines = self.buf.count("\n", self._mark, self.pos)
        if newlines:
            self._line += newlines
            self._col = self.pos - self.buf.rfind("\n", self._mark, self.pos) - 1
        else:
            self._col += self.pos - self._mark
        self._mark = self.pos

    def line(self) -> int:
        self._sync()
        return self._line

    def line_col(self, i: int) -> tuple[int, int]:
        """1-based line and column of buf[i] (i >= pos), numbered as in the whole file."""
        self._sync()
        newlines = self.buf.count("\n", self.pos, i)
        if newlines:
            return self._line + newlines, i - self.buf.rfind("\n", self.pos, i)
        return self._line, self._col + i - self.pos + 1

    def grow(self) -> None:
        """Drop the consumed text and read on until the unread part has at least doubled (or a chunk
        came in): doubling keeps re-decoding a record larger than a chunk linear in its size."""
        self._sync()
        pieces, want, got = [self.buf[self.pos:]], max(self._chunk, len(self.buf) - self.pos), 0
        while got < want and not self.eof:
            try:  # read1: what a .gz gave before it breaks off is kept (read() would lose the whole chunk)
                data = self._f.read1(self._chunk)
            except _BROKEN as e:
                data, self.broken = b"", e
            self.eof = not data
            text = self._decoder.decode(data, final=self.eof)
            pieces.append(text)
            got += len(text)
        # dropping consumed text here rather than after every record: slicing per record would copy
        # the whole window each time
        self.buf, self.pos, self._mark = "".join(pieces), 0, 0

    def fill(self, n: int) -> None:
        while len(self.buf) - self.pos < n and not self.eof:
            self.grow()

    def skip_ws(self) -> str:
        """Move pos to the next non-whitespace character and return it ('' at the end of the file)."""
        while True:
            m = _NOT_WS.search(self.buf, self.pos)
            if m:
                self.pos = m.start()
                return self.buf[self.pos]
            self.pos = len(self.buf)
            if self.eof:
                self.end()
                return ""
            self.grow()

    def end(self) -> None:
        """At the end of the data: a stream that broke off raises its error here (_guarded reports it)."""
        if self.broken is not None:
            raise self.broken

    def element_end(self) -> int | None:
        """The buf index of the ',' or ']' that ends the element at pos (brackets and strings skipped),
        reading on as needed; None when the data ends first."""
        while True:
            depth = 0
            for m in _SEPARATORS.finditer(self.buf, self.pos):
                c = m.group()[0]
                if c in "[{":
                    depth += 1
                elif c in "]}" and depth:
                    depth -= 1
                elif c in ",]" and not depth:
                    return m.start()
            if self.eof:
                self.end()
                return None
            self.grow()

    def value_end(self) -> int | None:
        """The buf index after the array or object at pos, found without recursion (decode ran out of
        stack on it: the whole rest of the file is in the window); None when it never closes."""
        depth = 0
        for m in _BRACKETS.finditer(self.buf, self.pos):
            if m.group()[0] != '"':  # brackets inside a string do not count
                depth += 1 if m.group() in "[{" else -1
                if depth == 0:
                    return m.end()
        return None

    def decode(self, decoder: json.JSONDecoder) -> tuple[Any, int]:
        """The JSON value at pos and the buf index after it; raises JSONDecodeError only once the
        whole rest of the file is in the window, so the error is the one the full text gives."""
        while True:
            try:
                value, end = decoder.raw_decode(self.buf, self.pos)
            except RecursionError:
                self.fill(float("inf"))  # the record's problem carries the rest of the file, as a broken one does
                raise
            except json.JSONDecodeError as e:
                if self.eof:
                    self.end()
                    raise
                # a bad byte where JSON wants a value or a separator, or in a '\\' escape ('\\u' and 4 hex
                # digits): no text that follows can make it valid
                if _NOT_UTF8.search(self.buf, e.pos, e.pos + _ESCAPE):
                    raise
            else:
                # where a broken stream ends, only a value that closes itself is known to be whole
                whole = self.broken is None or self.buf[end - 1] in '"]}'
                if len(self.buf) - end >= _LOOKAHEAD or self.eof and whole:
                    return value, end
                if self.eof:
                    self.end()
            self.grow()


def read_json_array(path: Path) -> Iterator[Row | Problem]:
    """A top-level JSON array, decoded one element at a time so each keeps its line number.

    The file is read in CHUNK_BYTES pieces; memory holds one chunk plus the largest record (the whole
    rest of the file only when a record is broken, since the problem carries that text verbatim).
    An element holding bytes that are not UTF-8 is a `utf8` problem with those bytes, and the array is
    read on, as a JSONL file is past such a line.
    """
    with _open_binary(path) as f:
        w = _TextWindow(f, CHUNK_BYTES)
        w.fill(200)
        head = w.buf[:200]
        first = w.skip_ws()
        if _bad_byte(w.buf, w.pos):  # stray bytes before the array: a problem of their own, then the array
            start = _ARRAY_START.search(w.buf, w.pos)
            if start and start.group() == "[":
                yield _utf8_error(Location(str(path), w.line()), w.buf[w.pos:start.start()])
                w.pos = start.start()
                first = "["
            elif start:
                first = "{"
        if first != "[":
            if first == "{":
                yield from read_jsonl(path)  # one object per line, despite the .json name
                return
            yield Problem(Location(str(path), w.line()), "", "expected a JSON array of records", "json",
                          raw=_raw(head))
            return
        w.pos += 1
        closed = w.skip_ws() == "]" or (yield from _array_elements(w, path))
        if closed:
            w.pos += 1
            if w.skip_ws():  # text after the closing ']': quarantined, not silently ignored
                yield _trailing(w, path)


def _array_elements(w: _TextWindow, path: Path) -> Iterator[Row | Problem]:
    """The elements, up to the array's closing ']' (returns True, w.pos on it) or a problem that ends it."""
    decoder = json.JSONDecoder()
    # The end of the file right after a ',' ends the array quietly, as it always has.
    while w.skip_ws():
        where = Location(str(path), w.line())
        try:
            value, end = w.decode(decoder)
        except json.JSONDecodeError as e:
            line, col = w.line_col(e.pos)
            # bad bytes made it unreadable: the element holding them is the problem, the array read on
            end = w.element_end() if _NOT_UTF8.search(w.buf, w.pos, e.pos + _ESCAPE) else None
            if end is None or _utf8(w.buf[w.pos:end]):
                yield Problem(where, "", f"broken JSON: {e.msg} (line {line}, column {col}); "
                              "the rest of the array cannot be read", "json", raw=_raw(w.buf[w.pos:]))
                return False
            yield _utf8_error(where, w.buf[w.pos:end])
        except ValueError as e:  # valid JSON Python will not convert (an integer of over 4300 digits): skipped
            end = w.element_end()
            yield Problem(where, "", _undecodable(e) if end else f"{_undecodable(e)}; the rest of the array cannot "
                          "be read", "json", raw=_raw(w.buf[w.pos:end]))
            if end is None:
                return False
        except RecursionError:  # valid JSON perhaps, too deep to decode: skipped to its end, the array read on
            end = w.value_end()
            yield Problem(where, "", TOO_DEEP if end else f"{TOO_DEEP}; the rest of the array cannot be read",
                          "json", raw=_raw(w.buf[w.pos:end]))
            if end is None:
                return False
        else:
            raw = w.buf[w.pos:end]
            yield Row(where, value, raw) if _utf8(raw) else _utf8_error(where, raw)
        w.pos = end
        bad = _between(w, path)
        if bad is not None:
            yield bad
            if bad.kind != "utf8":
                return False
        if w.buf[w.pos] == "]":
            return True
        w.pos += 1  # the ','
    return False


def _between(w: _TextWindow, path: Path) -> Problem | None:
    """After an element: None with w.pos at the ',' or ']' that follows; else the problem of what stands
    there instead: bytes that are not UTF-8 (w.pos then at the ',' or ']' after them), or anything else."""
    after = w.skip_ws()
    if after in (",", "]"):
        return None
    where = Location(str(path), w.line())
    if after and _bad_byte(w.buf, w.pos):
        end = w.element_end()
        if end is not None:
            problem = _utf8_error(where, w.buf[w.pos:end])
            w.pos = end
            return problem
    w.fill(200)
    return Problem(where, "", "expected ',' or ']' between records", "json", raw=_raw(w.buf[w.pos:w.pos + 200]))


def _trailing(w: _TextWindow, path: Path) -> Problem:
    where = Location(str(path), w.line())
    w.fill(float("inf"))
    rest = w.buf[w.pos:]
    if not _utf8(rest):
        return _utf8_error(where, rest)
    return Problem(where, "", "text after the array's closing ']'", "json", raw=rest)


# CSV holds only text. A cell is decoded only for a field whose value is not text in any shape
# (data/shapes.py), so a pair whose text is "true" or "[1, 2]" stays the text it is.
_JSON_FIELDS = {"messages", "conversations", "responses", "scores", "tool_calls"}  # lists or objects
_MESSAGE_FIELDS = {"prompt", "chosen", "rejected"}  # text, or messages (conversation, sharegpt shapes)


def _cell(field: str, value: str) -> Any:
    s = value.strip()
    if field == "label":  # kto: true/false (or 0/1), in any case
        return {"true": True, "false": False, "1": 1, "0": 0}.get(s.lower(), value)
    if field == "margin" or field in _JSON_FIELDS or field in _MESSAGE_FIELDS and s[:1] in ("[", "{"):
        try:
            decoded = json.loads(s)
        except (ValueError, RecursionError):  # not JSON, an integer of over 4300 digits, too deep
            return value
        if field == "margin":
            return decoded if isinstance(decoded, int | float) and not isinstance(decoded, bool) else value
        if field in _MESSAGE_FIELDS and not _messages_like(decoded):
            return value
        return decoded
    return value


def _messages_like(value: Any) -> bool:
    """A message list, or one message (a sharegpt answer): what a prompt/chosen/rejected cell that is
    not text holds."""
    def message(m: Any) -> bool:
        return isinstance(m, dict) and ("role" in m or "from" in m)

    return message(value) or isinstance(value, list) and bool(value) and all(message(m) for m in value)


# csv's default cap on one cell is 128 KiB: a longer answer is data like any other (JSONL reads any line),
# and an unclosed quote is reported with the rest of the file, as a broken JSON array is
_CELL_LIMIT = 2**31 - 1


def read_csv(path: Path) -> Iterator[Row | Problem]:
    if csv.field_size_limit() < _CELL_LIMIT:
        csv.field_size_limit(_CELL_LIMIT)
    with _open_binary(path) as fb:
        # surrogateescape keeps invalid bytes so each row can be checked on its own
        f = io.TextIOWrapper(fb, encoding="utf-8", errors="surrogateescape", newline="")
        delimiter = "\t" if path.name.lower().removesuffix(".gz").endswith(".tsv") else ","
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            return
        bad_header = not _utf8(delimiter.join(header))
        start = reader.line_num + 1
        for cells in reader:
            where = Location(str(path), start)
            start = reader.line_num + 1
            if not any(c.strip() for c in cells):
                continue
            joined = delimiter.join(cells)
            if not _utf8(joined):
                yield Problem(where, "", "not valid UTF-8", "utf8",
                              raw=joined.encode("utf-8", errors="surrogateescape"))
                continue
            if bad_header:  # a header that is not UTF-8 names no field: every row is reported with it
                yield Problem(where, "", "the header (line 1) is not valid UTF-8", "utf8", raw=joined)
                continue
            if len(cells) != len(header):
                yield Problem(where, "", f"has {len(cells)} cells, the header has {len(header)}", "csv",
                              raw=joined)
                continue
            yield Row(where, {h: _cell(h, c) for h, c in zip(header, cells, strict=False)},
                      dict(zip(header, cells, strict=False)))


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a byte surrogateescape kept
        return False
    return True


def _arrow_rows(batches, path: Path, offset: int = 0) -> Iterator[Row]:
    row = offset
    for batch in batches:
        for value in batch.to_pylist():
            row += 1
            yield Row(Location(str(path), row, "row"), value, value)


def read_parquet(path: Path) -> Iterator[Row | Problem]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        yield from _arrow_rows(pq.ParquetFile(path).iter_batches(batch_size=1024), path)
    except pa.ArrowException as e:  # not Parquet, truncated, a damaged page
        raise _Unreadable(f"not a readable Parquet file: {e}") from None


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
            splits = _listing(path / "dataset_dict.json", "splits", str)
            chosen = split or ("train" if "train" in splits else splits[0])
            if chosen not in splits:
                raise DataError(f"{path}: no split {chosen!r}; it has {', '.join(splits)}")
            path = path / chosen
        state = path / "state.json"
        if not state.exists():
            raise DataError(f"{path}: not a datasets.save_to_disk folder (no state.json)")
        entries = _listing(state, "_data_files", dict)
        if not all(isinstance(f.get("filename"), str) for f in entries):
            raise DataError(f"{state}: _data_files: expected a list of {{\"filename\": ...}}")
        files = [path / f["filename"] for f in entries]
    row = 0
    for file in files:
        try:
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
        except pa.ArrowException as e:  # not Arrow IPC, truncated
            raise _Unreadable(f"{file}: not a readable Arrow file: {e}") from None


def _listing(path: Path, key: str, kind: type) -> list:
    """The non-empty list of `kind` under `key` of a datasets JSON file (dataset_dict.json, state.json)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get(key)
    except (ValueError, AttributeError, RecursionError):  # not JSON, not UTF-8, not an object
        value = None
    if not isinstance(value, list) or not value or not all(isinstance(v, kind) for v in value):
        raise DataError(f"{path}: not a datasets file: expected an object with a non-empty list {key!r}")
    return value


def read_rows(path: str | Path, file_type: str = "auto", split: str | None = None) -> Iterator[Row | Problem]:
    """The rows of a local file or folder, or of a Hub dataset id (data/hub.py: its split's files, one
    after the other; each row's location is the file in the cache it came from)."""
    files = data_files(path, split)
    if len(files) > 1:
        return itertools.chain.from_iterable(_read_file(f, file_type, split) for f in files)
    return _read_file(files[0], file_type, split)


def _read_file(path: Path, file_type: str, split: str | None) -> Iterator[Row | Problem]:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    kind = detect_file_type(path) if file_type == "auto" else file_type
    readers = {"jsonl": read_jsonl, "json": read_json_array, "csv": read_csv, "parquet": read_parquet,
               "arrow": lambda p: read_arrow_dir(p, split)}
    if kind not in readers:
        raise ConfigError(f"unknown reader {kind!r}; choose one of: auto, {', '.join(FILE_TYPES)}")
    return _guarded(readers[kind](path), path)


def _guarded(rows: Iterator[Row | Problem], path: Path) -> Iterator[Row | Problem]:
    """A file that breaks off (a truncated .gz, a damaged Parquet page): the rows before the break as
    read, then one problem saying the rest cannot be read (as a broken JSON array's). Broken before its
    first row, nothing of it can be read: a DataError naming the file."""
    last = None
    try:
        for item in rows:
            last = item.where
            yield item
    except (*_BROKEN, _Unreadable) as e:
        if last is None:
            raise DataError(f"{path}: cannot be read: {e}") from None
        yield Problem(Location(last.file, last.line + 1, last.unit), "", f"the file breaks off after {last.unit} "
                      f"{last.line} ({e}); the rest cannot be read", "corrupt", raw="")
