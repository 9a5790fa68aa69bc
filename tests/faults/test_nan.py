"""NaN and Inf where a run meets them (docs/reliability.md, "NaN, Inf and out of memory"): a step's loss,
a gradient after backward, RL rewards and reference log-probs (under each reference: precompute, a
frozen copy, the LoRA adapter switched off), poisoned through the fail points (prefalign/faults.py) in
every method of the registry.

One fault (`nan@loss#2`): step 2 is skipped, said in the log, on record (its metrics.jsonl row although
log_every would skip it, skipped_steps there and in run.json) and changes nothing: its checkpoint equals
the one before it, weights and AdamW state, every tensor finite, and the run goes on to max_steps.
Every hit from step 2 on (`nan@loss#2+`): max_bad_steps (2) of them in a row stop the run at step 3 with
a TrainingError naming the cause, that step's row is the last on record, no final/ is written, and every
committed checkpoint is finite and resumes to a finished run once the fault is gone.

`make test` runs each method once (each site and each reference strategy at least once, NaN and Inf
both); `make faults` the whole method x site x reference x nan/inf matrix."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from faultkit import sample, tally
from safetensors.torch import load_file

from conftest import learnable_pairs, unpaired_from, write_jsonl
from prefalign import faults
from prefalign.api import train
from prefalign.errors import TrainingError
from prefalign.train.checkpoint_state import read_state
from prefalign.train.methods import METHODS

KIND = "NaN/Inf injected"
REWARDS = Path(__file__).parents[1] / "fixtures" / "rewards.py"
RL = [m for m, s in METHODS.items() if s.trainer == "rl"]
# what the log and the TrainingError say for each poisoned value; offline, a poisoned reference
# log-prob reaches the guard as the loss it makes non-finite
CAUSE = {"loss": "non-finite loss", "grad": "non-finite gradient", "reward": "non-finite rewards",
         "ref_logps": "non-finite loss"}
RL_CAUSE = {**CAUSE, "ref_logps": "non-finite reference log-probs"}


def _matrix() -> list[tuple[str, str, str, str]]:
    """(method, poisoned value, nan|inf, reference) for every method of the registry."""
    cases = []
    for name, spec in METHODS.items():
        sites = [("loss", "auto"), ("grad", "auto")]
        if spec.reference:  # reference log-probs come from each strategy the trainer has
            strategies = ["copy", "adapter"] if spec.trainer == "rl" else ["precompute", "copy", "adapter"]
            sites += [("ref_logps", s) for s in strategies]
        if spec.trainer == "rl":
            sites.append(("reward", "auto"))
        cases += [(name, site, action, ref) for site, ref in sites for action in ("nan", "inf")]
    return cases


# `make test`: every method once, so every site, every reference strategy, NaN and Inf each come up
COVER = [("dpo", "ref_logps", "nan", "precompute"), ("cdpo", "loss", "inf", "auto"), ("robust", "grad", "nan", "auto"),
         ("ipo", "ref_logps", "inf", "adapter"), ("hinge", "loss", "nan", "auto"), ("simpo", "grad", "inf", "auto"),
         ("orpo", "loss", "nan", "auto"), ("kto", "ref_logps", "nan", "copy"), ("sft", "grad", "nan", "auto"),
         ("reward", "loss", "inf", "auto"), ("ppo", "reward", "nan", "auto"), ("rloo", "ref_logps", "inf", "copy"),
         ("grpo", "loss", "nan", "auto")]
STOP_COVER = [("kto", "loss", "inf", "auto"), ("sft", "grad", "nan", "auto"), ("grpo", "reward", "inf", "auto"),
              ("ppo", "ref_logps", "nan", "adapter")]
MATRIX = _matrix()
assert set(COVER) <= set(MATRIX) and set(STOP_COVER) <= set(MATRIX)
assert {c[0] for c in COVER} == set(METHODS), "a method of the registry is not in the make-test sample"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("nan-data")
    return {"pairs": write_jsonl(root / "pairs.jsonl", learnable_pairs()),
            "kto": write_jsonl(root / "kto.jsonl", unpaired_from(learnable_pairs()))}


def _config(method: str, ref: str, model, data, out: Path, **kw) -> dict:
    cfg = dict(method=method, model=str(model), output=str(out), batch_size=4, learning_rate=1e-3, kl_every=0,
               save_every=1, keep_checkpoints=10, log_every=2, report_to=["none"], seed=0)
    if ref == "adapter":
        cfg["lora"] = True
    if ref != "auto":
        cfg["reference"] = ref
    if method in RL:  # one update per step: a step is skipped or applied whole
        k = 1 if method == "ppo" else 2
        cfg.update(prompts=str(data["pairs"]), reward=f"{REWARDS}:length", batch_size=2, samples_per_prompt=k,
                   max_new_tokens=4, ppo_epochs=1, num_minibatches=1, lr_schedule="constant")
    else:
        cfg["data"] = str(data["kto" if method == "kto" else "pairs"])
    return {**cfg, **kw}


def _said(text: str) -> str:
    """A guard's words up to the `;`, without the count of bad rewards: "step 2: non-finite rewards"."""
    return re.sub(r"\d+ non-finite rewards", "non-finite rewards", text.split(";")[0])


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _checkpoint(out: Path, step: int) -> tuple[dict, dict]:
    """(trainable weights, AdamW state by parameter) of checkpoints/step-N, loaded as a resume would."""
    folder = out / "checkpoints" / f"step-{step}"
    state = read_state(folder, json.loads((folder / "state.json").read_text()))
    return load_file(str(folder / "trainable.safetensors")), state["optimizer"]["state"]


def _tensors(weights: dict, adam: dict) -> list[torch.Tensor]:
    return list(weights.values()) + [v for s in adam.values() for v in s.values() if torch.is_tensor(v)]


def _finite(weights: dict, adam: dict) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in _tensors(weights, adam))


def _same(a: tuple[dict, dict], b: tuple[dict, dict]) -> bool:
    return a[0].keys() == b[0].keys() and a[1].keys() == b[1].keys() and all(
        torch.equal(x, y) for x, y in zip(_tensors(*a), _tensors(*b), strict=True))


def _final_finite(out: Path) -> bool:
    files = list((out / "final").glob("*.safetensors"))
    return bool(files) and all(bool(torch.isfinite(t).all()) for f in files for t in load_file(str(f)).values())


def _id(case) -> str:
    return "-".join(case)


@pytest.mark.parametrize("case", COVER + sample([c for c in MATRIX if c not in COVER], 0), ids=_id)
def test_one_poisoned_step_is_skipped_and_changes_nothing(case, tiny_models, data, tmp_path, monkeypatch):
    method, site, action, ref = case
    out, logs = tmp_path / "run", []
    monkeypatch.setenv(faults.ENV, f"{action}@{site}#2")  # one hit a step: the 2nd is step 2's
    outcome, error = {}, None
    try:
        train(_config(method, ref, tiny_models["llama"], data, out, max_steps=3, log_every=3), log=logs.append,
              progress=False, card=False)
        rows, summary = _rows(out), json.loads((out / "run.json").read_text())
        ckpt = {s: _checkpoint(out, s) for s in (1, 2, 3)}
        outcome = dict(
            said=[x for x in logs if x.startswith("step ") and "skipped (1 in a row)" in x],
            recorded=[(r["step"], r["skipped_steps"]) for r in rows],  # log_every 3: step 2 only as skipped
            summary=(summary["steps"], summary["stopped"], summary["skipped_steps"]),
            unchanged=_same(ckpt[1], ckpt[2]), moved_on=not _same(ckpt[2], ckpt[3]),
            finite=all(_finite(*c) for c in ckpt.values()) and _final_finite(out))
    except Exception as e:  # counted as lost below, then raised
        error = e
    expected = dict(said=[f"step 2: {(RL_CAUSE if method in RL else CAUSE)[site]}"], recorded=[(2, 1), (3, 1)],
                    summary=(3, "max_steps", 1), unchanged=True, moved_on=True, finite=True)
    said = [_said(x) for x in outcome.get("said", [])]
    ok = error is None and {**outcome, "said": said} == expected
    tally(KIND, survived=ok, lost=0 if ok else 1, detail=f"{action}@{site}#2 {method} reference={ref}")
    if error is not None:
        raise error
    assert {**outcome, "said": said} == expected


@pytest.mark.parametrize("case", STOP_COVER + sample([c for c in MATRIX if c not in STOP_COVER], 0), ids=_id)
def test_max_bad_steps_in_a_row_stop_the_run_and_keep_what_was_committed(case, tiny_models, data, tmp_path,
                                                                         monkeypatch):
    method, site, action, ref = case
    out = tmp_path / "run"
    cfg = _config(method, ref, tiny_models["llama"], data, out, max_steps=6, max_bad_steps=2)
    monkeypatch.setenv(faults.ENV, f"{action}@{site}#2+")  # every hit from step 2 on
    outcome, error = {}, None
    try:
        try:
            train(cfg, log=lambda _: None, progress=False, card=False)
            outcome["error"] = "the run did not stop"
        except TrainingError as e:
            outcome["error"] = _said(str(e))  # "2 non-finite steps in a row (last: <cause>"
        ckpt = {s: _checkpoint(out, s) for s in (1, 2)}
        outcome.update(
            recorded=[(r["step"], r["skipped_steps"]) for r in _rows(out)],  # step 3's row is the last
            left=sorted(p.name for p in out.iterdir() if p.name in ("final", "run.json", "checkpoints")),
            committed=sorted(p.name for p in (out / "checkpoints").iterdir()),  # nothing half-written
            unchanged=_same(ckpt[1], ckpt[2]), finite=_finite(*ckpt[2]))
        monkeypatch.delenv(faults.ENV)  # the fault gone, the committed checkpoint resumes to the end
        resumed = train({**cfg, "resume": True, "max_steps": 3}, log=lambda _: None, progress=False, card=False)
        outcome["resumed"] = (resumed.summary["steps"], _final_finite(out))
    except Exception as e:  # counted as lost below, then raised
        error = e
    cause = (RL_CAUSE if method in RL else CAUSE)[site]
    expected = dict(error=f"2 non-finite steps in a row (last: {cause}",
                    recorded=[(2, 1), (3, 2)], left=["checkpoints"], committed=["step-1", "step-2"], unchanged=True,
                    finite=True, resumed=(3, True))
    ok = error is None and outcome == expected
    tally(KIND, survived=ok, lost=0 if ok else 1, detail=f"{action}@{site}#2+ {method} reference={ref}")
    if error is not None:
        raise error
    assert outcome == expected


def test_one_bad_reference_pass_is_one_bad_step_whatever_the_updates(tiny_models, data, tmp_path, monkeypatch):
    """RL with 2 epochs x 2 minibatches and an adaptive KL: a non-finite reference pass skips its rollout
    as one bad step (counted per update, it alone would reach max_bad_steps 2), and kl_coef stays finite."""
    out = tmp_path / "run"
    cfg = _config("rloo", "auto", tiny_models["llama"], data, out, max_steps=2, ppo_epochs=2, num_minibatches=2,
                  kl_target=0.1, max_bad_steps=2, log_every=1)
    monkeypatch.setenv(faults.ENV, "nan@ref_logps#1")
    outcome, error = {}, None
    try:
        result = train(cfg, log=lambda _: None, progress=False, card=False)
        rows = _rows(out)
        outcome = dict(skipped=result.summary["skipped_steps"], steps=result.summary["steps"],
                       kl_coef=all(torch.isfinite(torch.tensor(r["ppo/kl_coef"])) for r in rows if "ppo/kl_coef" in r),
                       updated=[r["step"] for r in rows if "loss" in r])
    except Exception as e:  # counted as lost below, then raised
        error = e
    expected = dict(skipped=1, steps=2, kl_coef=True, updated=[2])
    ok = error is None and outcome == expected
    tally(KIND, survived=ok, lost=0 if ok else 1, detail="nan@ref_logps#1 rloo, 4 updates a rollout, kl_target")
    if error is not None:
        raise error
    assert outcome == expected


def test_a_skipped_rollout_leaves_the_running_reward_statistics_and_kl_coef_as_they_were(tiny_models, data, tmp_path,
                                                                                         monkeypatch):
    """reward_norm: running and an adaptive KL, a checkpoint every step: step 2's rollout (its reference
    pass poisoned) is skipped, so the moments and kl_coef step-2 keeps are step-1's; step 3 moves them."""
    out = tmp_path / "run"
    cfg = _config("rloo", "auto", tiny_models["llama"], data, out, max_steps=3, reward_norm="running", kl_target=0.1)
    monkeypatch.setenv(faults.ENV, "nan@ref_logps#2")
    outcome, error = {}, None
    try:
        result = train(cfg, log=lambda _: None, progress=False, card=False)
        kept = [json.loads((out / "checkpoints" / f"step-{s}" / "state.json").read_text()) for s in (1, 2, 3)]
        rl = [(k["kl_coef"], k["moments"]) for k in kept]
        outcome = dict(skipped=result.summary["skipped_steps"], kept=rl[1] == rl[0], moved=rl[2] != rl[1])
    except Exception as e:  # counted as lost below, then raised
        error = e
    expected = dict(skipped=1, kept=True, moved=True)
    ok = error is None and outcome == expected
    tally(KIND, survived=ok, lost=0 if ok else 1, detail="nan@ref_logps#2 rloo, reward_norm running, kl_target")
    if error is not None:
        raise error
    assert outcome == expected, rl


def test_a_non_finite_value_head_skips_its_rollout_once(tiny_models, data, tmp_path, monkeypatch):
    """PPO's critic: non-finite values from the no-grad pass skip the rollout as one bad step (left to the
    loss, each of its 2 x 2 updates would count, and max_bad_steps 2 would stop the run)."""
    out = tmp_path / "run"
    cfg = _config("ppo", "auto", tiny_models["llama"], data, out, max_steps=2, ppo_epochs=2, num_minibatches=2,
                  samples_per_prompt=2, max_bad_steps=2, log_every=1)
    monkeypatch.setenv(faults.ENV, "nan@values#1")
    outcome, error, logs = {}, None, []
    try:
        result = train(cfg, log=logs.append, progress=False, card=False)
        outcome = dict(skipped=result.summary["skipped_steps"], steps=result.summary["steps"],
                       said=[_said(x) for x in logs if "skipped" in x], final=_final_finite(out))
    except Exception as e:  # counted as lost below, then raised
        error = e
    expected = dict(skipped=1, steps=2, said=["step 1: non-finite values"], final=True)
    ok = error is None and outcome == expected
    tally(KIND, survived=ok, lost=0 if ok else 1, detail="nan@values#1 ppo, 4 updates a rollout")
    if error is not None:
        raise error
    assert outcome == expected


@pytest.mark.parametrize("action", ["nan", "inf"])
def test_clipping_reports_one_bad_gradient_entry(action):
    """The guard reads the norm clip_grad_norm_ returns: one NaN or Inf entry among finite ones must
    make it non-finite (an Inf alone could be clipped to a finite norm by a smarter clip)."""
    a, b = torch.nn.Parameter(torch.ones(5)), torch.nn.Parameter(torch.ones(3))
    a.grad, b.grad = torch.ones(5), torch.ones(3)
    a.grad[2] = float(action)
    norm = torch.nn.utils.clip_grad_norm_([a, b], 1.0)
    assert not torch.isfinite(norm)  # a check of torch's clipping, no fault injected into prefalign: not tallied
