"""Coverage-guided fuzzing (atheris, libFuzzer) of the JSONL, JSON and CSV readers through the entry points the
commands use: `data stats` (compute_stats), `data curate` (curate) and `data split` (split), every shape.

    python scripts/fuzz_readers.py -max_total_time=60 runs/fuzz/corpus     # `make fuzz FUZZ_SECONDS=60`

Each input is one file: its first byte picks the file type (JSONL, JSON, CSV, TSV, or a JSONL gzip cut short)
and the record shape, the rest is the file's bytes. A crash is any exception but a DataError naming the file,
or counts that do not add up: rows = valid + invalid, the output files' lines equal the counts, the three
commands agree, and the rows are as many as the file has, counted without the readers (a JSONL file: one a
non-blank line; a JSON array that json.loads reads, its bytes that are not UTF-8 replaced: at least one an
element). libFuzzer writes the input of a crash to `-artifact_prefix` (make fuzz: runs/fuzz/); turn it
into a test in tests/faults/test_fuzz_regressions.py. A corpus folder given but empty is seeded first.
"""

from __future__ import annotations

import atexit
import gzip
import json
import shutil
import sys
import tempfile
from pathlib import Path

import atheris

KINDS = ("jsonl", "json", "csv", "tsv", "jsonl.gz")
FORMATS = ("auto", "pairs", "conversation", "hh", "sharegpt", "kto", "sft", "ranked")  # data/shapes.py SHAPES
ROOT = Path(__file__).resolve().parent.parent
SEEDS = [  # (kind index, format index, file): small real files of each type
    (0, 0, b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": "b", "rejected": "a"}\n'),
    (1, 0, (ROOT / "tests/fixtures/llamafactory_dpo_40.json").read_bytes()[:3000]),
    (0, 0, b"".join((ROOT / "src/prefalign/assets/hh_rlhf_harmless_100.jsonl").read_bytes().splitlines(True)[:3])),
    (2, 0, b'prompt,chosen,rejected\n"a ""q""",yes,"no,\nreally"\n'),
    (3, 0, b"prompt\tcompletion\tlabel\nhi\tyes\ttrue\n"),
    (0, 7, b'{"prompt": "p", "responses": ["a", "b", "c"], "scores": [1, 2, 2]}\n'),
    (0, 4, b'{"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "a"}, '
           b'"rejected": {"from": "gpt", "value": "b"}}\n'),
]
# libFuzzer's dictionary: the words of these formats, which byte mutations alone find slowly
WORDS = [b'"prompt"', b'"chosen"', b'"rejected"', b'"completion"', b'"label"', b'"messages"', b'"role"',
         b'"content"', b'"user"', b'"assistant"', b'"system"', b'"tool"', b'"tool_calls"', b'"conversations"',
         b'"from"', b'"value"', b'"human"', b'"gpt"', b'"responses"', b'"scores"', b'"margin"', b'"function"',
         b'"name"', b'"arguments"', b'"\\n\\nHuman: "', b'"\\n\\nAssistant: "', b'"\\ud800"', b"true", b"false",
         b"null", b"NaN", b"Infinity", b"1e999", b"[[[[[[[[", b"]]]]]]]]", b'""', b'","', b"\r\n", b"\xef\xbb\xbf",
         b"\xff\xfe", b"\x1f\x8b", b"\xed\xa0\x80"]
WORK = Path(tempfile.mkdtemp(prefix="prefalign-fuzz-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))


def lines(path: Path) -> int:
    return len(path.read_bytes().decode("utf-8").split("\n")) - 1 if path.exists() else 0


def as_file(data: bytes) -> tuple[str, bytes, str]:
    """A fuzzer's input as (file suffix, the file's bytes, record shape)."""
    kind, fmt = KINDS[data[0] % len(KINDS)], FORMATS[(data[0] // len(KINDS)) % len(FORMATS)]
    body = data[1:]
    if kind.endswith(".gz") and body:  # a gzip stream, cut where its last byte says (255: whole)
        packed = gzip.compress(body[:-1], mtime=0)
        body = packed[:len(packed) * (body[-1] + 1) // 256]
    return kind, body, fmt


def one_input(data: bytes) -> None:
    if not data:
        return
    kind, body, fmt = as_file(data)
    shutil.rmtree(WORK / "out", ignore_errors=True)
    path = WORK / f"input.{kind}"
    path.write_bytes(body)
    check(path, fmt, WORK / "out")


def check(path: Path, fmt: str, out: Path) -> None:
    """The property (module docstring) of one file; raises on a crash or on counts that do not add up."""
    # imported here: main() imports them first, instrumented; tests import this module without atheris's hooks
    from prefalign.data.curate import CurateConfig, ReadOptions, SplitConfig, compute_stats, curate, split
    from prefalign.errors import DataError

    opts = {"format": fmt}
    try:
        stats = compute_stats(path, ReadOptions(**opts))
    except DataError as e:
        if str(path) not in str(e):
            raise AssertionError(f"a whole-file error that does not name the file: {e}") from None
        return
    res = curate(path, out / "k.jsonl", out / "q.jsonl", CurateConfig(**opts, conflicts="keep_first"))
    expected = expected_rows(path)
    if expected is not None:
        rows, exact = expected
        assert res.rows == rows if exact else res.rows >= rows, f"{res.rows} rows read, the file has {rows}"
    counts = split(path, out / "split", SplitConfig(**opts))
    quarantined = [json.loads(x) for x in (out / "q.jsonl").read_text(encoding="utf-8").splitlines()]
    assert lines(out / "k.jsonl") == res.kept and len(quarantined) == res.rows_invalid + sum(res.set_aside.values())
    assert (stats.records, stats.invalid) == (res.rows, res.rows_invalid) == (counts.get("rows", 0),
                                                                            counts.get("invalid", 0))
    assert stats.pairs + stats.unpaired == res.records_valid == counts.get("train", 0) + counts.get("eval", 0)
    for name in ("train", "eval"):
        assert lines(out / "split" / f"{name}.jsonl") == counts.get(name, 0)
    assert lines(out / "split" / "quarantine.jsonl") == counts.get("invalid", 0)


def expected_rows(path: Path) -> tuple[int, bool] | None:
    """ORACLE, without the readers: (rows, exactly so) of a plain JSONL file or JSON array; None when unknown."""
    body = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    if path.name.endswith(".jsonl"):
        return sum(1 for line in body.split(b"\n") if line.strip()), True
    if path.name.endswith(".json"):
        try:
            value = json.loads(body.decode("utf-8", "replace"))
        except (ValueError, RecursionError):
            return None
        return (len(value), False) if isinstance(value, list) else None
    return None


def dict_entry(word: bytes) -> str:
    """A word as libFuzzer's -dict file writes it: printable ASCII, else \\xNN."""
    return "".join(chr(b) if 32 <= b < 127 and b not in b'"\\' else f"\\x{b:02x}" for b in word)


def seed(corpus: Path) -> None:
    corpus.mkdir(parents=True, exist_ok=True)
    if not any(corpus.iterdir()):
        for i, (kind, fmt, text) in enumerate(SEEDS):
            (corpus / f"seed-{i}").write_bytes(bytes([kind + len(KINDS) * fmt]) + text)


def main() -> None:
    for arg in sys.argv[1:]:
        if not arg.startswith("-"):
            seed(Path(arg))
    atexit.register(shutil.rmtree, WORK, ignore_errors=True)  # libFuzzer ends the process with exit()
    argv = list(sys.argv)
    if not any(a.startswith("-dict=") for a in argv):
        (WORK / "words.dict").write_text("".join(f'"{dict_entry(w)}"\n' for w in WORDS))
        argv.append(f"-dict={WORK / 'words.dict'}")
    with atheris.instrument_imports(include=["prefalign.data"]):
        import prefalign.data.curate  # noqa: F401  (and with it the readers, shapes and records)
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
