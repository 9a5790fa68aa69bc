"""Label-noise estimates (data/noise.py, judges/noise.py) and `label_smoothing: auto` (train/noise.py):
closed forms worked by hand, recovery of known flip rates, and the trainer recording what it used."""

import json
import math
import random

import numpy as np
import pytest
import torch

from conftest import learnable_pairs, write_jsonl
from prefalign.data import ReadOptions
from prefalign.data.curate import compute_stats
from prefalign.data.noise import (
    Z95,
    Z975,
    DuplicateComparisons,
    combine,
    describe_noise,
    flip_from_disagreement,
    from_disagreements,
    from_reward_model,
    order_inconsistency,
    readiness,
    wilson,
)
from prefalign.errors import ConfigError
from prefalign.train.help import config_help
from prefalign.train.methods import make_config
from prefalign.train.noise import MAX_WIDTH, comparisons_needed, resolve_label_smoothing

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


def test_reward_model_is_a_bound_alone_and_an_estimate_with_its_measured_accuracy():
    bound = from_reward_model(30, 100)
    assert bound.bound == "upper" and bound.flip_rate == pytest.approx(0.3)
    # d = eps + delta - 2 eps delta with delta = 0.1: eps = (0.3 - 0.1) / (1 - 0.2) = 0.25
    point = from_reward_model(30, 100, accuracy=0.9)
    assert point.bound == "point" and point.flip_rate == pytest.approx(0.25, abs=1e-12)  # accuracy taken as exact
    d_lo, d_hi = wilson(30, 100)
    assert (point.low, point.high) == pytest.approx(((d_lo - 0.1) / 0.8, (d_hi - 0.1) / 0.8), abs=1e-12)
    # measured on 200 pairs (180 right): both intervals at 97.5% (Bonferroni, jointly >= 95%), delta's enters
    assert (Z95, Z975) == pytest.approx((1.959964, 2.241403), abs=1e-6)
    est = from_reward_model(30, 100, accuracy=0.9, accuracy_pairs=200)
    (d_lo, d_hi), (a_lo, a_hi) = wilson(30, 100, Z975), wilson(180, 200, Z975)
    assert est.bound == "estimate" and est.flip_rate == point.flip_rate
    assert est.low == pytest.approx((d_lo - (1 - a_lo)) / (1 - 2 * (1 - a_lo)), abs=1e-12)
    assert est.high == pytest.approx((d_hi - (1 - a_hi)) / (1 - 2 * (1 - a_hi)), abs=1e-12)


def test_judge_order_inconsistency_is_a_diagnostic_share():
    e = order_inconsistency(100, 1000)
    assert (e.source, e.bound, e.flip_rate) == ("order_inconsistency", "diagnostic", 0.1)  # the share, no transform
    assert (e.low, e.high) == pytest.approx(wilson(100, 1000))


def test_combine_chooses_by_provenance_not_the_narrowest_interval():
    dup = from_disagreements(20, 100, "duplicates")
    pinned = order_inconsistency(3000, 5000)  # a position-biased judge: narrow, near 1/2
    rm_point = from_reward_model(1100, 10_000, accuracy=0.9)  # narrow, but its accuracy's error is left out
    c = combine([dup, None, pinned, rm_point])
    assert (c["source"], c["flip_rate"], c["conflict"]) == ("duplicates", round(dup.flip_rate, 5), False)
    assert [x["source"] for x in c["excluded"]] == ["order_inconsistency", "reward_model"] and len(c["sources"]) == 3
    # a reward model with a measured accuracy is used when there are no duplicates; the judge never is
    rm = from_reward_model(1100, 10_000, accuracy=0.9, accuracy_pairs=5000)
    assert combine([pinned, rm])["source"] == "reward_model"
    # both usable, overlapping, the reward model's interval the narrower: duplicates still come first
    rm = from_reward_model(2000, 10_000, accuracy=0.9, accuracy_pairs=5000)  # eps 0.125
    assert rm.high - rm.low < dup.high - dup.low and rm.low <= dup.high and dup.low <= rm.high
    both = combine([rm, dup])
    assert (both["source"], both["flip_rate"], both["conflict"]) == ("duplicates", round(dup.flip_rate, 5), False)
    only_diag = combine([pinned])
    assert only_diag["flip_rate"] is None and only_diag["excluded"][0]["source"] == "order_inconsistency"
    assert "not estimated" in describe_noise(only_diag)
    assert combine([None]) is None


def test_combine_excludes_a_source_beyond_chance():
    beyond = from_disagreements(60, 100, "duplicates")  # Wilson's low end of q is above 1/2: low = 1/2
    assert beyond.low == 0.5
    rm = from_reward_model(1100, 10_000, accuracy=0.9, accuracy_pairs=5000)
    c = combine([beyond, rm])
    assert c["source"] == "reward_model" and c["excluded"][0]["source"] == "duplicates"
    assert "beyond chance" in c["excluded"][0]["why"]


def test_upper_bounds_clip_and_flag_conflicts():
    dup = from_disagreements(20, 100, "duplicates")  # eps 0.113 [0.072, 0.175]
    loose, tight = from_reward_model(140, 1000), from_reward_model(12, 1000)
    clipped = combine([dup, loose])
    assert loose.high < dup.high and clipped["high"] == round(loose.high, 5) and not clipped["conflict"]
    assert clipped["low"] == round(dup.low, 5) and clipped["bound"] == "estimate"
    assert tight.high < dup.low and combine([dup, tight])["conflict"]  # the estimate sits above the bound
    # a bound between the estimate's low end and its point: the interval and the point are clipped to it
    between = from_reward_model(70, 1000)
    assert dup.low < between.high < dup.flip_rate
    cut = combine([dup, between])
    assert (cut["flip_rate"], cut["low"], cut["high"]) == (round(between.high, 5), round(dup.low, 5),
                                                           round(between.high, 5)) and not cut["conflict"]
    # two proper intervals that do not overlap: conflict, and the interval is their union
    copies = from_disagreements(0, 2000, "duplicates")  # a file concatenated twice: agreeing copies
    rm = from_reward_model(2000, 10_000, accuracy=0.9, accuracy_pairs=5000)  # eps 0.125
    c = combine([copies, rm])
    assert c["conflict"] and (c["low"], c["high"]) == (round(copies.low, 5), round(rm.high, 5))
    assert "CONFLICT" in describe_noise(c)
    # only a bound: the tightest, reported as one, with a "≤" in the headline and in the readiness summary
    alone = combine([loose, tight])
    assert (alone["bound"], alone["flip_rate"]) == ("upper", round(tight.flip_rate, 5))
    assert describe_noise(alone).startswith(f"label-flip rate ≤ {tight.flip_rate:.3f}")
    assert readiness({"pairs": 10, "noise": alone})["noise"]["bound"] == "upper"


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


def _refused(tmp_path, rows, match):
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(ConfigError, match=match):
        resolve_label_smoothing(_cfg(tmp_path, data), log=lambda _: None)


def test_auto_refuses_an_estimate_with_too_little_evidence(tmp_path):
    rows = distinct_pairs(300)
    swapped = dict(rows[0], chosen=rows[0]["rejected"], rejected=rows[0]["chosen"])
    # 300 clean pairs and one conflicting repeat: not eps = 0.45, but an interval of [0.11, 0.5] from 1 comparison
    _refused(tmp_path, [*rows, swapped], r"1 of 1 comparisons .* interval \[0\.\d+, 0\.500\], 0\.\d+ wide "
             r"\(auto needs <= 0\.15\)\. About 490 comparisons would do")  # comparisons_needed(0.5)
    _refused(tmp_path, [*rows, rows[0]], r"0 of 1 comparisons .* \[0\.000, 0\.500\]")  # one agreeing repeat
    # every repeat disagrees: no information beyond chance, refused rather than capped
    _refused(tmp_path, rows + [dict(r, chosen=r["rejected"], rejected=r["chosen"]) for r in rows],
             r"300 of 300 comparisons .* low end 1/2\): the labels carry no information beyond chance")
    # 530 of 1000 disagree: a narrow interval [0.478, 0.5] whose low end is above the cap (0.45): refused too
    rows = distinct_pairs(1000)
    _refused(tmp_path, rows + [dict(r, chosen=r["rejected"], rejected=r["chosen"]) if i < 530 else r
                               for i, r in enumerate(rows)], r"530 of 1000 comparisons .*\[0\.478, 0\.500\], low "
             r"end >= 0\.45\): even at its low end a label keeps at most 0\.044 of the true preference's signal")


@pytest.mark.parametrize("rate", [0.05, 0.2, 0.35, 0.5])
def test_comparisons_needed_gives_an_interval_that_narrow_and_not_many_more(rate):
    """The count a refusal asks for: the interval at that many comparisons (at the disagreement share `rate`
    implies) is at most MAX_WIDTH wide, at 0.9 times as many it is wider: enough, and not far more than enough."""
    def width(n: int) -> float:
        e = from_disagreements(round(2 * rate * (1 - rate) * n), n, "duplicates")
        return e.high - e.low

    n = comparisons_needed(rate)
    assert width(n) <= MAX_WIDTH < width(int(0.9 * n)), (n, width(n), width(int(0.9 * n)))
    # the figures docs/noise.md quotes
    assert n == {0.05: 23, 0.2: 120, 0.35: 660, 0.5: 490}[rate]


def test_auto_is_capped_where_robust_dpo_would_divide_by_almost_zero(tmp_path):
    rows = distinct_pairs(1000)
    # 497 of 1000 repeats disagree: eps 0.461 in [0.37, 0.5], narrow enough, its point above the cap
    flipped = [dict(r, chosen=r["rejected"], rejected=r["chosen"]) if i < 497 else r for i, r in enumerate(rows)]
    data = write_jsonl(tmp_path / "d.jsonl", rows + flipped)
    cfg, info = resolve_label_smoothing(_cfg(tmp_path, data), log=lambda _: None)
    assert cfg.label_smoothing == 0.45 and info["capped"] and info["flip_rate"] == round(flip_from_disagreement(
        0.497), 5) > 0.45


def test_auto_trains_robust_with_the_estimate_and_records_it(tiny_models, tmp_path):
    from prefalign.losses.preference import robust
    from prefalign.train.run import train

    # 160 pairs labelled twice: enough comparisons for an interval auto accepts (<= 0.15 wide)
    data = write_jsonl(tmp_path / "d.jsonl", noisy(learnable_pairs(160), 0.2, 2, seed=3))
    expected = compute_stats(data, ReadOptions()).to_json()["noise"]
    cfg = make_config(method="robust", label_smoothing="auto", model=str(tiny_models["llama"]), data=str(data),
                      output=str(tmp_path / "run"), max_steps=2, batch_size=1, kl_every=0, seed=0, learning_rate=1e-3)
    train(cfg, log=lambda _: None, progress=False)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    noise = run["label_noise"]
    eps = noise["label_smoothing"]
    assert eps == expected["flip_rate"] and not noise["capped"] and noise["high"] - noise["low"] <= 0.15
    assert (noise["low"], noise["high"], noise["source"]) == (expected["low"], expected["high"], "duplicates")
    assert noise["sources"][0]["comparisons"] == expected["sources"][0]["comparisons"] >= 150
    # the loss used eps: at step 2 (policy != reference) one pair's logged loss is robust DPO's at its logged
    # margin beta*h with the recorded eps (at step 1 h = 0 and every eps gives log 2)
    step = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
            if "loss" in x and json.loads(x).get("step") == 2][0]
    margin = torch.tensor([step["rewards/margins"]])
    beta = cfg.beta
    zero = torch.zeros(1)
    loss, _ = robust(margin / beta, zero, zero, zero, beta=beta, label_smoothing=eps)
    assert abs(step["rewards/margins"]) > 1e-4 and step["loss"] == pytest.approx(float(loss), rel=1e-4)
    for other in (0.0, eps - 0.05, eps + 0.05):  # a different eps gives a different loss at this margin
        assert step["loss"] != pytest.approx(float(robust(margin / beta, zero, zero, zero, beta=beta,
                                                          label_smoothing=other)[0]), rel=1e-4)


def test_data_stats_with_a_reward_model_and_a_pairwise_judge(tiny_models, tmp_path, capsys, monkeypatch):
    """`data stats --reward-model` (a scorer that knows the truth) counts exactly the flipped labels; with its
    accuracy (1.0) measured on stated pairs the bound becomes the estimate used, and the judge's order
    inconsistency (`--judge`, a tiny untrained causal LM asked in both orders) is listed but never used."""
    from prefalign.cli import main

    rows = noisy(distinct_pairs(60, seed=2), 0.2, 1, seed=5)
    flipped = sum(r["chosen"].startswith(" wrong") for r in rows)
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "truth.py").write_text("def score(prompts, completions):\n"
                                       "    return [float('right' in c) for c in completions]\n")
    scorer = ("--reward-model", f"{tmp_path / 'truth.py'}:score")

    def stats(*extra, code=0):
        monkeypatch.setattr("sys.argv", ["prefalign", "data", "stats", str(data), "--json", *extra])
        try:
            main()
            exit_code = 0
        except SystemExit as e:  # typer exits 0 after a command
            exit_code = e.code or 0
        out = capsys.readouterr()
        assert exit_code == code, out
        if code:
            return out.err + out.out
        return json.loads(out.out)["noise"]

    bound = stats(*scorer)
    assert bound["bound"] == "upper" and bound["sources"][0]["disagreements"] == flipped
    assert bound["flip_rate"] == pytest.approx(flipped / 60, abs=1e-5)
    # an accuracy without the pairs it was measured on: reported as a point, not used; the bound is
    point = stats(*scorer, "--reward-model-accuracy", "1.0")
    assert point["sources"][0]["bound"] == "point" and point["flip_rate"] is None
    assert point["excluded"][0]["source"] == "reward_model"
    exact = stats(*scorer, "--reward-model-accuracy", "1.0", "--reward-model-accuracy-pairs", "60",
                  "--judge", str(tiny_models["llama"]))
    by_source = {s["source"]: s for s in exact["sources"]}
    judged = by_source["order_inconsistency"]
    assert judged["bound"] == "diagnostic" and "flip_rate" not in judged and "share" in judged
    assert by_source["order_inconsistency"]["comparisons"] == 60
    assert (exact["source"], exact["bound"]) == ("reward_model", "estimate")
    assert exact["flip_rate"] == pytest.approx(flipped / 60, abs=1e-5) and exact["low"] <= flipped / 60
    # bad accuracies are errors naming the flag, not tracebacks or silently ignored
    assert "--reward-model-accuracy 0.4: must be in (0.5, 1]" in stats(*scorer, "--reward-model-accuracy", "0.4",
                                                                      code=2)
    assert "--reward-model-accuracy 1.2" in stats(*scorer, "--reward-model-accuracy", "1.2", code=2)
    assert "--reward-model-accuracy-pairs needs --reward-model-accuracy" in stats(
        "--reward-model-accuracy-pairs", "100", code=2)
