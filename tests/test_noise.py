"""Label-noise estimates (data/noise.py, judges/noise.py) and `label_smoothing: auto` (train/noise.py):
closed forms worked by hand, recovery of known flip rates, and the trainer recording what it used."""

import json
import math
import random

import numpy as np
import pytest

from conftest import learnable_pairs, write_jsonl
from prefalign.data import ReadOptions
from prefalign.data.curate import compute_stats
from prefalign.data.noise import (
    DuplicateComparisons,
    combine,
    flip_from_disagreement,
    from_disagreements,
    from_judge_order,
    from_reward_model,
    wilson,
)
from prefalign.errors import ConfigError
from prefalign.train.help import config_help
from prefalign.train.methods import make_config
from prefalign.train.noise import resolve_label_smoothing

Z = 1.959963984540054


def noisy(rows, eps, copies, seed):
    """Each pair `copies` times, each copy's label flipped independently with probability eps."""
    rng = random.Random(seed)
    return [dict(r, chosen=r["rejected"], rejected=r["chosen"]) if rng.random() < eps else dict(r)
            for r in rows for _ in range(copies)]


def distinct_pairs(n, seed=0):
    rng = random.Random(seed)
    return [{"prompt": f"q{i} {rng.random():.6f}", "chosen": f" right {i}", "rejected": f" wrong {i}"}
            for i in range(n)]


def test_wilson_interval_by_hand():
    # k = 5 of n = 10: p = 1/2, so the centre is 1/2 and half = z/(1 + z^2/10) * sqrt(1/40 + z^2/400)
    half = Z / (1 + Z * Z / 10) * math.sqrt(0.25 / 10 + Z * Z / 400)
    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.5 - half, abs=1e-12) and hi == pytest.approx(0.5 + half, abs=1e-12)
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)  # the textbook value for 5/10
    # k = 0: the low end is 0 and the high end z^2/(n + z^2)
    assert wilson(0, 20) == pytest.approx((0.0, Z * Z / (20 + Z * Z)), abs=1e-12)
    with pytest.raises(ValueError):
        wilson(3, 2)


def test_flip_rate_from_disagreement_inverts_2eps_1_minus_eps():
    for eps in (0.0, 0.05, 0.2, 0.35, 0.5):
        assert flip_from_disagreement(2 * eps * (1 - eps)) == pytest.approx(eps, abs=1e-9)
    assert flip_from_disagreement(0.32) == pytest.approx(0.2, abs=1e-12)  # 2 * 0.2 * 0.8 = 0.32
    assert flip_from_disagreement(0.7) == 0.5  # beyond chance: no information left
    e = from_disagreements(32, 100, "duplicates")
    lo, hi = wilson(32, 100)
    assert (e.flip_rate, e.low, e.high) == pytest.approx((0.2, flip_from_disagreement(lo), flip_from_disagreement(hi)))


def test_duplicates_are_compared_two_at_a_time():
    t = DuplicateComparisons()
    # one pair labelled T, F, T, T, F: comparisons (T, F) disagree, (T, T) agree; the last F waits for a partner
    for orient in (True, False, True, True, False):
        t.observe(7, orient)
    t.observe(9, True)  # a pair seen once: no comparison
    assert (t.comparisons, t.disagreements, t.repeated) == (2, 1, 4)


def test_reward_model_is_a_bound_alone_and_an_estimate_with_its_accuracy():
    bound = from_reward_model(30, 100)
    assert bound.bound == "upper" and bound.flip_rate == pytest.approx(0.3)
    # d = eps + delta - 2 eps delta with delta = 0.1: eps = (0.3 - 0.1) / (1 - 0.2) = 0.25
    est = from_reward_model(30, 100, accuracy=0.9)
    assert est.bound == "estimate" and est.flip_rate == pytest.approx(0.25, abs=1e-12)
    d_lo, d_hi = wilson(30, 100)
    assert (est.low, est.high) == pytest.approx(((d_lo - 0.1) / 0.8, (d_hi - 0.1) / 0.8), abs=1e-12)
    # an accuracy measured on 200 pairs widens the interval: delta's own Wilson interval enters
    measured = from_reward_model(30, 100, accuracy=0.9, accuracy_pairs=200)
    assert measured.low < est.low and measured.high > est.high and measured.flip_rate == est.flip_rate


def test_combine_takes_the_narrowest_estimate_and_a_bound_only_alone():
    wide, narrow = from_disagreements(10, 40, "duplicates"), from_judge_order([True] * 900 + [False] * 100)
    bound = from_reward_model(5, 10_000)  # the narrowest interval of all, but a bound
    c = combine([wide, None, bound, narrow])
    assert c["source"] == "judge_order" and len(c["sources"]) == 3
    assert c["flip_rate"] == pytest.approx(flip_from_disagreement(0.1), abs=1e-5)
    assert combine([bound])["bound"] == "upper"
    assert combine([None]) is None


@pytest.mark.parametrize("rate", [0.05, 0.2, 0.35])
def test_known_flip_rates_are_recovered_from_a_file(rate, tmp_path):
    """1500 pairs, each labelled twice with flips at `rate`: `data stats` recovers the rate within its interval."""
    path = write_jsonl(tmp_path / "d.jsonl", noisy(distinct_pairs(1500, seed=1), rate, 2, seed=int(rate * 100)))
    noise = compute_stats(path, ReadOptions()).to_json()["noise"]
    assert noise["source"] == "duplicates" and noise["sources"][0]["comparisons"] == 1500
    assert noise["low"] <= rate <= noise["high"], noise
    # an interval that says something; near eps = 1/2 the transform stretches it (0.12 wide at 35% here)
    assert noise["high"] - noise["low"] < 0.15, noise


@pytest.mark.parametrize("rate", [0.05, 0.2, 0.35])
def test_the_interval_covers_the_true_rate_95_percent_of_the_time(rate):
    """400 simulated sets of 300 independent comparisons: the mapped Wilson interval holds eps about 95% of
    the time (a wrong transform or z misses it far more often)."""
    rng = np.random.default_rng(0)
    q = 2 * rate * (1 - rate)
    held = [(e := from_disagreements(int(k), 300, "duplicates")).low <= rate <= e.high
            for k in rng.binomial(300, q, size=400)]
    assert 0.92 <= np.mean(held) <= 0.99, np.mean(held)


def _cfg(tmp_path, data, method="robust", label_smoothing="auto"):
    return make_config(method=method, model=str(tmp_path / "m"), data=str(data), output=str(tmp_path / "out"),
                       label_smoothing=label_smoothing)


def test_auto_without_repeats_is_a_clear_error_and_a_number_is_untouched(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", distinct_pairs(20))
    with pytest.raises(ConfigError, match=r"label_smoothing: auto: no source could estimate .* Give label_smoothing "
                                          r"a number"):
        resolve_label_smoothing(_cfg(tmp_path, data), log=lambda _: None)
    cfg = _cfg(tmp_path, data, "cdpo", 0.15)
    assert resolve_label_smoothing(cfg, log=lambda _: None) == (cfg, None)
    with pytest.raises(ConfigError, match="label_smoothing"):
        _cfg(tmp_path, data, "dpo")  # auto is cdpo's and robust's
    assert "label_smoothing  float | auto  0.1" in config_help("robust")


def test_auto_is_capped_where_robust_dpo_would_divide_by_almost_zero(tmp_path):
    rows = distinct_pairs(200)
    flipped = [dict(r, chosen=r["rejected"], rejected=r["chosen"]) for r in rows]
    data = write_jsonl(tmp_path / "d.jsonl", rows + flipped)  # every repeat disagrees: eps = 1/2
    cfg, info = resolve_label_smoothing(_cfg(tmp_path, data), log=lambda _: None)
    assert cfg.label_smoothing == 0.45 and info["capped"] and info["flip_rate"] == 0.5


def test_auto_trains_robust_with_the_estimate_and_records_it(tiny_models, tmp_path):
    from prefalign.train.run import train

    data = write_jsonl(tmp_path / "d.jsonl", noisy(learnable_pairs(48), 0.2, 2, seed=3))
    expected = compute_stats(data, ReadOptions()).to_json()["noise"]
    cfg = make_config(method="robust", label_smoothing="auto", model=str(tiny_models["llama"]), data=str(data),
                      output=str(tmp_path / "run"), max_steps=2, batch_size=4, kl_every=0, seed=0)
    train(cfg, log=lambda _: None, progress=False)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    noise = run["label_noise"]
    assert noise["label_smoothing"] == expected["flip_rate"] and not noise["capped"]
    assert (noise["low"], noise["high"], noise["source"]) == (expected["low"], expected["high"], "duplicates")
    assert noise["sources"][0]["comparisons"] == 48
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(x["loss"]) for x in lines if "loss" in x)


def test_data_stats_with_a_reward_model_and_a_pairwise_judge(tiny_models, tmp_path, capsys, monkeypatch):
    """`data stats --reward-model` (a scorer that knows the truth) counts exactly the flipped labels; with its
    accuracy (1.0) the bound becomes the estimate; `--judge` (a tiny causal LM) asks every pair in both orders."""
    from prefalign.cli import main

    rows = noisy(distinct_pairs(60, seed=2), 0.2, 1, seed=5)
    flipped = sum(r["chosen"].startswith(" wrong") for r in rows)
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "truth.py").write_text("def score(prompts, completions):\n"
                                       "    return [float('right' in c) for c in completions]\n")

    def stats(*extra):
        monkeypatch.setattr("sys.argv", ["prefalign", "data", "stats", str(data), "--json", *extra])
        try:
            main()
        except SystemExit as e:  # typer exits 0 after a command
            assert not e.code, capsys.readouterr()
        return json.loads(capsys.readouterr().out)["noise"]

    bound = stats("--reward-model", f"{tmp_path / 'truth.py'}:score")
    assert bound["bound"] == "upper" and bound["sources"][0]["disagreements"] == flipped
    assert bound["flip_rate"] == pytest.approx(flipped / 60, abs=1e-5)
    exact = stats("--reward-model", f"{tmp_path / 'truth.py'}:score", "--reward-model-accuracy", "1.0",
                  "--judge", str(tiny_models["llama"]))
    by_source = {s["source"]: s for s in exact["sources"]}
    assert by_source["reward_model"]["bound"] == "estimate"
    assert by_source["reward_model"]["flip_rate"] == pytest.approx(flipped / 60, abs=1e-5)
    assert by_source["judge_order"]["comparisons"] == 60
    # the estimate used is the narrower interval of the two (the untrained judge's, pinned near 1/2)
    narrowest = min(exact["sources"], key=lambda e: e["high"] - e["low"])
    assert exact["source"] == narrowest["source"] and exact["flip_rate"] == narrowest["flip_rate"]

