"""One name, one meaning: every key a training run, its summary or an evaluation writes is defined
in docs/metrics.md. Trains every method a couple of steps on a tiny model and evaluates."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import learnable_pairs, unpaired_from, write_jsonl
from prefalign.eval.evaluate import EvalConfig, evaluate
from prefalign.train.methods import METHODS, make_config
from prefalign.train.run import train

DOC = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"
REWARDS = Path(__file__).parent / "fixtures" / "rewards.py"


def documented() -> list[re.Pattern]:
    """The keys in the first column of every table in docs/metrics.md; <name> matches one path part."""
    keys = []
    for line in DOC.read_text().splitlines():
        if line.startswith("| `"):
            keys += re.findall(r"`([^`]+)`", line.split("|")[1])
    return [re.compile("^" + re.escape(k).replace(re.escape("<name>"), "[^/]+") + "$") for k in keys]


def undocumented(keys, patterns) -> set[str]:
    out = set()
    for key in keys:
        inner = [key]
        if key.startswith("eval/"):  # eval/<name> and a named set's eval/<set>/<name>: <name> must be documented
            inner = [key[len("eval/"):], *key[len("eval/"):].split("/", 1)[1:]]
        if not any(p.match(k) for p in patterns for k in inner):
            out.add(key)
    return out


def test_the_doc_parses():
    patterns = documented()
    assert len(patterns) > 60
    assert undocumented(["kl/policy_ref_seq", "eval/rewards/accuracy", "eval/held/rewards/accuracy",
                         "suites/safety/score"], patterns) == set()
    bad = ["kl/ref", "eval/nonsense", "eval/held/nonsense", "eval/a/b/loss", "suites/a/b/score"]
    assert undocumented(bad, patterns) == set(bad)


@pytest.fixture(scope="module")
def emitted(tiny_models, tmp_path_factory) -> dict[str, set[str]]:
    root = tmp_path_factory.mktemp("keys")
    pairs = write_jsonl(root / "pairs.jsonl", learnable_pairs(16))
    kto = write_jsonl(root / "kto.jsonl", unpaired_from(learnable_pairs(16)))
    model = str(tiny_models["llama"])
    runs = []
    for method in [m for m, spec in METHODS.items() if spec.trainer == "offline"]:
        out = root / method
        rpo = {"rpo_alpha": 0.5} if method == "dpo" else {}
        monitor = {} if method == "reward" else {"kl_every": 1, "kl_prompts": 2, "kl_max_new_tokens": 4}
        data = str(kto if method == "kto" else pairs)
        # cdpo: a two-source mixture and a named eval set (eval/held/...)
        mixture = dict(data=[{"path": data, "weight": 1}, {"path": data, "weight": 2}],
                       eval_data={"held": data}) if method == "cdpo" else dict(data=data, eval_data=data)
        train(make_config(method=method, model=model, **mixture, eval_every=2, output=str(out),
                          max_steps=2, batch_size=4, **monitor, **rpo),
              log=lambda _: None, progress=False)
        runs.append(out)
    rl = [m for m, spec in METHODS.items() if spec.trainer == "rl"]
    for method, penalty in zip(rl, ("loss_full", "reward_k1", "loss_k3"), strict=True):
        out = root / method
        prompts = [{"path": str(pairs), "fraction": 0.5}, str(pairs)] if method == "rloo" else str(pairs)
        train(make_config(method=method, model=model, prompts=prompts, reward=f"{REWARDS}:length", output=str(out),
                        max_steps=2, batch_size=2, max_new_tokens=4, kl_every=1, kl_prompts=2, kl_max_new_tokens=4,
                        kl_penalty=penalty), log=lambda _: None, progress=False)
        runs.append(out)
    keys: dict[str, set[str]] = {"metrics.jsonl": set(), "run.json": set(), "eval.json": set()}
    for out in runs:
        for line in (out / "metrics.jsonl").read_text().splitlines():
            keys["metrics.jsonl"] |= set(json.loads(line))
        summary = json.loads((out / "run.json").read_text())
        keys["run.json"] |= set(summary)
    ev = evaluate(EvalConfig(model=str(root / "dpo" / "final"), reference=model, data=str(pairs),
                             judge=f"{REWARDS}:length", suites=["arithmetic", "safety"], output=str(root / "eval"),
                             max_new_tokens=4, max_prompts=4), log=lambda _: None, progress=False)
    keys["eval.json"] = set(ev)
    return keys


@pytest.mark.parametrize("where", ["metrics.jsonl", "run.json", "eval.json"])
def test_every_emitted_key_is_documented(emitted, where):
    assert emitted[where], where
    assert undocumented(emitted[where], documented()) == set()


def test_the_monitor_and_the_renamed_log_ratio_are_emitted(emitted):
    assert {"kl/policy_ref_seq", "kl/policy_ref_token", "logratio/chosen", "ppo/kl_loss"} <= emitted["metrics.jsonl"]
    assert "kl/ref" not in emitted["metrics.jsonl"]
    assert {"eval/held/loss", "eval/loss"} <= emitted["metrics.jsonl"] and "data_sources" in emitted["run.json"]
