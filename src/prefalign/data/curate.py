"""Streaming statistics, curation and splitting of preference data, in bounded memory.

Memory grows only with the number of distinct records through one 64-bit hash per record (for
duplicate and conflict detection, in a flat table of 12-byte slots: ~200 MB at 10M records, where a
dict held 1.2 GB) and a fixed-size reservoir of lengths for the percentiles.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..config import StrictModel
from ..errors import ConfigError
from ..storage import AtomicWriter, replacing
from .hashtable import U64Table
from .hub import resolve_model
from .noise import DuplicateComparisons, Estimate, combine, readiness
from .readers import read_rows
from .records import PreferencePair, Problem, Record, UnpairedExample, dumps, json_line, text_of
from .shapes import norm, parse_rows

RESERVOIR = 100_000


class ReadOptions(StrictModel):
    format: str = "auto"  # the record shape: auto, pairs, conversation, hh, sharegpt, kto, ranked
    reader: str = "auto"  # the file type: auto, jsonl, json, csv, parquet, arrow
    split: str | None = None  # for a saved DatasetDict folder
    ranked: Literal["best_vs_rest", "best_vs_worst", "all"] = "best_vs_rest"


class CurateConfig(ReadOptions):
    """`prefalign data curate`: what to keep. Everything not kept goes to the quarantine file."""

    dedup: bool = True
    conflicts: Literal["drop", "keep_first", "keep"] = "drop"
    min_chars: int = 1  # per answer
    max_chars: int | None = None  # per answer
    max_prompt_chars: int | None = None
    tokenizer: str | None = None
    max_tokens: int | None = None  # prompt + longest answer, needs a tokenizer


class SplitConfig(ReadOptions):
    eval_fraction: float = 0.05
    salt: str = ""  # change to draw a different, still deterministic, split


def iter_parsed(path: str | Path, opts: ReadOptions) -> Iterator[tuple[Any, list[Record] | Problem]]:
    return parse_rows(read_rows(path, opts.reader, opts.split), opts.format, ranked=opts.ranked)


def _hash(*parts: str) -> int:
    """The split's hash (eval_share): parts joined by NULs, kept as it was so a split never moves."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(p.encode("utf-8", errors="surrogatepass"))
        h.update(b"\x00")
    return int.from_bytes(h.digest(), "little")


def _key(*parts: str) -> int:
    """A record's identity: each part after its length, so no text (a NUL in it, say) can make two
    different records' parts the same bytes. 64 bits: a false duplicate among n distinct records has
    probability about n**2 / 2**65 (docs/reliability.md, "Under load")."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        data = p.encode("utf-8", errors="surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return int.from_bytes(h.digest(), "little")


def identity(record: Record) -> tuple[int, bool]:
    """(key of the prompt and the unordered answers, orientation). The same key with the same
    orientation is a duplicate; with the opposite orientation, a conflicting preference."""
    prompt = norm(text_of(record.prompt))
    if isinstance(record, UnpairedExample):
        return _key("u", prompt, norm(text_of(record.completion))), record.label
    a, b = norm(text_of(record.chosen)), norm(text_of(record.rejected))
    return _key("p", prompt, min(a, b), max(a, b)), a < b


class DuplicateTracker:
    def __init__(self) -> None:
        self.seen = U64Table()  # key -> first line * 2 + orientation

    def check(self, record: Record) -> tuple[str, int, int]:
        """('new' | 'duplicate' | 'conflict', the line of the first record with this key, the key)."""
        return self.check_key(record, *identity(record))

    def check_key(self, record: Record, key: int, orient: bool) -> tuple[str, int, int]:
        line = record.where.line if record.where else 0
        first = self.seen.setdefault(key, line * 2 + int(orient))
        if first is None:
            return "new", line, key
        return ("duplicate" if first % 2 == int(orient) else "conflict"), first // 2, key


class Percentiles:
    """Mean/min/max exact; percentiles from a seeded reservoir (exact up to RESERVOIR values)."""

    def __init__(self, seed: int = 0):
        self.n, self.total, self.min, self.max = 0, 0.0, None, None
        self.sample: list[float] = []
        self.rng = random.Random(seed)

    def add(self, x: float) -> None:
        self.n += 1
        self.total += x
        self.min = x if self.min is None else min(self.min, x)
        self.max = x if self.max is None else max(self.max, x)
        if len(self.sample) < RESERVOIR:
            self.sample.append(x)
        else:
            j = self.rng.randrange(self.n)
            if j < RESERVOIR:
                self.sample[j] = x

    def summary(self) -> dict[str, float] | None:
        if not self.n:
            return None
        s = sorted(self.sample)

        def pct(q: float) -> float:
            return float(s[min(len(s) - 1, int(round(q * (len(s) - 1))))])

        return {"mean": round(self.total / self.n, 2), "min": self.min, "p50": pct(0.5), "p90": pct(0.9),
                "p99": pct(0.99), "max": self.max}


@dataclass
class Stats:
    records: int = 0  # rows read (a ranked row may expand into several pairs)
    valid: int = 0
    invalid: int = 0
    pairs: int = 0
    unpaired: int = 0
    duplicates: int = 0
    conflicts: int = 0
    ties: int = 0
    chosen_longer: int = 0
    problems: Counter = field(default_factory=Counter)
    lengths: dict[str, Percentiles] = field(default_factory=dict)
    repeats: DuplicateComparisons = field(default_factory=DuplicateComparisons)  # the label-noise estimate

    def length(self, name: str, value: float) -> None:
        self.lengths.setdefault(name, Percentiles()).add(value)

    def to_json(self, estimates: list[Estimate] | tuple = ()) -> dict[str, Any]:
        """The counts; `noise` combines the duplicates' estimate with `estimates` from models (judges/noise.py)."""
        out: dict[str, Any] = {
            "records": self.records, "valid": self.valid, "invalid": self.invalid,
            "pairs": self.pairs, "unpaired": self.unpaired,
            "duplicates": self.duplicates, "conflicts": self.conflicts, "ties": self.ties,
            "chosen_longer_share": round(self.chosen_longer / self.pairs, 4) if self.pairs else None,
            "problems": dict(self.problems),
        }
        out.update({name: p.summary() for name, p in self.lengths.items()})
        out["noise"] = combine([self.repeats.estimate(), *estimates])
        out["readiness"] = readiness(out)
        return out


def _load_tokenizer(path: str | None):
    if path is None:
        return None
    # imported here: `prefalign data check/stats/curate` load no tokenizer unless asked, and importing
    # transformers would cost them seconds of start-up
    from transformers import AutoTokenizer

    # a local folder, or a Hub id's tokenizer files fetched into the cache; no model code run
    folder = resolve_model(path, tokenizer_only=True)
    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False, local_files_only=True)


def _token_counts(tokenizer, records: list[Record]) -> list[dict[str, int]]:
    fields = [("prompt", "prompt")] + ([("chosen", "chosen"), ("rejected", "rejected")]
                                       if isinstance(records[0], PreferencePair) else [("completion", "completion")])
    out: list[dict[str, int]] = [{} for _ in records]
    for name, attr in fields:
        texts = [text_of(getattr(r, attr)) for r in records]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        for i, seq in enumerate(ids):
            out[i][name] = len(seq)
    return out


def compute_stats(path: str | Path, opts: ReadOptions, tokenizer: str | None = None,
                  problems_out: list[Problem] | None = None, max_problems: int = 1000) -> Stats:
    stats, dups = Stats(), DuplicateTracker()
    tok = _load_tokenizer(tokenizer)
    pending: list[Record] = []

    def flush() -> None:
        by_kind: dict[str, list[Record]] = {}
        for r in pending:
            by_kind.setdefault(r.kind, []).append(r)
        for group in by_kind.values():
            for counts in _token_counts(tok, group):
                for name, n in counts.items():
                    stats.length(f"{name}_tokens", n)
        pending.clear()

    for _, result in iter_parsed(path, opts):
        stats.records += 1
        if isinstance(result, Problem):
            stats.invalid += 1
            stats.problems[result.kind] += 1
            stats.ties += result.kind == "tie"
            if problems_out is not None and len(problems_out) < max_problems:
                problems_out.append(result)
            continue
        stats.valid += 1
        for record in result:
            key, orient = identity(record)
            verdict, _, _ = dups.check_key(record, key, orient)
            if isinstance(record, PreferencePair):
                stats.repeats.observe(key, orient)
            stats.duplicates += verdict == "duplicate"
            stats.conflicts += verdict == "conflict"
            stats.length("prompt_chars", len(text_of(record.prompt)))
            if isinstance(record, PreferencePair):
                stats.pairs += 1
                c, r = len(text_of(record.chosen)), len(text_of(record.rejected))
                stats.chosen_longer += c > r
                stats.length("chosen_chars", c)
                stats.length("rejected_chars", r)
            else:
                stats.unpaired += 1
                stats.length("completion_chars", len(text_of(record.completion)))
            if tok is not None:
                pending.append(record)
                if len(pending) >= 512:
                    flush()
    if tok is not None and pending:
        flush()
    return stats


@dataclass
class CurateResult:
    rows: int = 0
    rows_invalid: int = 0
    kept: int = 0  # records written to the output
    set_aside: Counter = field(default_factory=Counter)  # good records not kept, by reason

    @property
    def records_valid(self) -> int:
        return self.kept + sum(self.set_aside.values())

    def to_json(self) -> dict[str, Any]:
        return {"rows": self.rows, "rows_invalid": self.rows_invalid, "rows_valid": self.rows - self.rows_invalid,
                "records_valid": self.records_valid, "kept": self.kept, "set_aside": dict(self.set_aside)}


def _answers(record: Record) -> list[str]:
    if isinstance(record, PreferencePair):
        return [text_of(record.chosen), text_of(record.rejected)]
    return [text_of(record.completion)]


def _filter_reason(record: Record, cfg: CurateConfig, tok) -> str | None:
    for answer in _answers(record):
        if len(answer.strip()) < cfg.min_chars:
            return f"an answer is shorter than min_chars={cfg.min_chars}"
        if cfg.max_chars is not None and len(answer) > cfg.max_chars:
            return f"an answer is longer than max_chars={cfg.max_chars}"
    if cfg.max_prompt_chars is not None and len(text_of(record.prompt)) > cfg.max_prompt_chars:
        return f"the prompt is longer than max_prompt_chars={cfg.max_prompt_chars}"
    if tok is not None and cfg.max_tokens is not None:
        counts = _token_counts(tok, [record])[0]
        total = counts["prompt"] + max(v for k, v in counts.items() if k != "prompt")
        if total > cfg.max_tokens:
            return f"prompt + answer is {total} tokens, over max_tokens={cfg.max_tokens}"
    return None


def _set_aside_line(record: Record, kind: str, message: str) -> str:
    where = record.where
    return json_line({"file": where.file if where else None, where.unit if where else "line":
                      where.line if where else None, "field": "", "kind": kind, "problem": message,
                      "raw": record.to_json()})


def curate(path: str | Path, out: str | Path, quarantine: str | Path, cfg: CurateConfig) -> CurateResult:
    """Write every good, kept record to `out` and everything else to `quarantine` with its reason.
    rows == rows_valid + rows_invalid, and records_valid == kept + set_aside, always."""
    if cfg.max_tokens is not None and cfg.tokenizer is None:
        raise ConfigError("max_tokens needs a tokenizer (--tokenizer DIR)")
    tok = _load_tokenizer(cfg.tokenizer)
    conflicted = U64Table()  # keys with contradicting preferences (a set: values unused)
    if cfg.conflicts == "drop":
        # First pass: which prompts carry contradicting preferences, so that *all* their copies go.
        tracker = DuplicateTracker()
        for _, result in iter_parsed(path, cfg):
            if not isinstance(result, Problem):
                for record in result:
                    verdict, _, key = tracker.check(record)
                    if verdict == "conflict":
                        conflicted.add(key)
        del tracker
    res, dups = CurateResult(), DuplicateTracker()
    # both written under temporary names and renamed once whole: never a half-written output (a full disk)
    with replacing(AtomicWriter(out, "curate.write"), AtomicWriter(quarantine)) as (good, bad):
        for _, result in iter_parsed(path, cfg):
            res.rows += 1
            if isinstance(result, Problem):
                res.rows_invalid += 1
                bad.write(json_line(result.to_json()) + "\n")
                continue
            for record in result:
                verdict, first, key = dups.check(record)
                reason = None
                if key in conflicted:
                    reason = ("conflict", "another record prefers the opposite answer for this prompt")
                elif verdict == "duplicate" and cfg.dedup:
                    reason = ("duplicate", f"duplicate of the record at line/row {first}")
                elif verdict == "conflict" and cfg.conflicts == "keep_first":
                    reason = ("conflict", f"contradicts the record at line/row {first}")
                else:
                    why = _filter_reason(record, cfg, tok)
                    if why:
                        reason = ("filtered", why)
                if reason:
                    res.set_aside[reason[0]] += 1
                    bad.write(_set_aside_line(record, *reason) + "\n")
                else:
                    res.kept += 1
                    good.write(dumps(record) + "\n")
    return res


def eval_share(prompt_text: str, salt: str = "") -> float:
    """A number in [0, 1) fixed by the prompt alone: the same prompt always lands in the same split."""
    return _hash("split", salt, norm(prompt_text)) / 2**64


def split(path: str | Path, out_dir: str | Path, cfg: SplitConfig) -> dict[str, int]:
    if not 0.0 <= cfg.eval_fraction <= 1.0:
        raise ConfigError(f"eval_fraction must be within [0, 1], got {cfg.eval_fraction}")
    out_dir = Path(out_dir)
    counts = Counter()
    # written under temporary names and renamed together once whole: never a half-written split (a full disk)
    files = {name: AtomicWriter(out_dir / f"{name}.jsonl", "curate.write") for name in ("train", "eval")}
    with replacing(*files.values()) as writers:
        quarantine = None
        for _, result in iter_parsed(path, cfg):
            counts["rows"] += 1
            if isinstance(result, Problem):
                counts["invalid"] += 1
                if quarantine is None:
                    quarantine = AtomicWriter(out_dir / "quarantine.jsonl")
                    writers.append(quarantine)
                quarantine.write(json_line(result.to_json()) + "\n")
                continue
            for record in result:
                name = "eval" if eval_share(text_of(record.prompt), cfg.salt) < cfg.eval_fraction else "train"
                counts[name] += 1
                files[name].write(dumps(record) + "\n")
    return dict(counts)
