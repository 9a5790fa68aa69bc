"""Hostile input, curation that loses nothing, statistics and the split: through the real CLI."""

import base64
import json
import subprocess
import sys
from pathlib import Path

import prefalign
from prefalign.data import load_records
from prefalign.data.curate import CurateConfig, ReadOptions, SplitConfig, compute_stats, curate, split

FIXTURES = Path(__file__).parent / "fixtures"
HH = Path(prefalign.__file__).parent / "assets" / "hh_rlhf_harmless_100.jsonl"


def cli(*args, check=False):
    return subprocess.run([sys.executable, "-m", "prefalign", *map(str, args)], capture_output=True, text=True,
                          check=check)


HOSTILE_LINES = [
    b'{"prompt": "p1", "chosen": "good", "rejected": "bad"}',  # 1 ok
    b'{"prompt": "p2", "chosen": "good", "rejected": ',  # 2 broken JSON
    b"",  # 3 blank: not a record
    b'{"prompt": "p3", "chosen": "good"}',  # 4 missing rejected
    b'{"prompt": "p4", "chosen": 5, "rejected": "bad"}',  # 5 wrong type
    b'{"prompt": "p5", "chosen": "   ", "rejected": "bad"}',  # 6 empty answer
    b'{"prompt": "p6", "chosen": "Same  answer", "rejected": "same answer"}',  # 7 tie
    b'{"prompt": "p7", "chosen": "caf\xe9", "rejected": "bad"}',  # 8 invalid UTF-8 (latin-1 byte)
    b"   ",  # 9 blank with spaces
    b'["not", "an", "object"]',  # 10 not an object
    b'{"prompt": "p8", "chosen": "good \xf0\x9f\x98\x80", "rejected": "bad"}',  # 11 ok (emoji)
    b'{"prompt": "p1", "chosen": "good", "rejected": "bad"}',  # 12 duplicate of 1
    b'{"prompt": "p9", "chosen": "x", "rejected": "y"}',  # 13 ok
    b'{"prompt": "p9", "chosen": "y", "rejected": "x"}',  # 14 conflicts with 13
]
BAD = {2: ("", "json"), 4: ("rejected", "missing"), 5: ("chosen", "type"), 6: ("chosen", "empty"),
       7: ("rejected", "tie"), 8: ("", "utf8"), 10: ("", "type")}


def hostile(tmp_path) -> Path:
    path = tmp_path / "hostile.jsonl"
    path.write_bytes(b"\n".join(HOSTILE_LINES) + b"\n")
    return path


def test_hostile_file_one_problem_per_bad_record(tmp_path):
    path = hostile(tmp_path)
    records, problems = load_records(path)
    assert {p.where.line: (p.field, p.kind) for p in problems} == BAD
    assert [r.where.line for r in records] == [1, 11, 12, 13, 14]
    run = cli("data", "check", path)
    assert run.returncode == 1
    lines = run.stdout.strip().splitlines()
    assert len(lines) == len(BAD)
    assert lines[1] == f"{path}:4: rejected: missing"
    assert f"{path}:8: not valid UTF-8 (byte 0xe9" in run.stdout
    assert "12 records, 5 valid, 7 invalid" in run.stderr.replace("\n", " ")


def test_curate_keeps_good_quarantines_bad_and_counts_add_up(tmp_path):
    path = hostile(tmp_path)
    out, bad = tmp_path / "out" / "clean.jsonl", tmp_path / "bad.jsonl"
    run = cli("data", "curate", path, "-o", out, "--quarantine", bad)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary == {"rows": 12, "rows_invalid": 7, "rows_valid": 5, "records_valid": 5, "kept": 2,
                       "set_aside": {"duplicate": 1, "conflict": 2}}
    kept = [json.loads(x) for x in out.read_text().splitlines()]
    quarantined = [json.loads(x) for x in bad.read_text().splitlines()]
    assert len(kept) + len(quarantined) == 12
    assert [k["prompt"] for k in kept] == ["p1", "p8"]
    # bad records verbatim: the exact input line, or its exact bytes when they are not UTF-8
    by_line = {q["line"]: q for q in quarantined}
    assert by_line[4]["raw"] == HOSTILE_LINES[3].decode()
    assert base64.b64decode(by_line[8]["raw_base64"]) == HOSTILE_LINES[7]
    assert by_line[12]["kind"] == "duplicate" and by_line[13]["kind"] == by_line[14]["kind"] == "conflict"
    # the curated file reads back clean
    records, problems = load_records(out)
    assert problems == [] and len(records) == 2
    # conflicts=keep_first keeps line 13 and sets aside 14; keep keeps both
    res = curate(path, tmp_path / "a.jsonl", tmp_path / "aq.jsonl", CurateConfig(conflicts="keep_first"))
    assert res.kept == 3 and dict(res.set_aside) == {"duplicate": 1, "conflict": 1}
    res = curate(path, tmp_path / "b.jsonl", tmp_path / "bq.jsonl", CurateConfig(conflicts="keep", dedup=False))
    assert res.kept == 5


def test_curate_length_filters_and_overrides(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"prompt": "p" * 10, "chosen": "c" * n, "rejected": "r" * 5} for n in (2, 20, 200)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = cli("data", "curate", path, "-o", tmp_path / "o.jsonl", "--max-chars", "100", "min_chars=3")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["set_aside"] == {"filtered": 2}
    run = cli("data", "curate", path, "-o", tmp_path / "o.jsonl", "max_char=3")
    assert run.returncode == 2 and "unknown key 'max_char'; did you mean 'max_chars'?" in run.stderr


def test_curate_max_tokens_with_tokenizer(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path / "tok")
    path = tmp_path / "d.jsonl"
    rows = [{"prompt": "the movie", "chosen": "good " * n, "rejected": "bad"} for n in (1, 50)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = curate(path, tmp_path / "o.jsonl", tmp_path / "q.jsonl",
                 CurateConfig(tokenizer=str(tmp_path / "tok"), max_tokens=20))
    assert res.kept == 1 and res.set_aside["filtered"] == 1


def test_stats_real_hh_slice_json_keys(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path / "tok")
    run = cli("data", "stats", HH, "--json", "--tokenizer", tmp_path / "tok")
    assert run.returncode == 0, run.stderr
    stats = json.loads(run.stdout)
    for key in ("records", "valid", "invalid", "duplicates", "ties", "chosen_longer_share",
                "prompt_chars", "chosen_chars", "rejected_chars", "prompt_tokens", "chosen_tokens"):
        assert key in stats, key
    assert (stats["records"], stats["valid"], stats["invalid"]) == (100, 99, 1)
    records, _ = load_records(HH)
    longer = sum(len(r.chosen) > len(r.rejected) for r in records)
    assert stats["chosen_longer_share"] == round(longer / 99, 4)
    assert stats["chosen_chars"]["max"] == max(len(r.chosen) for r in records)
    assert stats["prompt_tokens"]["p50"] > 0


def test_stats_counts_duplicates_ties_and_percentiles(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"prompt": f"p{i}", "chosen": "c" * (i + 1), "rejected": "r"} for i in range(10)]
    rows += [
        rows[0],
        {"prompt": "P0 ", "chosen": "C", "rejected": "r"},
        {"prompt": "t", "chosen": "a", "rejected": "A"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = compute_stats(path, ReadOptions()).to_json()
    assert (s["records"], s["valid"], s["invalid"], s["duplicates"], s["ties"]) == (13, 12, 1, 2, 1)
    assert s["chosen_longer_share"] == round(9 / 12, 4)  # c*(i+1) vs "r": longer for i >= 1 only
    assert s["chosen_chars"]["min"] == 1 and s["chosen_chars"]["max"] == 10


def test_split_is_deterministic_and_disjoint_by_prompt(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"prompt": f"prompt {i % 40}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(200)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = cli("data", "split", path, "--eval-fraction", "0.25", "-o", tmp_path / "s1")
    assert run.returncode == 0, run.stderr
    split(path, tmp_path / "s2", SplitConfig(eval_fraction=0.25))
    train = [json.loads(x) for x in (tmp_path / "s1" / "train.jsonl").read_text().splitlines()]
    evals = [json.loads(x) for x in (tmp_path / "s1" / "eval.jsonl").read_text().splitlines()]
    assert len(train) + len(evals) == 200 and 0 < len(evals) < 200
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}
    assert (tmp_path / "s1" / "eval.jsonl").read_text() == (tmp_path / "s2" / "eval.jsonl").read_text()
    other = split(path, tmp_path / "s3", SplitConfig(eval_fraction=0.25, salt="x"))
    assert other["eval"] != len(evals) or (tmp_path / "s3" / "eval.jsonl").read_text() != \
        (tmp_path / "s1" / "eval.jsonl").read_text()
