"""The loop's promises: reference strategies agree, SIGKILL + resume is exact, the KL budget stops a
run, non-finite steps are skipped then stop the run, accumulation is equivalent, caches go stale."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import learnable_pairs, nan_model, write_jsonl
from prefalign.data import load_records
from prefalign.data.batches import collate, tokenize_records
from prefalign.losses.preference import dpo
from prefalign.models.load import add_lora, load_model, load_tokenizer
from prefalign.models.reference import AdapterReference, CopyReference, fingerprint, precompute
from prefalign.train.methods import make_config
from prefalign.train.run import train

QUIET = dict(log=lambda _: None, progress=False)


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_three_reference_strategies_agree(tiny_models, pair_file, tmp_path):
    tok = load_tokenizer(tiny_models["llama"])
    records, _ = load_records(pair_file)
    data = tokenize_records(tok, records, max_length=64, max_prompt_length=32, unit="pairs")
    model = load_model(tiny_models["llama"])
    copy_ref = CopyReference(model)
    model = add_lora(model, {"r": 4})
    # make the policy differ from the reference: adapters that are on must not leak into the reference
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    idx = list(range(8))
    batch = collate([data.examples[i] for i in idx], idx, tok.pad_token_id)
    pre = precompute(model, iter([collate(data.examples[i:i + 8], list(range(i, i + 8)), tok.pad_token_id)
                                  for i in range(0, len(data), 8)]), len(data), 2, tmp_path / "ref.safetensors",
                     fingerprint(model, data.examples), log=lambda _: None)
    refs = [r.logps(batch) for r in (pre, AdapterReference(model), copy_ref)]
    from prefalign.models.logps import sequence_logps

    policy = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    assert not torch.allclose(policy, refs[0], atol=1e-3)  # the policy really differs
    losses = [dpo(policy[:8], policy[8:], r[:8], r[8:], beta=0.1)[0] for r in refs]
    for other in losses[1:]:
        assert torch.allclose(losses[0], other, atol=1e-5)
    for other in refs[1:]:
        assert torch.allclose(refs[0], other, atol=1e-5)


def test_training_runs_agree_across_reference_strategies(tiny_models, pair_file, tmp_path):
    losses = {}
    for strategy in ("precompute", "adapter", "copy"):
        cfg = make_config(model=str(tiny_models["llama"]), data=str(pair_file), output=str(tmp_path / strategy),
                          max_steps=4, batch_size=4, learning_rate=1e-3, lora=True, reference=strategy)
        train(cfg, **QUIET)
        losses[strategy] = [m["loss"] for m in metrics(tmp_path / strategy)]
        assert json.loads((tmp_path / strategy / "run.json").read_text())["reference"] == strategy
    assert losses["precompute"] == pytest.approx(losses["adapter"], abs=1e-5)
    assert losses["precompute"] == pytest.approx(losses["copy"], abs=1e-5)


def test_precompute_cache_fingerprint_catches_changes(tiny_models, tmp_path):
    data1 = write_jsonl(tmp_path / "a.jsonl", learnable_pairs(16, seed=1))
    data2 = write_jsonl(tmp_path / "b.jsonl", learnable_pairs(16, seed=2))
    logs: list[str] = []
    base = dict(model=str(tiny_models["gpt2"]), output=str(tmp_path / "run"), max_steps=1, batch_size=4,
                reference="precompute")
    train(make_config(data=str(data1), **base), log=logs.append, progress=False)
    train(make_config(data=str(data1), **base), log=logs.append, progress=False)
    train(make_config(data=str(data2), **base), log=logs.append, progress=False)
    train(make_config(data=str(data2), max_length=8, **{**base}), log=logs.append, progress=False)
    train(make_config(data=str(data2), max_length=8, **{**base, "model": str(tiny_models["llama"])}),
                log=logs.append, progress=False)
    ref_logs = [x for x in logs if x.startswith("reference log-probs")]
    assert ["computed" in ref_logs[0], "cached" in ref_logs[1], "stale" in ref_logs[2], "stale" in ref_logs[4],
            "stale" in ref_logs[6]] == [True] * 5


RESUME_SCRIPT = """
import sys
from prefalign.train.methods import make_config
from prefalign.train.run import train
cfg = make_config(model=sys.argv[1], data=sys.argv[2], output=sys.argv[3], max_steps=150, batch_size=4,
                  learning_rate=1e-3, save_every=10, resume=True, lora=sys.argv[4] == "lora")
train(cfg, log=lambda _: None, progress=False)
"""


@pytest.mark.parametrize("variant", ["full", "lora"])
def test_sigkill_then_resume_reproduces_losses(tiny_models, pair_file, tmp_path, variant):
    script = tmp_path / "run.py"
    script.write_text(RESUME_SCRIPT)
    args = [sys.executable, str(script), str(tiny_models["llama"]), str(pair_file)]
    subprocess.run(args + [str(tmp_path / "straight"), variant], check=True, capture_output=True)
    run = tmp_path / "killed"
    # Kill the run as soon as checkpoint step-30 exists, wherever it then is (mid-step, mid-write).
    proc = subprocess.Popen(args + [str(run), variant], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run / "checkpoints" / "step-30").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before the kill"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(m["step"] for m in metrics(run))
    assert killed_at < 150
    subprocess.run(args + [str(run), variant], check=True, capture_output=True)
    straight = [(m["step"], m["loss"]) for m in metrics(tmp_path / "straight")]
    resumed = [(m["step"], m["loss"]) for m in metrics(run)]
    assert [s for s, _ in resumed] == [s for s, _ in straight] == list(range(1, 151))
    assert [x for _, x in resumed] == pytest.approx([x for _, x in straight], abs=1e-6)


def test_kl_budget_stops_the_run_and_saves(tiny_models, pair_file, tmp_path):
    logs: list[str] = []
    cfg = make_config(model=str(tiny_models["llama"]), data=str(pair_file), output=str(tmp_path / "run"),
                      max_steps=100, batch_size=8, learning_rate=5e-3, beta=0.5, kl_budget=0.05,
                      stop_on_kl_budget=True, lr_schedule="constant", kl_every=5)
    result = train(cfg, log=logs.append, progress=False)
    # the budget is checked where the monitor measured the exact KL: every 5 steps
    assert result.stopped == "kl_budget" and 5 <= result.steps < 100 and result.steps % 5 == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    measured = [r for r in rows if "kl/policy_ref_token" in r]
    assert [r["step"] for r in measured] == list(range(5, result.steps + 1, 5))
    assert measured[-1]["kl/policy_ref_token"] > 0.05 >= measured[-2]["kl/policy_ref_token"]
    assert any("exceeds kl_budget" in x for x in logs)
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
    assert (tmp_path / "run" / "checkpoints" / f"step-{result.steps}").exists()
    assert json.loads((tmp_path / "run" / "run.json").read_text())["stopped"] == "kl_budget"
    assert list((tmp_path / "run").glob("events.out.tfevents*"))  # TensorBoard beside metrics.jsonl
    # resumed (as after a kill while final/ was written): stopped by the same budget, no step more
    again = train(cfg.model_copy(update={"resume": True}), log=logs.append, progress=False)
    assert again.stopped == "kl_budget" and again.steps == result.steps


def test_max_seconds_stops_after_the_step_that_reaches_it_counted_over_resumes(tiny_models, pair_file, tmp_path):
    logs: list[str] = []
    base = dict(model=str(tiny_models["llama"]), data=str(pair_file), output=str(tmp_path / "run"), max_steps=10_000,
                batch_size=2, kl_every=0, lr_schedule="constant")
    result = train(make_config(**base, max_seconds=1.0), log=logs.append, progress=False)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert result.stopped == run["stopped"] == "max_seconds" and 1 < result.steps < 10_000
    # the checkpoint's clock (read before it was written) is past the budget, and was not a step before
    at = json.loads((tmp_path / "run" / "checkpoints" / f"step-{result.steps}" / "state.json").read_text())
    rows = metrics(tmp_path / "run")
    assert 1.0 <= at["wall_seconds"] < 1.0 + rows[-1]["step_seconds"] + 0.2, (at["wall_seconds"], rows[-1])
    assert any("reached max_seconds (1 s)" in x for x in logs)
    # resumed (as after a kill while final/ was written): the budget is spent, so no step more, as uninterrupted
    final = (tmp_path / "run" / "final" / "model.safetensors").read_bytes()
    more = train(make_config(**base, max_seconds=1.0, resume=True), log=logs.append, progress=False)
    assert more.stopped == "max_seconds" and more.steps == result.steps
    assert (tmp_path / "run" / "final" / "model.safetensors").read_bytes() == final
    # ...and with the budget raised, it trains on from there
    longer = train(make_config(**base, max_seconds=1.5, resume=True), log=logs.append, progress=False)
    assert longer.stopped == "max_seconds" and longer.steps > result.steps


def test_non_finite_steps_are_skipped_then_stop(tiny_models, pair_file, tmp_path):
    from prefalign.train.loop import TrainingError

    nan_model(tiny_models["llama"], tmp_path / "nan_model")
    cfg = make_config(model=str(tmp_path / "nan_model"), data=str(pair_file), output=str(tmp_path / "run"),
                      max_steps=20, batch_size=4, max_bad_steps=3, reference="copy")
    with pytest.raises(TrainingError, match="3 non-finite steps in a row"):
        train(cfg, **QUIET)
    rows = metrics(tmp_path / "run")
    assert [r["skipped_steps"] for r in rows] == [1, 2, 3]


def test_accumulation_1x8_equals_8x1(tiny_models, pair_file, tmp_path):
    runs = {}
    for name, (bs, acc) in {"1x8": (8, 1), "8x1": (1, 8)}.items():
        cfg = make_config(model=str(tiny_models["gpt2"]), data=str(pair_file), output=str(tmp_path / name),
                          max_steps=3, batch_size=bs, grad_accum=acc, learning_rate=1e-3, reference="copy")
        train(cfg, **QUIET)
        runs[name] = metrics(tmp_path / name)
    for a, b in zip(runs["1x8"], runs["8x1"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_schedule_values():
    from prefalign.train.loop import lr_lambda

    base = dict(model="m", data="d", output="o", max_steps=10, warmup_steps=2)
    f = lr_lambda(make_config(lr_schedule="linear", **base))
    assert [round(f(s), 6) for s in (0, 1, 2, 6, 10)] == [round(1 / 3, 6), round(2 / 3, 6), 1.0, 0.5, 0.0]
    g = lr_lambda(make_config(lr_schedule="cosine", **base))
    assert g(2) == 1.0 and abs(g(6) - 0.5) < 1e-12 and abs(g(10)) < 1e-12
    assert lr_lambda(make_config(lr_schedule="constant", **base))(7) == 1.0


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_and_bf16_match_plain_fp32(tiny_models, pair_file, tmp_path, lora):
    runs = {}
    for name, extra in {"plain": {}, "gc": {"gradient_checkpointing": True}, "bf16": {"precision": "bf16"}}.items():
        cfg = make_config(model=str(tiny_models["llama"]), data=str(pair_file), output=str(tmp_path / name),
                          max_steps=3, batch_size=4, learning_rate=1e-3, lora=lora, reference="copy", **extra)
        train(cfg, **QUIET)
        runs[name] = [m["loss"] for m in metrics(tmp_path / name)]
    assert runs["gc"] == pytest.approx(runs["plain"], abs=1e-5)  # recomputation changes nothing
    assert runs["bf16"] == pytest.approx(runs["plain"], abs=2e-2)  # bf16 matmuls, fp32 log-softmax
    assert runs["bf16"] != runs["plain"]  # autocast really ran in bf16
