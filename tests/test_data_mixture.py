"""Data mixtures (`data:` as a list of sources) and named eval sets (`eval_data:` as a mapping):
exact shares, a seeded and repeatable mix, per-source counts in run.json, eval/<name>/... metrics,
and errors that name the entry and the field (docs/data-mixtures.md)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from conftest import held_out_pairs, learnable_pairs, unpaired_from, write_jsonl
from prefalign.data.mixture import DataSource, counts, mix
from prefalign.errors import ConfigError, DataError
from prefalign.train.methods import METHODS, make_config
from prefalign.train.run import train
from prefalign.train.sources import load_examples, load_prompt_mix


def _sources(*shares: dict) -> list[DataSource]:
    return [DataSource(path=f"s{i}.jsonl", **s) for i, s in enumerate(shares)]


def test_counts_follow_the_weights_and_fractions_exactly():
    # weights: shares of the mixed set, whose size is the sources' rows together (10 + 30 = 40)
    assert counts(_sources({"weight": 3}, {"weight": 1}), [10, 30]) == [30, 10]
    assert counts(_sources({"weight": 1}, {"weight": 1}, {"weight": 1}), [5, 7, 9]) == [7, 7, 7]
    assert counts(_sources({"weight": 0.1}, {"weight": 0.2}, {"weight": 0.7}), [50, 25, 25]) == [10, 20, 70]
    # the numbers as written: 0.35 and 0.65 of 10 rows are 3.5 and 6.5, a tie the first source wins (as
    # binary floats 0.35 is a hair under and 0.65 a hair over, which would give 3 and 7)
    assert counts(_sources({"weight": 0.35}, {"weight": 0.65}), [5, 5]) == [4, 6]
    # 10 rows in thirds: floors 3/3/3, the leftover row to the first of the equal remainders
    assert counts(_sources({"weight": 1}, {"weight": 1}, {"weight": 1}), [4, 3, 3]) == [4, 3, 3]
    assert counts(_sources({"weight": 2}, {"weight": 1}), [4, 3]) == [5, 2]  # 7 * 2/3 = 4.67, 7 / 3 = 2.33
    # fractions: of each source's own rows, rounded half up (0.35 of 10 is 3.5: 4, where floats give 3)
    assert counts(_sources({"fraction": 0.29}, {"fraction": 0.5}, {}), [100, 5, 8]) == [29, 3, 8]
    assert counts(_sources({"fraction": 0.35}), [10]) == [4]


def _parts(*sizes: int) -> list[list[tuple[int, int]]]:
    return [[(s, r) for r in range(n)] for s, n in enumerate(sizes)]


def test_the_mix_takes_each_share_evenly_and_repeatably():
    sources = _sources({"weight": 3}, {"weight": 1})
    mixed, uses = mix(_parts(10, 30), sources, seed=7)
    assert [(u.available, u.used) for u in uses] == [(10, 30), (30, 10)]
    per_row = Counter(mixed)
    # upsampled 3x: every row of source 0 exactly three times; downsampled: 10 distinct rows of 30
    assert {per_row[(0, r)] for r in range(10)} == {3}
    assert sum(1 for s, _ in per_row if s == 1) == 10 and max(c for (s, _), c in per_row.items() if s == 1) == 1
    assert mixed == mix(_parts(10, 30), sources, seed=7)[0]  # same config, same order
    other = mix(_parts(10, 30), sources, seed=8)[0]
    assert other != mixed and {x for x in other if x[0] == 1} != {x for x in mixed if x[0] == 1}
    # the sources are interleaved, not laid end to end
    assert mixed[:30] != sorted(mixed[:30]) and {s for s, _ in mixed[:10]} == {0, 1}
    # a fraction is a subset without repeats; 2.5 rows round up to 3
    frac, uses = mix(_parts(5, 8), _sources({"fraction": 0.5}, {}), seed=0)
    assert [u.used for u in uses] == [3, 8] and len(set(frac)) == 11
    # one source taken whole keeps its file order: a plain `data: FILE` trains as before mixtures
    assert mix(_parts(6), _sources({}), seed=3)[0] == _parts(6)[0]


def test_bad_entries_name_the_entry_and_the_field(tmp_path, tokenizer):
    base = dict(method="dpo", model="m", output="o")
    with pytest.raises(ConfigError, match=r"data\[1\]: set weight or fraction, not both") as e:
        make_config(**base, data=["a.jsonl", {"path": "b.jsonl", "weight": 1, "fraction": 0.5}])
    assert "valid string" not in str(e.value)  # not the noise of the other branch (data: a plain path)
    with pytest.raises(ConfigError, match=r"unknown key 'data\[1\]\.fractoin'; did you mean 'fraction'\?"):
        make_config(**base, data=["a.jsonl", {"path": "b.jsonl", "fractoin": 0.5}])
    with pytest.raises(ConfigError, match=r"data\[1\]\.weight: missing"):
        make_config(**base, data=[{"path": "a.jsonl", "weight": 2}, "b.jsonl"])
    with pytest.raises(ConfigError, match=r"unknown key 'eval_data\.held\.fractoin'"):
        make_config(**base, data="a.jsonl", eval_data={"held": {"path": "h.jsonl", "fractoin": 0.5}})
    with pytest.raises(ConfigError, match=r"eval_data\.held\.weight: an eval set is one source"):
        make_config(**base, data="a.jsonl", eval_data={"held": {"path": "h.jsonl", "weight": 2}})
    with pytest.raises(ConfigError, match=r"prompts\[0\]: set weight or fraction"):
        make_config(method="ppo", model="m", output="o", reward="r:f",
                    prompts=[{"path": "p.jsonl", "weight": 1, "fraction": 1}])

    pairs = write_jsonl(tmp_path / "pairs.jsonl", learnable_pairs(8))
    kto = write_jsonl(tmp_path / "kto.jsonl", unpaired_from(learnable_pairs(8)))

    def load(method: str, data):
        cfg = make_config(method=method, model="m", output=str(tmp_path), data=data, max_length=64)
        return load_examples(cfg.data, "data", cfg, tokenizer, METHODS[method].unit, tmp_path, "data", lambda _: None)

    with pytest.raises(DataError, match=r"data\[1\]\.path: .*missing\.jsonl: no such file or folder"):
        load("dpo", [str(pairs), str(tmp_path / "missing.jsonl")])
    with pytest.raises(DataError, match=r"data\[0\]\.split: 'validation' names a split of a saved DatasetDict"):
        load("dpo", [{"path": str(pairs), "split": "validation"}])
    # DPO cannot take KTO's unpaired rows, nor KTO pairs: the error names the source that does not fit
    with pytest.raises(DataError, match=r"data\[1\]: .*kto\.jsonl:1: this method trains on preference pairs"):
        load("dpo", [str(pairs), str(kto)])
    with pytest.raises(DataError, match=r"data\[0\]: .*pairs\.jsonl:1: this method trains on unpaired"):
        load("kto", [str(pairs), str(kto)])
    with pytest.raises(DataError, match=r"data\[1\] \(.*\): fraction 0\.01 of its 8 usable rows is 0 rows"):
        load("dpo", [str(pairs), {"path": str(pairs), "fraction": 0.01}])
    # SFT takes both shapes: the chosen answers of pairs and the desirable completions of KTO rows
    data, uses = load("sft", [str(pairs), str(kto)])
    assert [(u.available, u.used) for u in uses] == [(8, 8), (4, 4)] and len(data) == 12
    # RL prompts: a source's rows are its distinct prompts (the KTO rows repeat the pairs' 8 prompts)
    cfg = make_config(method="rloo", model="m", output="o", reward="r:f", seed=1,
                      prompts=[{"path": str(pairs), "weight": 1}, {"path": str(kto), "weight": 3}])
    prompts, uses = load_prompt_mix(cfg, tmp_path, lambda _: None)
    assert [(u.available, u.used) for u in uses] == [(8, 4), (8, 12)] and len(prompts) == 16
    assert prompts == load_prompt_mix(cfg, tmp_path, lambda _: None)[0]


def _conversations(pairs: list[dict]) -> list[dict]:
    """The same pairs in the conversation shape (chat messages through the chat template)."""
    def talk(p, answer):
        return [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": answer}]
    return [{"chosen": talk(p, p["chosen"]), "rejected": talk(p, p["rejected"])} for p in pairs]


@pytest.fixture(scope="module")
def runs(tiny_models, tmp_path_factory):
    """Two 2-step DPO runs on the same mix of a pairs file (weight 3) and a conversation file (weight 1):
    one evaluates the named sets a and b, the other only a's file as a plain eval_data."""
    root = tmp_path_factory.mktemp("mix")
    train_a = learnable_pairs(12)
    held_a = held_out_pairs(train_a, 8)
    train_b = held_out_pairs(train_a + held_a, 20)[12:]  # 8 more prompts of the same task
    held_b = learnable_pairs(6, seed=5)
    files = {name: write_jsonl(root / f"{name}.jsonl", rows) for name, rows in
             [("a", train_a), ("held_a", held_a), ("b", _conversations(train_b)), ("held_b", _conversations(held_b))]}
    # the run's format is pairs, source b's its own; precomputed reference log-probs: one table per eval set
    common = dict(method="dpo", model=str(tiny_models["llama"]), max_steps=2, batch_size=4, eval_every=2, kl_every=0,
                  reference="precompute", format="pairs",
                  data=[{"path": str(files["a"]), "weight": 3}, {"path": str(files["b"]), "weight": 1,
                                                                  "format": "conversation"}])
    named = dict(a=str(files["held_a"]), b={"path": str(files["held_b"]), "format": "conversation"})
    for out, eval_data in (("named", named), ("single", str(files["held_a"]))):
        train(make_config(**common, eval_data=eval_data, output=str(root / out)), log=lambda _: None, progress=False)
    rows = {out: [json.loads(x) for x in (root / out / "metrics.jsonl").read_text().splitlines()]
            for out in ("named", "single")}
    return root, rows


def test_run_json_counts_each_source(runs):
    root, _ = runs
    sources = json.loads((root / "named" / "run.json").read_text())["data_sources"]
    # 12 + 8 = 20 rows in the mix, 3:1 -> 15 of the pairs file (repeats) and 5 of the 8 conversations
    assert [(s["available"], s["used"]) for s in sources] == [(12, 15), (8, 5)]
    assert [s["weight"] for s in sources] == [3.0, 1.0]
    assert [s["format"] for s in sources] == ["pairs", "conversation"] and sources[0]["path"].endswith("a.jsonl")


def test_named_eval_sets_are_logged_apart_and_match_a_single_set_run(runs):
    _, rows = runs
    named = {r["step"]: r for r in rows["named"] if "eval/a/loss" in r}
    single = {r["step"]: r for r in rows["single"] if "eval/loss" in r}
    assert sorted(named) == sorted(single) == [0, 2]
    for step in (0, 2):
        assert {k for k in named[step] if k.startswith("eval/")} == {
            f"eval/{s}/{k.removeprefix('eval/')}" for s in "ab" for k in single[step] if k.startswith("eval/")}
        # set a is the single run's eval_data: the same numbers (the training is the same)
        for key in (k for k in single[step] if k.startswith("eval/")):
            assert named[step]["eval/a/" + key.removeprefix("eval/")] == pytest.approx(single[step][key], abs=1e-6)
        if step == 0:  # the untrained policy is its reference on every set (each set has its own table)
            assert named[0]["eval/a/rewards/chosen"] == named[0]["eval/b/rewards/chosen"] == 0.0
        # different sets, different numbers (DPO's loss is log 2 on any set at step 0: compare log-probs)
        assert named[step]["eval/a/logps/chosen"] != pytest.approx(named[step]["eval/b/logps/chosen"], abs=1e-3)
    assert not any(k.startswith("eval/") and k.count("/") == 1 for r in rows["named"] for k in r)
