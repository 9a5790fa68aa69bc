"""CSV holds only text: a cell is decoded (as JSON, or true/false) only for a field whose value is not text,
so a pair whose text looks like JSON or a boolean is read as the text it is."""

import json

from prefalign.data.curate import CurateConfig, curate
from prefalign.data.readers import read_rows


def run(tmp_path, text: str):
    path = tmp_path / "x.csv"
    path.write_text(text)
    res = curate(path, tmp_path / "k.jsonl", tmp_path / "q.jsonl", CurateConfig(conflicts="keep", dedup=False))
    kept = [json.loads(x) for x in (tmp_path / "k.jsonl").read_text().splitlines()]
    return res, kept


def test_text_that_looks_like_json_or_a_boolean_stays_text(tmp_path):
    res, kept = run(tmp_path, 'prompt,chosen,rejected\ntrue,yes,no\nIs it [1]?,"[1, 2]",no\n'
                              '"{""a"": 1}",ok,bad\nFALSE,"[{""a"": 1}]",null\n')
    assert (res.rows, res.kept, res.rows_invalid) == (4, 4, 0)
    assert [(k["prompt"], k["chosen"], k["rejected"]) for k in kept] == [
        ("true", "yes", "no"), ("Is it [1]?", "[1, 2]", "no"), ('{"a": 1}', "ok", "bad"),
        ("FALSE", '[{"a": 1}]', "null")]


def test_fields_that_are_not_text_are_decoded(tmp_path):
    msgs = json.dumps([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]).replace('"', '""')
    other = msgs.replace('""a""', '""b""')
    res, kept = run(tmp_path, f'chosen,rejected\n"{msgs}","{other}"\n')
    assert res.kept == 1 and kept[0]["chosen"] == [{"role": "assistant", "content": "a"}]  # conversation shape
    path = tmp_path / "r.csv"
    path.write_text('prompt,responses,scores,margin\np,"[""a"", ""b""]","[1, 2]",0.5\n')
    (row,) = read_rows(path)
    assert row.value == {"prompt": "p", "responses": ["a", "b"], "scores": [1, 2], "margin": 0.5}
    path.write_text("prompt,completion,label\np,a,true\nq,b,False\nr,c,1\n")
    assert [r.value["label"] for r in read_rows(path)] == [True, False, 1]
