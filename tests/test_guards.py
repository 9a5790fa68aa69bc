"""Guardrails that pick the checkpoint (train/guards.py, docs/guardrails.md): the rules as pure functions,
then deliberately over-trained DPO runs on a tiny model (a learning rate far too high) whose exact KL
climbs: kl_max stops the run or rolls it back to the right step, select: frontier picks the step the
recorded figures say it must, final/ holds that checkpoint's weights, and a run killed part-way resumes
to the same decisions."""

from __future__ import annotations

import json
import re
import shutil
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import corpus, held_out_pairs, learnable_pairs, write_jsonl
from prefalign.errors import ConfigError, OutOfMemoryError, TrainingError
from prefalign.eval.evaluate import EvalConfig, evaluate
from prefalign.report.card_body import num, training_metrics
from prefalign.report.card_sources import Sources
from prefalign.train.config import Guards
from prefalign.train.guards import broken_rules, frontier, last_good
from prefalign.train.guards import figures as figures_of
from prefalign.train.help import config_help
from prefalign.train.methods import make_config
from prefalign.train.run import train
from test_metric_docs import documented, undocumented

STEPS, EVERY = 10, 2


# ------------------------------------------------------------------ the rules, by hand


def test_each_rule_breaks_on_its_side_of_the_limit():
    rules = Guards(kl_max=0.5, retention_drop_max=0.1, perplexity_increase_max=0.2, min_heldout_accuracy=0.6)
    ok = {"kl": 0.5, "retention_drop": 0.1, "perplexity_increase": 0.2, "heldout_accuracy": 0.6}  # at the limits
    assert broken_rules(rules, ok) == []
    for key, bad, rule in [("kl", 0.51, "kl_max"), ("retention_drop", 0.11, "retention_drop_max"),
                           ("perplexity_increase", 0.21, "perplexity_increase_max"),
                           ("heldout_accuracy", 0.59, "min_heldout_accuracy")]:
        assert broken_rules(rules, {**ok, key: bad}) == [{"rule": rule, "value": bad, "limit": getattr(rules, rule)}]
    # a figure nobody measured (or NaN) vouches for nothing; an unset rule checks nothing
    assert broken_rules(rules, {**ok, "kl": float("nan")}) == [{"rule": "kl_max", "value": None, "limit": 0.5}]
    assert broken_rules(Guards(), {"kl": 99.0}) == []


def test_frontier_and_rollback_pick_by_hand():
    h = [{"step": 2, "kl": 0.1, "heldout_accuracy": 0.5, "broken": []},
         {"step": 4, "kl": 0.3, "heldout_accuracy": 0.75, "broken": []},
         {"step": 6, "kl": 0.2, "heldout_accuracy": 0.75, "broken": []},  # as accurate as 4, less KL: the pick
         {"step": 8, "kl": 0.9, "heldout_accuracy": 0.9, "broken": [{"rule": "kl_max"}]},  # best, out of bounds
         {"step": 10, "kl": 0.2, "heldout_accuracy": 0.75, "broken": []}]  # ties 6 exactly: the earlier wins
    assert frontier(h)["step"] == 6
    assert last_good(h)["step"] == 10 and last_good(h[:4])["step"] == 6
    assert frontier(h[3:4]) is None and last_good(h[3:4]) is None


def test_non_finite_figures_are_unmeasured_and_null():
    nan = float("nan")
    h = [{"step": 2, "kl": nan, "heldout_accuracy": 0.5, "broken": []},  # ties 4's accuracy; its KL unknown
         {"step": 4, "kl": 0.3, "heldout_accuracy": 0.5, "broken": []},
         {"step": 6, "kl": 0.1, "heldout_accuracy": nan, "broken": []}]  # no held-out figure: no candidate
    assert frontier(h)["step"] == 4 and frontier(h[2:]) is None
    entry = figures_of(nan, nan, {"suites/a": 1.0, "perplexity": nan}, {"suites/a": 1.0, "perplexity": 2.0})
    assert entry["kl"] is entry["heldout_accuracy"] is entry["perplexity"] is entry["perplexity_increase"] is None
    json.dumps(entry, allow_nan=False)  # valid JSON in state.json and run.json
    assert broken_rules(Guards(kl_max=1.0, perplexity_increase_max=0.1), entry) == [
        {"rule": "kl_max", "value": None, "limit": 1.0}, {"rule": "perplexity_increase_max", "value": None,
                                                          "limit": 0.1}]


def test_text_rows_that_do_not_tokenize_are_counted_and_suite_names_do_not_clash(files, tmp_path):
    from prefalign.models.load import load_tokenizer
    from prefalign.train.guards import Retention

    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "a good film"}, {"prompt": "the plot", "completion": []},
                                              {"prompt": "I loved the movie", "completion": "so much"}])
    tok = load_tokenizer(files["model"])

    def retention(**guards):
        cfg = make_config(model=files["model"], data=files["data"], output=str(tmp_path / "o"), guard_every=1,
                          guards=guards)
        return Retention(cfg, tok, "cpu", nullcontext)
    # a completion without a turn to score
    assert retention(text=str(text)).skipped == 1 and len(retention(text=str(text)).seqs) == 2
    fake = tmp_path / "mine.yaml"
    fake.write_text(Path(files["suite"]).read_text().replace("name: words", "name: arithmetic"))
    (tmp_path / "words.jsonl").write_text((Path(files["suite"]).parent / "words.jsonl").read_text())
    with pytest.raises(ConfigError, match="named 'arithmetic'"):
        retention(suites=["arithmetic", str(fake)])
    with pytest.raises(ConfigError, match="named 'words'"):
        retention(suites=[files["suite"], files["suite"]])


def test_guards_keys_have_help():
    text = config_help("dpo")
    for key, field in Guards.model_fields.items():
        assert f"guards.{key}" in text and field.description in text


def test_guards_config_errors():
    base = dict(model="m", data="d.jsonl", output="o")
    with pytest.raises(Exception, match="kl_maxx"):
        make_config(**base, guard_every=2, guards={"kl_maxx": 1.0})
    with pytest.raises(Exception, match="guard_every"):
        make_config(**base, guards={"kl_max": 1.0})
    with pytest.raises(Exception, match="eval_data"):
        make_config(**base, guard_every=2, select="frontier")
    with pytest.raises(Exception, match="eval_data"):
        make_config(**base, guard_every=2, guards={"min_heldout_accuracy": 0.5})
    with pytest.raises(Exception, match="guards.suites"):
        make_config(**base, guard_every=2, guards={"retention_drop_max": 0.1})


# ------------------------------------------------------------------ over-trained runs


@pytest.fixture(scope="module")
def files(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("guards")
    train_pairs = learnable_pairs(32)
    # a suite the untrained tiny model passes (its greedy answer repeats the prompt's last word) and training
    # makes it forget: retention that drops
    write_jsonl(root / "words.jsonl", [{"question": q, "answer": q.split()[-1]} for q in
                                       ["I loved the movie", "I hated the plot", "the film", "what", "why", "hello"]])
    (root / "words.yaml").write_text("name: words\ndata: words.jsonl\nprompt: '{question}'\nchat: false\n"
                                     "scorer: contains\nlimit: 2\nmax_new_tokens: 6\n")
    return {"model": str(tiny_models["llama"]), "data": str(write_jsonl(root / "pairs.jsonl", train_pairs)),
            "eval_data": str(write_jsonl(root / "held.jsonl", held_out_pairs(train_pairs, 12))),
            "text": str(write_jsonl(root / "text.jsonl", [{"text": t} for t in corpus(6, seed=5)])), "root": root,
            "suite": str(root / "words.yaml")}


def _run(files, name, guards=None, select="last", log=lambda _: None, **kw):
    # lr 5e-3, constant, on a 32-wide model: a thousand times a usual DPO rate, so the policy runs away from its
    # reference within steps (its exact KL climbs every guard step) while its held-out accuracy still moves
    cfg = make_config(model=files["model"], data=files["data"], eval_data=files["eval_data"],
                      output=str(files["root"] / name), max_steps=STEPS, batch_size=8, learning_rate=5e-3,
                      lr_schedule="constant", kl_prompts=3, kl_max_new_tokens=6,
                      guard_every=EVERY, guards=guards or {}, select=select, seed=0, **{"keep_checkpoints": 1, **kw})
    train(cfg, log=log, progress=False)
    return json.loads((files["root"] / name / "run.json").read_text())


def _once(files, name, guards):
    """A run another test may have made already (the same config, the same figures: training is deterministic)."""
    done = files["root"] / name / "run.json"
    return json.loads(done.read_text()) if done.exists() else _run(files, name, guards)


@pytest.fixture(scope="module")
def figures(files):
    """A run with every measurement and no rule: the per-step figures the other runs are checked against."""
    return _run(files, "figures", {"suites": ["arithmetic", files["suite"]], "suite_limit": 2, "text": files["text"]},
                "frontier")


def _weights_equal(final, checkpoint, prefix=""):
    """`prefix`: what the checkpoint's names add (RL's actor-critic holds the policy as `policy.`)."""
    mine, theirs = load_file(str(final / "model.safetensors")), load_file(str(checkpoint / "trainable.safetensors"))
    theirs = {k[len(prefix):]: v for k, v in theirs.items() if k.startswith(prefix)}
    return all(torch.equal(mine[k], theirs[k]) for k in theirs if k in mine) and len(set(mine) & set(theirs)) > 5


def test_figures_are_recorded_and_documented(figures, files):
    g = figures["guard"]
    history = g["history"]
    assert [h["step"] for h in history] == list(range(EVERY, STEPS + 1, EVERY))
    assert history[-1]["kl"] > 4 * history[0]["kl"] > 0  # over-trained: the KL climbs
    assert all(h["perplexity_increase"] == pytest.approx(h["perplexity"] / g["reference"]["perplexity"] - 1)
               for h in history)
    assert all(h["retention_drop"] == max(g["reference"][f"suites/{n}"] - h["suites"][n] for n in h["suites"])
               for h in history) and set(history[0]["suites"]) == {"arithmetic", "words"}
    rows = [json.loads(x) for x in (files["root"] / "figures" / "metrics.jsonl").read_text().splitlines()]
    guarded = [r for r in rows if "guard/kl" in r]
    assert [r["guard/kl"] for r in guarded] == [h["kl"] for h in history]
    assert [r["guard/heldout_accuracy"] for r in guarded] == [h["heldout_accuracy"] for h in history]
    keys = {k for r in rows for k in r} | set(figures)
    assert {"guard/perplexity_increase", "guard/suites/arithmetic/score", "guard/passed", "guard"} <= keys
    assert undocumented(keys, documented()) == set()


def test_frontier_picks_the_best_heldout_within_the_limits(figures, files):
    history = figures["guard"]["history"]
    best = max(history, key=lambda h: (h["heldout_accuracy"], -h["kl"], -h["step"]))
    g = figures["guard"]
    # (no rule here, so every step is a candidate by construction: the run below checks `candidates` under rules)
    assert g["final_step"] == best["step"]
    assert figures["stopped"] == "max_steps" and f"step {best['step']}" in g["reason"]
    assert _weights_equal(files["root"] / "figures" / "final", files["root"] / "figures" / "checkpoints" /
                          f"step-{best['step']}")
    # the same run with kl_max under that step's KL and a retention limit (action: continue, the run goes on):
    # each step breaks exactly the rules its recorded figures are over, and the best of the rest is picked
    kl_max = (best["kl"] + max([h["kl"] for h in history if h["kl"] < best["kl"]], default=0.0)) / 2
    drop_max = 0.75
    ref = g["reference"]["suites/words"]
    broke = {h["step"]: {r for r, over in (("kl_max", h["kl"] > kl_max),
                                           ("retention_drop_max", ref - h["suites"]["words"] > drop_max)) if over}
             for h in history}
    inside = [h for h in history if not broke[h["step"]]]
    assert 0 < len(inside) < len(history) - 1, broke  # both rules take steps out, and some stay
    second = _run(files, "frontier-kl", {"kl_max": kl_max, "retention_drop_max": drop_max, "action": "continue",
                                         "suites": [files["suite"]]}, "frontier")["guard"]
    assert {h["step"]: {b["rule"] for b in h["broken"]} for h in second["history"]} == broke
    expected = max(inside, key=lambda h: (h["heldout_accuracy"], -h["kl"], -h["step"]))
    assert second["candidates"] == [h["step"] for h in inside] and second["final_step"] == expected["step"]
    # the reason counts the steps within the rules (all of them, not only those whose checkpoints were kept)
    assert f"of the {len(inside)} guard steps within every rule" in second["reason"], second["reason"]
    assert _weights_equal(files["root"] / "frontier-kl" / "final", files["root"] / "frontier-kl" / "checkpoints" /
                          f"step-{expected['step']}")


def _climb(history):
    """The first guard step after the second whose KL is above every earlier one, and a kl_max between them:
    rollback must return to the later of two good steps."""
    for i, h in enumerate(history[2:], 2):
        before = max(x["kl"] for x in history[:i])
        if h["kl"] > before * 1.05:
            return h, (h["kl"] + before) / 2
    pytest.fail(f"the KL never climbed: {[h['kl'] for h in history]}")


@pytest.mark.parametrize("action", ["rollback", "stop"])
def test_kl_max_stops_or_rolls_back_to_the_right_step(figures, files, action):
    fire, limit = _climb(figures["guard"]["history"])
    run = _once(files, action, {"kl_max": limit, "action": action})
    g = run["guard"]
    assert run["stopped"] == "guard" and run["steps"] == fire["step"]  # no step after the one that broke
    assert g["fired"] == {"step": fire["step"], "broken": [{"rule": "kl_max", "value": fire["kl"], "limit": limit}]}
    expected = fire["step"] - EVERY if action == "rollback" else fire["step"]
    assert g["final_step"] == expected and "kl_max" in g["reason"] and "pruned" not in g["reason"]
    assert _weights_equal(files["root"] / action / "final", files["root"] / action / "checkpoints" / f"step-{expected}")
    if action == "rollback":  # the step it returned to survived pruning (keep_checkpoints: 1)
        assert (files["root"] / action / "checkpoints" / f"step-{expected}").is_dir()
    # run.json's `final` is the row of the step final/ holds (its guard figures those recorded for it), `last`
    # the step that broke the rule; the card's "During training" shows final/'s step
    chosen = next(h for h in figures["guard"]["history"] if h["step"] == expected)
    assert run["final_step"] == expected and run["final"]["step"] == expected
    assert run["final"]["guard/kl"] == chosen["kl"] and run["final"]["guard/passed"] == float(action == "rollback")
    assert run.get("last", {}).get("step") == (fire["step"] if action == "rollback" else None)
    card = training_metrics(Sources(run=files["root"] / action, config={}, summary=run, stats={}))
    assert f"| `guard/kl` | {num(chosen['kl'])} |" in card and (f"Step {expected}," in card) == (action == "rollback")


def test_a_killed_guarded_run_resumes_to_the_same_decisions(figures, files, monkeypatch):
    fire, limit = _climb(figures["guard"]["history"])
    guards = {"kl_max": limit, "action": "rollback"}
    # dies at the step after the first guard checkpoint (in-process: the checkpoints are what a kill leaves)
    monkeypatch.setenv("PREFALIGN_FAULTS", f"oom@step#{fire['step'] - 1}")
    with pytest.raises(OutOfMemoryError):
        _run(files, "killed", guards)
    monkeypatch.delenv("PREFALIGN_FAULTS")
    resumed = _run(files, "killed", guards, resume=True)["guard"]
    whole = _once(files, "rollback", guards)["guard"]
    assert resumed["history"] == whole["history"] and resumed["final_step"] == whole["final_step"] == \
        fire["step"] - EVERY
    # dies writing final/, after the guard ended the run: the resumed run trains no further, it rolls back
    monkeypatch.setenv("PREFALIGN_FAULTS", "oom@final.write#1")
    with pytest.raises(OutOfMemoryError):
        _run(files, "killed-late", guards)
    monkeypatch.delenv("PREFALIGN_FAULTS")
    late = _run(files, "killed-late", guards, resume=True)
    assert late["steps"] == fire["step"] and late["stopped"] == "guard" and late["guard"]["history"] == whole["history"]
    rows = [json.loads(x) for x in (files["root"] / "killed-late" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == fire["step"]
    assert _weights_equal(files["root"] / "killed-late" / "final", files["root"] / "rollback" / "checkpoints" /
                          f"step-{fire['step'] - EVERY}")


def test_a_run_resumed_with_a_loosened_rule_trains_on(figures, files):
    """The rollback run, resumed with kl_max loosened past every recorded KL: the checkpoint's figures are
    judged under the new rule, nothing fired, so it trains to max_steps and final/ is the last step."""
    fire, limit = _climb(figures["guard"]["history"])
    _once(files, "rollback", {"kl_max": limit, "action": "rollback"})
    shutil.copytree(files["root"] / "rollback", files["root"] / "loosened")
    logged = []
    run = _run(files, "loosened", {"kl_max": 1e6, "action": "rollback"}, log=logged.append, resume=True)
    g = run["guard"]
    assert run["steps"] == STEPS and run["stopped"] == "max_steps" and g["fired"] is None
    assert g["final_step"] == STEPS and g["rules"]["kl_max"] == 1e6 and "kl_max" not in g["reason"]
    assert [h["step"] for h in g["history"]] == list(range(EVERY, STEPS + 1, EVERY)) and g["candidates"] == \
        [h["step"] for h in g["history"]]
    assert any("rules changed" in line for line in logged), logged


@pytest.mark.parametrize(("select", "keep"), [("last", 1), ("last", STEPS), ("frontier", 1)])
def test_a_run_resumed_with_a_tightened_rule_chooses_only_a_checkpoint_it_has(figures, files, monkeypatch, select,
                                                                               keep):
    """Killed writing final/ under a kl_max nothing broke, resumed with the climb's limit: the recorded steps are
    judged again, no step more trains, and rollback (or the frontier) chooses among the steps whose checkpoints are
    still on disk. With keep_checkpoints 1 the old rules let pruning remove the step the new ones pick: the reason
    names it, and with nothing left the error does, rather than loading a missing checkpoint."""
    fire, limit = _climb(figures["guard"]["history"])
    name = f"tightened-{select}-{keep}"
    monkeypatch.setenv("PREFALIGN_FAULTS", "oom@final.write#1")
    with pytest.raises(OutOfMemoryError):
        _run(files, name, {"kl_max": 1e6, "action": "rollback"}, keep_checkpoints=keep)
    monkeypatch.delenv("PREFALIGN_FAULTS")
    saved = {int(p.name.split("-")[1]) for p in (files["root"] / name / "checkpoints").iterdir()} | {STEPS}
    history = figures["guard"]["history"]
    if select == "frontier":
        rules = {"kl_max": limit, "action": "continue"}
        best = lambda hs: max((h for h in hs if h["kl"] <= limit), default=None,  # noqa: E731
                              key=lambda h: (h["heldout_accuracy"], -h["kl"], -h["step"]))
    else:
        rules = {"kl_max": limit, "action": "rollback"}
        best = lambda hs: max((h for h in hs if h["step"] < fire["step"] and h["kl"] <= limit), default=None,  # noqa
                              key=lambda h: h["step"])
    ideal, target = best(history), best([h for h in history if h["step"] in saved])
    assert ideal is not None and (ideal is target) == (keep == STEPS), (saved, ideal, target)
    note = f"step {ideal['step']}, which the rules pick, has no checkpoint left (pruned under earlier rules)"
    if target is None:
        with pytest.raises(TrainingError, match=re.escape(note)):
            _run(files, name, rules, select, keep_checkpoints=keep, resume=True)
        assert not (files["root"] / name / "final" / "model.safetensors").exists()
        return
    run = _run(files, name, rules, select, keep_checkpoints=keep, resume=True)
    g = run["guard"]
    assert run["steps"] == STEPS and g["final_step"] == target["step"] and (note in g["reason"]) == (keep == 1)
    assert _weights_equal(files["root"] / name / "final", files["root"] / name / "checkpoints" /
                          f"step-{target['step']}")


def test_a_resumed_frontier_whose_pick_was_pruned_takes_the_best_it_still_has_and_says_so(figures, files):
    """select: frontier under a tight kl_max keeps only its pick b1 (and the last step); resumed with a looser
    kl_max the rules pick a step b2 pruned meanwhile: final/ is the best of the steps still on disk, and the
    reason names b2."""
    history = figures["guard"]["history"]
    key = lambda h: (h["heldout_accuracy"], -h["kl"], -h["step"])  # noqa: E731  the frontier's order
    best = lambda limit: max((h for h in history if h["kl"] <= limit), key=key)  # noqa: E731
    tight = min(h["kl"] for h in history)
    b1 = best(tight)
    loose = next((h["kl"] for h in sorted(history, key=lambda h: h["kl"])
                  if best(h["kl"])["step"] not in (b1["step"], STEPS)), None)
    assert loose is not None, [(h["step"], h["kl"], h["heldout_accuracy"]) for h in history]
    b2 = best(loose)
    _run(files, "frontier-pruned", {"kl_max": tight, "action": "continue"}, "frontier")
    saved = {int(p.name.split("-")[1]) for p in (files["root"] / "frontier-pruned" / "checkpoints").iterdir()}
    assert b2["step"] not in saved and b1["step"] in saved, saved
    run = _run(files, "frontier-pruned", {"kl_max": loose, "action": "continue"}, "frontier", resume=True)
    got = max((h for h in history if h["kl"] <= loose and h["step"] in saved | {STEPS}), key=key)
    assert run["guard"]["final_step"] == got["step"] != b2["step"]
    assert f"step {b2['step']}, which the rules pick, has no checkpoint left" in run["guard"]["reason"]
    assert _weights_equal(files["root"] / "frontier-pruned" / "final", files["root"] / "frontier-pruned" /
                          "checkpoints" / f"step-{got['step']}") or got["step"] == STEPS


def test_a_run_stopped_by_its_time_budget_is_judged_at_the_step_it_stops(files, tmp_path):
    """guard_every far beyond the run, max_seconds 1: the step the budget stops at is still a guard step, so a
    rule it breaks fires there (final/ kept every rule, or the run says it broke one), not a silent last step."""
    cfg = make_config(model=files["model"], data=files["data"], output=str(tmp_path / "t"), max_steps=10_000,
                      batch_size=8, learning_rate=5e-3, lr_schedule="constant", kl_prompts=2, kl_max_new_tokens=4,
                      guard_every=5_000, guards={"kl_max": 1e-12, "action": "stop"}, max_seconds=1.0)
    train(cfg, log=lambda _: None, progress=False)
    run = json.loads((tmp_path / "t" / "run.json").read_text())
    g = run["guard"]
    assert 1 < run["steps"] < 5_000 and [h["step"] for h in g["history"]] == [run["steps"]]
    assert run["stopped"] == "guard" and g["fired"]["step"] == run["steps"] and "kl_max" in g["reason"]


def test_kl_budget_sees_only_the_monitors_measurements(files, tmp_path):
    """kl_every 3, guard_every 2, a budget every KL is over: the guard's KL at step 2 does not stop the run,
    the monitor's at step 3 does (as in the same run unguarded), and the guard judges step 3, where it stops."""
    cfg = make_config(model=files["model"], data=files["data"], output=str(tmp_path / "b"), max_steps=6, batch_size=8,
                      learning_rate=5e-3, kl_prompts=2, kl_max_new_tokens=4, kl_every=3, kl_budget=1e-12,
                      stop_on_kl_budget=True, guard_every=2, seed=0)
    train(cfg, log=lambda _: None, progress=False)
    run = json.loads((tmp_path / "b" / "run.json").read_text())
    assert run["stopped"] == "kl_budget" and run["steps"] == 3 and [h["step"] for h in run["guard"]["history"]] == \
        [2, 3]


def _short(files, out, max_steps, **kw):
    cfg = make_config(model=files["model"], data=files["data"], eval_data=files["eval_data"], output=str(out),
                      max_steps=max_steps, batch_size=8, learning_rate=5e-3, lr_schedule="constant", kl_prompts=2,
                      kl_max_new_tokens=4, seed=0, **kw)
    train(cfg, log=lambda _: None, progress=False)
    return json.loads((out / "run.json").read_text())


def test_guards_leave_training_unchanged_and_check_the_last_step(files, tmp_path):
    """Every measurement on (suites, text, held-out accuracy) and max_steps 3, not a multiple of guard_every:
    the last step is checked too, and final/'s weights are bit for bit those of the same run unguarded (the
    measurements take nothing from the training's random draws or its model state)."""
    plain = _short(files, tmp_path / "plain", 3)
    every = {"suites": [files["suite"]], "text": files["text"], "min_heldout_accuracy": 0}
    guarded = _short(files, tmp_path / "guarded", 3, guard_every=2, guards=every)
    assert [h["step"] for h in guarded["guard"]["history"]] == [2, 3] and plain["steps"] == 3
    assert all(h["heldout_accuracy"] is not None and h["perplexity"] for h in guarded["guard"]["history"])
    a, b = (load_file(str(tmp_path / n / "final" / "model.safetensors")) for n in ("plain", "guarded"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("training", [True, False])
def test_a_guard_check_leaves_the_random_draws_and_the_training_mode_as_it_found_them(files, tmp_path, training):
    """Guard.check measuring everything it can here (the KL, sampled; suites, greedy; perplexity) on a real
    tiny policy: the global generator's state is the one before, and the policy is back in the mode it was in."""
    from prefalign.models.load import load_model, load_tokenizer
    from prefalign.train.guards import Guard, Retention
    from prefalign.train.kl_monitor import KLMonitor

    cfg = make_config(model=files["model"], data=files["data"], output=str(tmp_path / "o"), guard_every=1,
                      guards={"suites": [files["suite"]], "text": files["text"], "kl_max": 1.0})
    tok, policy, reference = load_tokenizer(files["model"]), load_model(files["model"]), load_model(files["model"])
    monitor = KLMonitor(policy, reference, tok, ["the film", "I loved"], every=1, max_new_tokens=4,
                        max_prompt_length=16, seed=0, device="cpu", autocast=nullcontext, chunk_mb=64)
    guard = Guard(cfg, monitor, None, Retention(cfg, tok, "cpu", nullcontext), log=lambda _: None)
    policy.train(training)
    torch.manual_seed(7)
    before, row = torch.random.get_rng_state(), {}
    guard.check(1, row)
    assert torch.equal(torch.random.get_rng_state(), before) and policy.training is training
    assert {"guard/kl", "guard/perplexity", "guard/suites/words/score"} <= set(row)  # it did measure


def test_nothing_to_roll_back_to_or_choose_is_an_error(files, tmp_path):
    with pytest.raises(TrainingError, match="nothing to roll back to"):
        _short(files, tmp_path / "rb", 2, guard_every=1, guards={"kl_max": 1e-12, "action": "rollback"})
    with pytest.raises(TrainingError, match="no guard step kept every rule"):
        _short(files, tmp_path / "fr", 2, guard_every=1, select="frontier",
               guards={"kl_max": 1e-12, "action": "continue"})
    assert not (tmp_path / "rb" / "final").exists() and not (tmp_path / "fr" / "final").exists()
    assert (tmp_path / "rb" / "metrics.jsonl").exists()


def test_rl_runs_are_guarded_too(files, tmp_path):
    """rloo with a kl_max any update breaks: the run ends at the first guard step, final/ the model there; the
    KL monitor is not due there (kl_every 3), so the guard measures it itself."""
    rewards = f"{Path(__file__).parent / 'fixtures' / 'rewards.py'}:length"
    cfg = make_config(method="rloo", model=files["model"], prompts=files["data"], reward=rewards,
                      output=str(tmp_path / "rl"), max_steps=4, batch_size=2, max_new_tokens=4, learning_rate=1e-2,
                      kl_every=3, kl_prompts=2, kl_max_new_tokens=4, guard_every=2, guards={"kl_max": 1e-9})
    train(cfg, log=lambda _: None, progress=False)
    run = json.loads((tmp_path / "rl" / "run.json").read_text())
    assert run["stopped"] == "guard" and run["steps"] == 2 and run["guard"]["final_step"] == 2
    assert run["guard"]["fired"]["broken"][0]["rule"] == "kl_max" and run["guard"]["history"][0]["kl"] > 1e-9


def test_rl_frontier_picks_the_best_heldout_reward_within_kl_max(files, tmp_path):
    """rloo paid for short answers, held-out reward on eval_prompts at every step, kl_max in the middle of the
    KL's climb (action: continue): final/ is the step with the best recorded held-out reward among the steps
    within kl_max, and that step's figure is what its weights score."""
    from prefalign.judges import make_judge
    from prefalign.models.load import load_model, load_tokenizer
    from prefalign.train.guards import HeldoutReward, heldout_prompts

    kl_max = 0.05
    held = str(write_jsonl(tmp_path / "held.jsonl", held_out_pairs(learnable_pairs(32), 8)))
    cfg = make_config(method="rloo", model=files["model"], prompts=files["data"], eval_prompts=held,
                      reward=f"{Path(__file__).parent / 'fixtures' / 'rewards.py'}:short", output=str(tmp_path / "rl"),
                      max_steps=5, batch_size=2, max_new_tokens=6, learning_rate=2e-2, ppo_epochs=1, kl_prompts=2,
                      kl_max_new_tokens=4, guard_every=1, guards={"kl_max": kl_max, "action": "continue"},
                      select="frontier", keep_checkpoints=1, seed=0)
    train(cfg, log=lambda _: None, progress=False)
    run = json.loads((tmp_path / "rl" / "run.json").read_text())
    g, history = run["guard"], run["guard"]["history"]
    inside = [h for h in history if h["kl"] <= kl_max]
    best = max(history, key=lambda h: (h["heldout_reward"], -h["kl"], -h["step"]))
    expected = max(inside, key=lambda h: (h["heldout_reward"], -h["kl"], -h["step"]))
    # the fixture discriminates: kl_max takes steps out, among them the best overall, and the pick is not
    # simply the last step within kl_max
    assert 0 < len(inside) < len(history) and best not in inside and expected != inside[-1], \
        [(h["kl"], h["heldout_reward"]) for h in history]
    assert run["stopped"] == "max_steps" and g["candidates"] == [h["step"] for h in inside]
    assert g["final_step"] == expected["step"] and "held-out reward" in g["reason"]
    assert all(h["heldout_reward_stderr"] > 0 for h in history)
    rows = [json.loads(x) for x in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["guard/heldout_reward"] for r in rows if "guard/kl" in r] == [h["heldout_reward"] for h in history]
    assert _weights_equal(tmp_path / "rl" / "final", tmp_path / "rl" / "checkpoints" / f"step-{expected['step']}",
                          "policy.")
    # the figure is the final model's: the same prompts, seed and judge on final/'s weights
    tok = load_tokenizer(files["model"])
    again = HeldoutReward(cfg, heldout_prompts(held), make_judge(cfg.reward, "cpu"), False, tok, "cpu",
                          nullcontext).measure(load_model(str(tmp_path / "rl" / "final")).eval())
    assert again["heldout_reward"] == pytest.approx(expected["heldout_reward"])


def test_rl_heldout_reward_config_errors(files):
    rl = dict(method="rloo", model="m", prompts="p.jsonl", reward="r.py:f", output="o", guard_every=2)
    with pytest.raises(Exception, match="eval_prompts"):
        make_config(**rl, guards={"min_heldout_reward": 1.0})
    with pytest.raises(Exception, match="eval_prompts"):
        make_config(**rl, select="frontier")
    with pytest.raises(Exception, match="eval_data"):
        make_config(**rl, eval_prompts="e.jsonl", guards={"min_heldout_accuracy": 0.5})
    with pytest.raises(Exception, match="eval_prompts"):
        make_config(model="m", data="d.jsonl", eval_data="e.jsonl", output="o", guard_every=2,
                    guards={"min_heldout_reward": 1.0})


def test_the_figures_are_evals_on_the_same_model(figures, files):
    """The last guard step's figures are what `prefalign eval` measures on final/ (the frontier's pick is the
    last step here) against the starting model: the same KL, perplexity and suite scores, by the same code."""
    assert figures["guard"]["final_step"] == STEPS
    last = figures["guard"]["history"][-1]
    ev = evaluate(EvalConfig(model=str(files["root"] / "figures" / "final"), reference=files["model"],
                             prompts=files["eval_data"], text=files["text"], suites=[files["suite"]], max_prompts=3,
                             max_new_tokens=6, seed=0, batch_size=16, output=str(files["root"] / "eval")),
                  log=lambda _: None, progress=False)
    assert last["kl"] == pytest.approx(ev["kl_per_token"], rel=1e-4)
    assert last["perplexity"] == pytest.approx(ev["perplexity"], rel=1e-5)
    assert figures["guard"]["reference"]["perplexity"] == pytest.approx(ev["perplexity_reference"], rel=1e-5)
    assert last["suites"]["words"] == ev["suites/words/score"]
    assert figures["guard"]["reference"]["suites/words"] == ev["suites/words/score_reference"]
