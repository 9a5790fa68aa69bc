"""A resume cutting metrics.jsonl back to its checkpoint (train/loop.py `_cut_after`): a truncate when the
rows kept are a prefix, a whole rewrite renamed in place when a cut line sits among them; either way the
rows up to the checkpoint stay, each once, and the file ends in a newline for the next append."""

from __future__ import annotations

import json

from prefalign.train.loop import _cut_after


def _rows(steps):
    return b"".join(json.dumps({"step": s, "loss": s / 10}).encode() + b"\n" for s in steps)


def test_the_rows_after_the_checkpoint_are_cut_off(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(_rows([0, 1, 2, 3, 4]) + b'{"step": 5, "lo')  # the last write cut short
    inode = path.stat().st_ino
    last, until = _cut_after(path, 2, lambda _: None)
    assert path.read_bytes() == _rows([0, 1, 2]) and last["step"] == 2 and until == 4
    assert path.stat().st_ino == inode  # cut in place, not rewritten


def test_a_cut_line_among_the_kept_rows_is_dropped_by_a_whole_rewrite(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(_rows([0, 1]) + b'{"step": 2, "lo\n' + _rows([3, 4]))
    last, until = _cut_after(path, 3, lambda _: None)
    assert path.read_bytes() == _rows([0, 1, 3]) and last["step"] == 3 and until == 4
    assert not (tmp_path / ".metrics.jsonl.tmp").exists()


def test_a_last_row_without_its_newline_gets_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(_rows([0, 1]) + b'{"step": 2}')
    _cut_after(path, 2, lambda _: None)
    assert path.read_bytes() == _rows([0, 1]) + b'{"step": 2}\n'
