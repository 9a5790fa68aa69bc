"""Duplicate detection keys a record by its parts: text that holds the separator (a NUL) must not make two
different records one key; and the split's hash, which decides train/eval, stays what it was."""

import json

from prefalign.data.curate import CurateConfig, curate, eval_share


def test_a_nul_inside_a_text_does_not_make_two_records_one(tmp_path):
    path = tmp_path / "x.jsonl"
    rows = [{"prompt": "q\u0000r", "chosen": "s", "rejected": "t"},  # the same bytes with \0 between the
            {"prompt": "q", "chosen": "r\u0000s", "rejected": "t"},  # parts: distinct records
            {"prompt": "q", "chosen": "t", "rejected": "r\u0000s"}]  # ... and this is the second's conflict
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = curate(path, tmp_path / "k.jsonl", tmp_path / "q.jsonl", CurateConfig(conflicts="keep_first"))
    assert res.kept == 2 and dict(res.set_aside) == {"conflict": 1}
    aside = json.loads((tmp_path / "q.jsonl").read_text())
    assert aside["line"] == 3 and "line/row 2" in aside["problem"]


def test_the_split_hash_is_unchanged():
    # values of the hash every split made so far used: a change would move records between train and eval
    assert eval_share("What is 2+2?") == 0.19375630264542187
    assert eval_share("q\u0000r", salt="s") == 0.6070318862462184
