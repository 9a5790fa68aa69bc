"""The KL monitor during training measures what `prefalign eval` measures, with the same code: its
last reading equals eval's exact KL of the saved model on the same prompts, seeds and lengths."""

from __future__ import annotations

import json

import pytest

from prefalign.eval.evaluate import EvalConfig, evaluate
from prefalign.train.methods import make_config
from prefalign.train.run import train


def _rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("lora", [False, True])
def test_monitor_equals_eval_on_the_saved_model(lora, tiny_models, pair_file, tmp_path):
    base = str(tiny_models["llama"])
    cfg = make_config(model=base, data=str(pair_file), output=str(tmp_path / "run"), max_steps=8, batch_size=4,
                      learning_rate=2e-2 if lora else 5e-3, lr_schedule="constant", kl_every=4, kl_prompts=6,
                      kl_max_new_tokens=10, lora=lora, seed=3)
    train(cfg, log=lambda _: None, progress=False)
    rows = _rows(tmp_path / "run")
    monitored = [r for r in rows if "kl/policy_ref_seq" in r]
    assert [r["step"] for r in monitored] == [4, 8]
    # the dataset log-ratio is reported under its own name, and is not the KL
    assert "logratio/chosen" in rows[-1] and "logratio/rejected" in rows[-1] and "kl/ref" not in rows[-1]
    ev = evaluate(EvalConfig(model=str(tmp_path / "run" / "final"), reference=base, prompts=str(pair_file),
                             output=str(tmp_path / "eval"), max_prompts=6, max_new_tokens=10, seed=3, batch_size=16),
                  log=lambda _: None, progress=False)
    last = monitored[-1]
    assert last["kl/policy_ref_seq"] > 0.05
    assert last["kl/policy_ref_seq"] == pytest.approx(ev["kl_per_sequence"], rel=1e-3)
    assert last["kl/policy_ref_token"] == pytest.approx(ev["kl_per_token"], rel=1e-3)


def test_monitor_off(tiny_models, pair_file, tmp_path):
    cfg = make_config(model=str(tiny_models["llama"]), data=str(pair_file), output=str(tmp_path / "run"), max_steps=2,
                      batch_size=4, kl_every=0)
    train(cfg, log=lambda _: None, progress=False)
    assert not any("kl/policy_ref_seq" in r for r in _rows(tmp_path / "run"))
