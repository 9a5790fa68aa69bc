"""Every reader x every shape, auto-detection and explicit override, on real files written to disk."""

import csv
import json
from pathlib import Path

import pytest

import prefalign
from prefalign.data import PreferencePair, ReadOptions, UnpairedExample, load_records
from prefalign.data.shapes import detect_shape

FIXTURES = Path(__file__).parent / "fixtures"
HH = Path(prefalign.__file__).parent / "assets" / "hh_rlhf_harmless_100.jsonl"

PAIRS = [{"prompt": f"Question {i}?", "chosen": f"Good answer {i}.", "rejected": f"Bad answer {i}."}
         for i in range(5)]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_json_csv_parquet_arrow_give_the_same_pairs(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = {"jsonl": write_jsonl(tmp_path / "d.jsonl", PAIRS)}
    files["json"] = tmp_path / "d.json"
    files["json"].write_text(json.dumps(PAIRS, indent=2))
    files["csv"] = tmp_path / "d.csv"
    with open(files["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected"])
        w.writeheader()
        w.writerows(PAIRS)
    files["parquet"] = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(PAIRS), files["parquet"])
    files["arrow"] = tmp_path / "saved"
    datasets.Dataset.from_list(PAIRS).save_to_disk(str(files["arrow"]))
    expected = [(p["prompt"], p["chosen"], p["rejected"]) for p in PAIRS]
    for kind, path in files.items():
        records, problems = load_records(path)
        assert problems == [], kind
        assert [(r.prompt, r.chosen, r.rejected) for r in records] == expected, kind
        # explicit reader gives the same
        records2, _ = load_records(path, ReadOptions(reader=kind))
        assert len(records2) == len(PAIRS)
    # locations: JSONL line numbers, JSON array element lines, CSV lines, Parquet rows
    assert load_records(files["jsonl"])[0][2].where.line == 3
    assert load_records(files["json"])[0][1].where.line == 7  # indent=2: each object spans 5 lines
    assert load_records(files["csv"])[0][0].where.line == 2
    assert str(load_records(files["parquet"])[0][3].where).endswith(":row 4")


def test_datasetdict_folder_split(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(PAIRS[:3]),
                               "test": datasets.Dataset.from_list(PAIRS[3:])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert len(load_records(tmp_path / "dd")[0]) == 3
    assert len(load_records(tmp_path / "dd", ReadOptions(split="test"))[0]) == 2


def test_conversational_with_and_without_prompt(tmp_path):
    user = {"role": "user", "content": "Hi, what is 2+2?"}
    rows = [
        {"prompt": [user], "chosen": [{"role": "assistant", "content": "4"}],
         "rejected": [{"role": "assistant", "content": "5"}]},
        {"chosen": [user, {"role": "assistant", "content": "4"}],
         "rejected": [user, {"role": "assistant", "content": "22"}]},
        # multi-turn: the shared prefix (through the last shared user turn) becomes the prompt
        {"chosen": [user, {"role": "assistant", "content": "4"}, {"role": "user", "content": "sure?"},
                    {"role": "assistant", "content": "yes"}],
         "rejected": [user, {"role": "assistant", "content": "4"}, {"role": "user", "content": "sure?"},
                      {"role": "assistant", "content": "no"}]},
    ]
    records, problems = load_records(write_jsonl(tmp_path / "c.jsonl", rows))
    assert problems == []
    assert records[0].prompt == [user] and records[1].prompt == [user]
    assert records[1].chosen == [{"role": "assistant", "content": "4"}]
    assert len(records[2].prompt) == 3 and records[2].rejected == [{"role": "assistant", "content": "no"}]


def test_conversation_role_problems(tmp_path):
    a = {"role": "assistant", "content": "x"}
    u = {"role": "user", "content": "q"}
    rows = [
        {"chosen": [a, a], "rejected": [u, a]},  # starts with assistant
        {"chosen": [u, u, a], "rejected": [u, u, {"role": "assistant", "content": "y"}]},
        {"chosen": [u, {"role": "wizard", "content": "x"}], "rejected": [u, a]},
        {"chosen": [u, {"role": "assistant", "content": "   "}], "rejected": [u, a]},
        {"chosen": [u, a, {"role": "system", "content": "late"}, a], "rejected": [u, a]},
    ]
    _, problems = load_records(write_jsonl(tmp_path / "bad.jsonl", rows))
    assert [p.kind for p in problems] == ["roles", "roles", "roles", "empty", "roles"]
    assert problems[0].field == "chosen[1].role" or problems[0].field.startswith("chosen[")
    assert problems[2].field == "chosen[1].role" and "wizard" in problems[2].message
    assert problems[3].field == "chosen[1].content"


def test_hh_rlhf_real_slice():
    records, problems = load_records(HH)
    assert len(records) + len(problems) == 100
    assert [p.where.line for p in problems] == [87]
    assert problems[0].field == "chosen" and problems[0].kind == "empty"
    for r in records:
        assert r.prompt.startswith("\n\nHuman:") and r.prompt.endswith("\n\nAssistant:")
        assert "\n\nAssistant:" not in r.chosen and "\n\nAssistant:" not in r.rejected
        raw = json.loads((HH).read_text().splitlines()[r.where.line - 1])
        assert r.prompt + r.chosen == raw["chosen"] and r.prompt + r.rejected == raw["rejected"]


def test_hh_prompts_must_match(tmp_path):
    rows = [{"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"}]
    _, problems = load_records(write_jsonl(tmp_path / "hh.jsonl", rows))
    assert problems[0].kind == "prompt" and "differ" in problems[0].message


def test_llamafactory_sharegpt_and_kto_real_slices():
    records, problems = load_records(FIXTURES / "llamafactory_dpo_40.json")
    assert problems == [] and len(records) == 40
    assert all(isinstance(r, PreferencePair) for r in records)
    assert records[0].prompt[-1]["role"] == "user" and records[0].chosen[0]["role"] == "assistant"
    kto, problems = load_records(FIXTURES / "llamafactory_kto_40.json")
    assert problems == [] and len(kto) == 40
    assert all(isinstance(r, UnpairedExample) for r in kto)
    assert {r.label for r in kto} == {True, False}


def test_kto_and_ranked(tmp_path):
    rows = [{"prompt": "p", "completion": "c", "label": True}, {"prompt": "p", "completion": "d", "label": 0},
            {"prompt": "p", "completion": "e", "label": "yes"}]
    recs, problems = load_records(write_jsonl(tmp_path / "k.jsonl", rows))
    assert [r.label for r in recs] == [True, False]
    assert problems[0].field == "label" and problems[0].kind == "type"
    ranked = [{"prompt": "p", "responses": ["a", "b", "c"], "scores": [1.0, 3.0, 2.0]},
              {"prompt": "q", "responses": ["a", "b"], "scores": [1, 1]}]
    path = write_jsonl(tmp_path / "r.jsonl", ranked)
    recs, problems = load_records(path)
    assert [(r.chosen, r.rejected, r.margin) for r in recs] == [("b", "c", 1.0), ("b", "a", 2.0)]
    assert problems[0].kind == "tie"
    recs, _ = load_records(path, ReadOptions(ranked="best_vs_worst"))
    assert [(r.chosen, r.rejected) for r in recs] == [("b", "a")]
    recs, _ = load_records(path, ReadOptions(ranked="all"))
    assert len(recs) == 3


def test_detection_and_explicit_format(tmp_path):
    assert detect_shape({"prompt": "a", "chosen": "b", "rejected": "c"}) == "pairs"
    assert detect_shape({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "x"}) == "hh"
    assert detect_shape({"conversations": [], "chosen": {}, "rejected": {}}) == "sharegpt"
    assert detect_shape({"messages": [], "label": True}) == "kto"
    assert detect_shape({"prompt": "a", "responses": [], "scores": []}) == "ranked"
    assert detect_shape({"chosen": [], "rejected": []}) == "conversation"
    # the first recognisable record fixes the shape: a later record missing a field says so
    path = write_jsonl(tmp_path / "m.jsonl", [PAIRS[0], {"prompt": "x", "chosen": "y"}])
    _, problems = load_records(path)
    assert problems[0].field == "rejected" and problems[0].kind == "missing"
    # an explicit format overrides detection
    _, problems = load_records(path, ReadOptions(format="kto"))
    assert problems[0].field == "label"
    with pytest.raises(ValueError, match="unknown format"):
        load_records(path, ReadOptions(format="nope"))
