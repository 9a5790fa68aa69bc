"""`prefalign audit`: its config, its arithmetic against hand-worked values, the energy reader on a
fake powercap tree, and the shrunk demo end to end (the three files, their documented keys, a verdict
whose every number is in audit.json, the page in a real browser)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from conftest import headless_chromium
from prefalign.config import ConfigError, load_config
from prefalign.runtime.energy import NOT_MEASURABLE, EnergyMeter, read_counters
from prefalign.tasks.audit import AuditConfig, demo_config, hardware, load_prices, run_audit
from prefalign.tasks.audit_verdict import choose, compare, figures, paired, verdict

DOC = Path(__file__).resolve().parent.parent / "docs" / "audit.md"


# ---------------------------------------------------------------- config
def test_unknown_key_names_the_file(tmp_path):
    path = tmp_path / "audit.yaml"
    path.write_text("output: out\nmodel: m\nprompts: p.jsonl\nreward: a:b\nsweeep: {}\n")
    with pytest.raises(ConfigError) as e:
        load_config(AuditConfig, path)
    assert str(path) in str(e.value) and "sweeep" in str(e.value)


def test_config_refusals(tmp_path):
    base = {"output": "out", "model": "m", "prompts": "p.jsonl"}
    with pytest.raises(ConfigError, match="give `reward`"):
        load_config(AuditConfig, base=base)
    with pytest.raises(ConfigError, match="need a judge"):
        load_config(AuditConfig, base={**base, "data": "pairs.jsonl"})
    with pytest.raises(ConfigError, match="compares dpo"):
        load_config(AuditConfig, base={**base, "reward": "a:b", "arms": ["ppo", "rloo"]})
    # a setting the method's own config refuses is caught before anything runs
    with pytest.raises(ConfigError, match="ppo"):
        load_config(AuditConfig, base={**base, "reward": "a:b", "train": {"ppo": {"clip_rang": 0.1}}})
    with pytest.raises(ConfigError, match="sweep.seed 0 is one of the test seeds"):  # test runs train afresh
        load_config(AuditConfig, base={**base, "reward": "a:b", "sweep": {"seed": 0}})
    ok = load_config(AuditConfig, base={**base, "data": "pairs.jsonl", "judge": "a:b"})
    assert ok.reward is None and ok.seeds == [0, 1, 2]


def test_the_budget_reaches_every_training_run_and_each_arm_is_charged_what_it_needs():
    from prefalign.tasks.audit import Inputs, needs, run_settings, stage_settings

    cfg = load_config(AuditConfig, base={"output": "out", "model": "m", "prompts": "p.jsonl", "reward": "a:b",
                                         "budget": {"steps": 7, "wall_seconds": 600}})
    for arm in ("dpo", "dpo_iterative", "ppo", "rloo"):
        got = run_settings(cfg, arm, 0.1, "rm")
        assert (got["max_steps"], got["max_seconds"], "reward" in got) == (7, 600, arm in ("ppo", "rloo")), arm
    for kind in ("sft", "reward_model"):
        assert (stage_settings(cfg, kind)["max_steps"], stage_settings(cfg, kind)["max_seconds"]) == (7, 600)
    sft, pairs, rm = {"stage": "sft"}, {"stage": "pairs"}, {"stage": "reward-model"}
    learned = Inputs(Path("base"), Path("pairs.jsonl"), "rm", sft, pairs, rm)
    given = Inputs(Path("base"), Path("pairs.jsonl"), "a:b", sft, pairs, None)
    assert needs("dpo", learned) == [pairs] and needs("dpo_iterative", learned) == [pairs, rm]  # rm labels rounds
    assert needs("ppo", learned) == [pairs, rm] and needs("rloo", given) == []  # a given reward costs nothing here



def test_iterative_round_one_reuses_the_dpo_run_only_when_it_is_the_same_training():
    from prefalign.tasks.audit import same_training

    base = {"output": "out", "model": "m", "prompts": "p.jsonl", "reward": "a:b",
            "arms": ["dpo", "dpo_iterative", "ppo"]}
    assert same_training(load_config(AuditConfig, base=base), 0.1)  # dpo_iterative takes train.dpo's settings
    own = load_config(AuditConfig, base={**base, "train": {"dpo": {"learning_rate": 1e-3, "max_steps": 4},
                                                           "dpo_iterative": {"learning_rate": 2e-3, "max_steps": 4},
                                                           "ppo": {"max_steps": 4}}})
    assert not same_training(own, 0.1)  # another learning rate: another training


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where no GPU is present")
def test_cuda_without_a_gpu_is_refused_not_priced_as_cpu():
    cfg = AuditConfig.model_construct(device="cuda", prices=None, hardware="auto")
    with pytest.raises(ConfigError, match="no CUDA GPU is available"):
        hardware(cfg)
    assert hardware(AuditConfig.model_construct(device="cpu", prices=None, hardware="auto"))["unit"] == "cpu-core-hour"


def test_price_table(tmp_path):
    table = load_prices(None)
    for key in ("H100", "A100", "L4", "cpu"):
        assert table[key]["usd_per_hour"] > 0 and table[key]["source"].startswith("https://") and table[key]["date"]
    bad = tmp_path / "prices.yaml"
    bad.write_text("H100: {unit: gpu-hour}\n")
    with pytest.raises(ConfigError, match="usd_per_hour"):
        load_prices(str(bad))
    bad.write_text("- H100\n- A100\n")
    with pytest.raises(ConfigError, match=f"{re.escape(str(bad))}: a mapping of hardware name"):
        load_prices(str(bad))
    with pytest.raises(ConfigError, match="prices: .*missing.yaml: No such file"):
        load_prices(str(tmp_path / "missing.yaml"))


def test_bad_prompt_files_are_named_with_file_line_and_field(tmp_path):
    from prefalign.errors import DataError
    from prefalign.tasks.audit import _write_prompts

    good = tmp_path / "p.jsonl"
    good.write_text("".join(json.dumps({"prompt": f"prompt {i}"}) + "\n" for i in range(8)))
    bad = tmp_path / "val.jsonl"
    bad.write_text('{"prompt": "a"}\n{"text": "no prompt"}\n{"prompt": "b"}\n')
    cfg = AuditConfig.model_construct(prompts=str(good), validation_prompts=str(bad), test_prompts=None,
                                      eval_prompts=2, train_prompts=None, retention_text=None)
    with pytest.raises(DataError, match=rf"validation_prompts: {re.escape(str(bad))}:2.*prompt.*\(1 bad row\)"):
        _write_prompts(cfg, tmp_path / "out")
    few = tmp_path / "few.jsonl"
    few.write_text('{"prompt": "only one"}\n')
    with pytest.raises(ConfigError, match=rf"test_prompts: {re.escape(str(few))}: too few prompts for the test set"):
        _write_prompts(cfg.model_copy(update={"validation_prompts": None, "test_prompts": str(few)}), tmp_path / "o")
    with pytest.raises(ConfigError, match="test_prompts: [^:]*nowhere.jsonl: no such file"):
        _write_prompts(cfg.model_copy(update={"validation_prompts": None,
                                              "test_prompts": str(tmp_path / "nowhere.jsonl")}), tmp_path / "out")
    assert json.loads(_write_prompts(cfg.model_copy(update={"validation_prompts": None}), tmp_path / "out")
                      ["validation"].read_text().splitlines()[0]) == {"prompt": "prompt 2"}


# ---------------------------------------------------------------- arithmetic, by hand
def test_paired_ratio_and_difference_by_hand():
    # ratios 1/2 and 2/2: logs -0.693147 and 0, mean -0.346574 (geometric mean exp = 0.707107), sd 0.490129,
    # t(0.975, 1) = 12.706, half = 12.706 * 0.490129 / sqrt(2) = 4.403573: exp(-4.750147), exp(4.056999)
    r = paired({0: 1.0, 1: 2.0}, {0: 2.0, 1: 2.0}, "ratio")
    assert r["per_seed"] == [0.5, 1.0] and r["mean"] == pytest.approx(0.707107, abs=1e-6)
    assert r["ci95"] == pytest.approx([0.0086505, 57.8001], rel=1e-4)
    # differences -1, 0, 1: mean 0, sd 1, t(0.975, 2) = 4.303, half = 4.303 / sqrt(3) = 2.484338
    d = paired({0: 1.0, 1: 2.0, 2: 3.0}, {0: 2.0, 1: 2.0, 2: 2.0}, "difference")
    assert d["mean"] == 0 and d["ci95"] == pytest.approx([-2.484338, 2.484338], abs=1e-6)
    assert paired({0: 1.0, 1: 1.0}, {0: 0.5, 1: -0.1}, "ratio") is None  # a ratio to a reward <= 0 means nothing
    assert paired({0: -0.2, 1: 1.0}, {0: 0.5, 1: 0.6}, "ratio", centred=True) is None  # nor of one: no log
    # rewards 0.05 and 0.5: mean 0.275, sd 0.318198, half 12.706 * 0.318198 / sqrt(2) = 2.8589: the interval
    # reaches 0, so a ratio (20 and 2) would swing without bound: none is given
    assert paired({0: 1.0, 1: 1.0}, {0: 0.05, 1: 0.5}, "ratio", centred=True) is None
    assert paired({0: 1.0, 1: 1.0}, {0: 0.05, 1: 0.5}, "ratio")["per_seed"] == [20.0, 2.0]  # a cost: always
    assert paired({0: 1.0, 1: 1.0}, {0: 0.5, 1: 0.52}, "ratio", centred=True)["per_seed"] == [2.0, 1.0 / 0.52]
    assert paired({0: 1.0}, {1: 1.0}, "ratio") is None  # no seed in common


def test_cost_ratio_interval_stays_positive():
    """Ratios 1.45, 1.54, 0.5: a t-interval on the ratios themselves is [-0.268, 2.595] (a cost ratio below 0).
    On the logs (0.371564, 0.431782, -0.693147): mean 0.036733, sd 0.632811, half 4.303 * 0.632811 / sqrt(3) =
    1.572118, so exp: geometric mean 1.037416, interval [0.215373, 4.997064], which holds 1."""
    r = paired({0: 1.45, 1: 1.54, 2: 0.5}, {0: 1.0, 1: 1.0, 2: 1.0}, "ratio")
    assert r["mean"] == pytest.approx(1.037416, abs=1e-6)
    assert r["ci95"] == pytest.approx([0.215373, 4.997064], abs=1e-5) and r["ci95"][0] > 0
    f = figures("DPO", "PPO", {"device_hours_ratio": r}, None, 1.0, None, 3)
    assert (f["device_hours_pct"], f["device_hours_pct_ci95"]) == (103.7, [21.5, 499.7])
    assert f["device_hours_pct_direction"] == "not detectably different"
    assert "103.7% [21.5, 499.7] of its device-hours (not detectably different)" in verdict(f)[0]


def test_choose_on_validation_by_hand():
    sweep = [{"arm": "dpo", "setting": 0.1, "reward_mean": 0.5, "kl_per_sequence": 9.0},
             {"arm": "dpo", "setting": 0.5, "reward_mean": 0.3, "kl_per_sequence": 2.0},
             {"arm": "ppo", "setting": 0.03, "reward_mean": 0.4, "kl_per_sequence": 4.0},
             {"arm": "ppo", "setting": 0.1, "reward_mean": 0.2, "kl_per_sequence": 1.0}]
    c = choose(sweep)
    # default K: the largest of the arms' smallest KLs = max(2.0, 1.0) = 2.0
    assert c["matched_kl"] == 2.0
    assert c["arms"]["dpo"] == {**c["arms"]["dpo"], "best": 0.1, "matched": 0.5}
    assert c["arms"]["ppo"]["best"] == 0.03 and c["arms"]["ppo"]["matched"] == 0.1
    c = choose(sweep, matched_kl=4.0)
    assert c["arms"]["ppo"]["matched"] == 0.03 and c["arms"]["dpo"]["matched"] == 0.5
    assert choose(sweep, matched_kl=0.5)["arms"]["ppo"]["matched"] is None


def _rows(reward, hours, peak, kl=1.0):
    """Per-seed test rows of one arm (no energy measured; money not proportional to device-hours, so that
    each cost has its own ratio)."""
    return {s: {"reward_mean": r, "win_rate": 0.5, "kl_per_sequence": kl, "device_hours": h, "peak_memory_bytes": p,
                "usd": h * 2.0 + 0.5, "energy_joules": None}
            for s, (r, h, p) in enumerate(zip(reward, hours, peak, strict=True))}


def _numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?", text)]


def _leaves(obj) -> set[float]:
    if isinstance(obj, dict):
        return set().union(*map(_leaves, obj.values())) if obj else set()
    if isinstance(obj, list):
        return set().union(*map(_leaves, obj)) if obj else set()
    return {float(obj)} if isinstance(obj, int | float) and not isinstance(obj, bool) else set()


def _ci_text(ci) -> str:
    return "" if ci is None else f" [{ci[0]}, {ci[1]}]"


def assert_labelled(f: dict, text: str) -> int:
    """Every figure of the verdict is printed next to its own label (written out here, not taken from the
    code, so a label moved to another figure fails): '<figure>% [lo, hi] <label> (<direction>)'."""
    a, b = f["a"], f["b"]
    labels = {"reward_pct": f"of {b}'s best reward", "device_hours_pct": "of its device-hours",
              "peak_memory_pct": "of its peak memory", "usd_pct": "of its cost in money",
              "energy_pct": "of its measured energy"}
    if f["one_price"]:  # money's ratio is device-hours': said once
        labels["device_hours_pct"] += ", so of its cost in money at one price per device-hour"
        assert "of its cost in money (" not in text
        del labels["usd_pct"]
    checked = 0
    for key, label in labels.items():
        if f[key] is None:
            assert label not in text, label
            continue
        want = f"{f[key]}%{_ci_text(f[key + '_ci95'])} {label} ({f[key + '_direction']})"
        assert want in text, (want, text)
        checked += 1
    for key in ("kl_difference", "matched_kl_difference"):
        if f.get(key) is not None:
            want = (f"{a}'s test KL to the base minus {b}'s was {f[key]}{_ci_text(f[key + '_ci95'])} nats per "
                    f"sequence ({f[key + '_direction']})")
            assert want in text, (want, text)
            checked += 1
    if f.get("matched_direction") is not None:
        assert f"(difference{_ci_text(f['matched_difference_ci95'])}; test KL {f['matched_kl_a']} vs " \
               f"{f['matched_kl_b']};" in text
        assert f"validation KL ≤ {f['matched_kl']}:" in text
        checked += 1
    return checked


def test_verdict_numbers_by_hand_and_traceable():
    dpo = _rows([0.40, 0.44, 0.42], [1.0, 1.0, 1.0], [100, 100, 100], kl=3.0)
    ppo = _rows([0.50, 0.55, 0.60], [2.0, 4.0, 4.0], [200, 200, 100], kl=2.0)
    f = figures("DPO", "PPO", compare(dpo, ppo), compare(dpo, ppo), 2.5, {"a": 3.0, "b": 2.0}, 3)
    # geometric means: reward ratios .8, .8, .7: logs -0.223144, -0.223144, -0.356675, mean -0.267654
    # -> 76.5%; device-hours 1/2, 1/4, 1/4: logs mean -1.155245 -> 31.5%, sd 0.400189,
    # half 4.303 * 0.400189 / sqrt(3) = 0.994204 -> [11.7, 85.1] (below 100: "less");
    # peak .5, .5, 1: mean log -0.462098 -> 63.0%, sd 0.400189 -> [23.3, 170.3] (holds 100: no direction)
    assert (f["device_hours_pct"], f["device_hours_pct_ci95"]) == (31.5, [11.7, 85.1])
    assert (f["peak_memory_pct"], f["peak_memory_pct_ci95"]) == (63.0, [23.3, 170.3])
    assert f["device_hours_pct_direction"] == "less"
    assert f["peak_memory_pct_direction"] == "not detectably different"
    assert f["reward_pct"] == 76.5 and f["reward_pct_direction"] == "less"
    assert f["energy_pct"] is None  # not measured: no ratio, no words
    # matched differences -.10, -.11, -.18: mean -0.13, sd 0.043589, half 4.303 * 0.043589 / sqrt(3) = 0.108288
    assert f["matched_gap"] == 0.13 and f["matched_difference_ci95"] == [-0.238, -0.022]
    assert f["kl_difference"] == 1.0 and f["kl_difference_direction"] == "higher"
    text = " ".join(verdict(f))
    assert assert_labelled(f, text) == 7
    assert "63.0% [23.3, 170.3] of its peak memory (not detectably different)" in text
    assert "DPO's reward was lower than PPO's by 0.13" in text and "energy" not in text
    # the test KL of DPO's matched setting (3.0) is above K = 2.5: the sentence says the KLs are not matched
    assert "DPO's KL exceeded 2.5, so the KLs are not matched" in text and "PPO's KL exceeded" not in text
    assert set(_numbers(text)) <= _leaves(f), set(_numbers(text)) - _leaves(f)
    # the figures flipped, the words flip
    g = figures("PPO", "DPO", compare(ppo, dpo), compare(ppo, dpo), 2.5, {"a": 2.0, "b": 3.0}, 3)
    flipped = " ".join(verdict(g))
    assert "PPO's reward was higher than DPO's by 0.13" in flipped and g["reward_pct"] > 100
    assert g["device_hours_pct_direction"] == "more" and assert_labelled(g, flipped) == 7
    assert set(_numbers(flipped)) <= _leaves(g)
    # an interval across 0: no side is named
    h = figures("DPO", "PPO", compare(dpo, ppo), compare(_rows([0.5, 0.3, 0.6], [1] * 3, [1] * 3), ppo), 2.5,
                {"a": 1.0, "b": 2.0}, 3)
    assert "not detectably different from PPO's" in " ".join(verdict(h)) and "exceeded" not in " ".join(verdict(h))
    # one price per device-hour: money's ratio is device-hours', said once
    one = {s: {**r, "usd": r["device_hours"] * 2.0} for s, r in dpo.items()}
    other = {s: {**r, "usd": r["device_hours"] * 2.0} for s, r in ppo.items()}
    o = figures("DPO", "PPO", compare(one, other), None, 2.5, None, 3)
    said = " ".join(verdict(o))
    assert o["one_price"] and not f["one_price"] and (o["usd_pct"], o["usd_pct_ci95"]) == (31.5, [11.7, 85.1])
    assert "31.5% [11.7, 85.1] of its device-hours, so of its cost in money at one price per device-hour (less)" \
        in said and said.count("31.5%") == 1 and assert_labelled(o, said) == 4


# ---------------------------------------------------------------- energy
def _rapl(root: Path, name: str, uj: int, wrap: int = 262143328850) -> None:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "energy_uj").write_text(f"{uj}\n")
    (d / "max_energy_range_uj").write_text(f"{wrap}\n")


def test_rapl_from_a_fake_powercap_tree(tmp_path):
    _rapl(tmp_path, "intel-rapl:0", 5_000_000)
    _rapl(tmp_path, "intel-rapl:0:0", 1_000_000)  # a core subdomain: inside package 0, not added again
    _rapl(tmp_path, "intel-rapl:1", 262143328850 - 1_000_000)  # about to wrap
    meter = EnergyMeter(tmp_path, gpus=False).start()
    _rapl(tmp_path, "intel-rapl:0", 17_000_000)  # +12 J
    _rapl(tmp_path, "intel-rapl:0:0", 9_000_000)
    _rapl(tmp_path, "intel-rapl:1", 2_500_000)  # wrapped: +1 J to the top, +2.5 J after
    got = meter.stop()
    assert got["status"] == "measured" and got["sources"] == ["rapl"]
    assert got["counters"] == ["rapl:intel-rapl:0", "rapl:intel-rapl:1"]
    assert got["joules"] == pytest.approx(12.0 + 3.5, abs=1e-9)


def test_a_wrap_with_an_unreadable_range_is_not_measured(tmp_path):
    """A RAPL counter that went down while its max_energy_range_uj cannot be read: no wrap to add, so the
    stage's energy is not measurable (with why), never a negative difference reported as measured."""
    _rapl(tmp_path, "intel-rapl:0", 5_000_000)
    _rapl(tmp_path, "intel-rapl:1", 9_000_000)
    (tmp_path / "intel-rapl:1" / "max_energy_range_uj").unlink()
    (tmp_path / "intel-rapl:1" / "max_energy_range_uj").mkdir()  # unreadable as a number
    rising = EnergyMeter(tmp_path, gpus=False).start()
    _rapl(tmp_path, "intel-rapl:0", 6_000_000)
    (tmp_path / "intel-rapl:1" / "energy_uj").write_text("9500000\n")
    assert rising.stop()["joules"] == pytest.approx(1.5, abs=1e-9)  # no wrap: the range is not needed
    meter = EnergyMeter(tmp_path, gpus=False).start()
    _rapl(tmp_path, "intel-rapl:0", 7_000_000)
    (tmp_path / "intel-rapl:1" / "energy_uj").write_text("1000000\n")  # wrapped, by how much unknown
    got = meter.stop()
    assert got["joules"] is None and got["status"].startswith(NOT_MEASURABLE), got
    assert "rapl:intel-rapl:1 went down" in got["status"] and "max_energy_range_uj" in got["status"]


def test_energy_not_measurable_says_why(tmp_path):
    got = EnergyMeter(tmp_path / "none", gpus=False).start().stop()
    assert got["joules"] is None and got["status"].startswith(NOT_MEASURABLE) and "does not exist" in got["status"]
    (tmp_path / "intel-rapl:0" / "energy_uj").mkdir(parents=True)  # unreadable as a number
    r = read_counters(tmp_path, gpus=False)
    assert r.joules == {} and "energy_uj" in r.reasons[0]


# ---------------------------------------------------------------- the shrunk demo, end to end
@pytest.fixture(scope="module")
def audit(tmp_path_factory):
    """The shrunk demo, with an SFT stage (the shipped model is already tuned on IMDb; one step on a few
    demonstrations checks that every arm starts from the SFT model and every KL is to it)."""
    out = tmp_path_factory.mktemp("audit") / "out"
    base = demo_config(str(out), quick=True)
    prompts = [json.loads(x)["prompt"] for x in Path(base["prompts"]).read_text().splitlines()]
    sft = out.parent / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": p, "completion": " a wonderful film."}) + "\n" for p in prompts))
    base = {**base, "sft_data": str(sft), "train": {**base["train"], "sft": {"max_steps": 1, "batch_size": 4}},
            "arms": ["dpo", "dpo_iterative", "ppo"], "sweep": {**base["sweep"], "dpo_iterative_beta": [0.1]}}
    run_audit(load_config(AuditConfig, base=base), log=lambda m: None, progress=False)
    return out


def documented() -> set[str]:
    keys = set()
    for line in DOC.read_text().splitlines():
        if line.startswith("| `"):
            keys |= set(re.findall(r"`([^`]+)`", line.split("|")[1]))
    return keys


def test_audit_writes_the_three_files_with_documented_keys(audit):
    s = json.loads((audit / "audit.json").read_text())
    keys = documented()
    used = set(s) | {f"hardware.{k}" for k in s["hardware"]} | {f"stages[].{k}" for k in s["stages"][0]}
    used |= {f"sweep[].{k}" for k in s["sweep"][0]} | {f"test[].{k}" for k in s["test"][0]}
    used |= {f"arms.<arm>.<choice>.{k}" for k in s["arms"]["dpo"]["best"]} | {f"energy.{k}" for k in s["energy"]}
    used |= {f"verdict.figures.<pair>.{k}" for k in s["verdict"]["figures"]["dpo vs ppo"]}
    used |= {f"comparisons.<pair>.<choice>.{k}" for k in s["comparisons"]["dpo vs ppo"]["best"]}
    assert used - keys == set()
    # both seeds of each chosen setting on the test split; every stage costed
    assert {r["seed"] for r in s["test"]} == {0, 1} and {r["arm"] for r in s["test"]} == {"dpo", "dpo_iterative", "ppo"}
    stages = {st["stage"] for st in s["stages"]}
    assert {"pairs", "evaluate validation", "evaluate test", "train ppo kl_coef=0.1"} <= stages
    assert all(st["seconds"] > 0 and st["peak_memory_bytes"] > 0 for st in s["stages"])
    # CPU time of the stage's own process, and the RSS it inherited from the forkserver (inside its peak)
    assert all(st["cpu_seconds"] > 0 and 0 < st["baseline_rss_bytes"] <= st["peak_rss_bytes"] for st in s["stages"])
    # iterative DPO: round 1 is the DPO arm's run at the same beta (the same training, not run twice), round 2
    # trains on pairs sampled from it, from it; its end-to-end cost has every round; it is compared with PPO
    it = "dpo_iterative beta=0.1"
    for seed in (sweep_seed := s["config"]["sweep"]["seed"], 0, 1):
        got = [st["stage"] for st in s["stages"] if st["seed"] == seed and it in st["stage"]]
        assert got == [f"pairs {it} round 2", f"train {it} round 2"], got
        run = audit / f"seed{seed}" / "dpo_iterative-beta0.1"
        assert Path(yaml.safe_load((run / "round2" / "config.yaml").read_text())["model"]) == \
            audit / f"seed{seed}" / "dpo-beta0.1" / "final"
        assert not (run / "round1").exists()
    assert {tuple(r["stages"]) for r in s["test"] if r["arm"] == "dpo_iterative"} == \
        {("sft", "pairs", "train dpo beta=0.1", f"pairs {it} round 2", f"train {it} round 2")}
    assert set(s["comparisons"]) == {"dpo vs ppo", "dpo_iterative vs ppo"}
    assert s["verdict"]["figures"]["dpo_iterative vs ppo"]["a"] == "iterative DPO"
    # K from the default arms only (the smallest KL at which each has a setting): the optional arm moves nothing
    kls = {a: min(r["kl_per_sequence"] for r in s["sweep"] if r["arm"] == a) for a in ("dpo", "dpo_iterative", "ppo")}
    assert s["chosen"]["matched_kl"] == max(kls["dpo"], kls["ppo"]), kls
    # the sweep has its own seed: no test row comes from a sweep run
    assert {r["seed"] for r in s["sweep"]} == {sweep_seed} and sweep_seed not in {r["seed"] for r in s["test"]}
    assert sum(st["stage"] == "train ppo kl_coef=0.1" for st in s["stages"]) == 3  # sweep + 2 fresh test runs
    # the SFT stage, once per seed, is where both arms start: in both end-to-end costs, the base of every KL
    assert [(st["seed"], st["arm"]) for st in s["stages"] if st["stage"] == "sft"] == \
        [(sweep_seed, "shared"), (0, "shared"), (1, "shared")]
    assert all(r["stages"][0] == "sft" for r in s["test"])
    for r in s["test"]:
        ev = json.loads((audit / f"seed{r['seed']}" / "eval-test" / f"{r['arm']}-{r['setting_name']}{r['setting']}"
                         / "eval.json").read_text())
        assert Path(ev["reference"]) == audit / f"seed{r['seed']}" / "sft" / "final", ev["reference"]
        first = audit / f"seed{r['seed']}" / f"{r['arm']}-{r['setting_name']}{r['setting']}"
        if r["arm"] == "dpo_iterative":  # round 1 is the DPO arm's run; round 2 starts from it
            first = first.parent / "dpo-beta0.1"
        run = yaml.safe_load((first / "config.yaml").read_text())
        assert Path(run["model"]) == audit / f"seed{r['seed']}" / "sft" / "final"
    trained = [st for st in s["stages"] if st["stage"].startswith("train")]
    assert all(st["tokens_trained"] > 0 and st["tokens_sampled"] is None for st in trained)
    assert all(st["tokens_sampled"] > 0 for st in s["stages"] if st["stage"] == "pairs")
    assert {st["model_holds"] for st in trained if st["arm"] == "ppo"} == \
        {"reference: adapter-disabled base, critic: value head, reward: function"}
    assert all(st["energy_joules"] is not None or st["energy"].startswith(NOT_MEASURABLE) for st in s["stages"])
    assert s["hardware"]["price_key"] == "cpu" and s["test"][0]["usd"] > 0
    # the verdict: every number in it is a figure audit.json keeps
    text = s["verdict"]["text"]
    assert text and set(_numbers(text)) <= _leaves(s["verdict"]["figures"])
    assert assert_labelled(s["verdict"]["figures"]["dpo vs ppo"], text) >= 4  # costs, KL differences, matched
    md = (audit / "audit.md").read_text()
    assert text.split(" (")[0] in md and "![reward vs KL](frontier.png)" in md
    assert "not measurable on this machine" in md or "measured" in md


def test_audit_html_is_self_contained_and_opens(audit, tmp_path):
    page = (audit / "audit.html").read_text()
    s = json.loads((audit / "audit.json").read_text())
    assert "data:image/png;base64," in page and "src='http" not in page and "<script" not in page
    assert s["verdict"]["sentences"][0].split(" (")[0].replace("'", "&#x27;") in page
    browser = headless_chromium(tmp_path / "profile")
    try:
        browser.get((audit / "audit.html").resolve().as_uri())
        images = browser.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth]);")
        assert images and all(ok and w > 100 for _, ok, w in images), images
        tables = browser.execute_script("return document.querySelectorAll('table').length;")
        assert tables == 5
        assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
    finally:
        browser.quit()


def test_readme_quotes_the_committed_demo_verdict():
    """The README's audit quote is the committed demo's first two verdict sentences (DPO vs PPO), word for word."""
    root = Path(__file__).resolve().parents[1]
    verdict = json.loads((root / "benchmarks/results/audit-demo-cpu-2core/audit.json").read_text())["verdict"]
    readme = (root / "README.md").read_text()
    quoted = re.search(r"<!-- audit:begin -->\n> (.*?)\n<!-- audit:end -->", readme, re.S).group(1)
    assert quoted == " ".join(verdict["sentences"][:2])
    assert quoted in verdict["text"]
