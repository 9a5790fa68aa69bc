"""Out of memory (docs/reliability.md, "NaN, Inf and out of memory"): a real RLIMIT_AS on a CPU run whose
step needs far more than is left, and the `oom` fail point as the model loads, at a step, in the
reference precompute and in an RL rollout. Each ends in one clear error (prefalign.errors.OutOfMemoryError:
where it ran out, `prefalign plan` on the run's own config, gradient checkpointing, a smaller batch_size
with a larger grad_accum, LoRA); the CLI prints it on one line, without a traceback, and exits 1;
committed checkpoints stay intact and resume, and no final/ or run.json is written."""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from faultkit import tally
from safetensors.torch import load_file

from conftest import WORDS, learnable_pairs, write_jsonl
from prefalign import faults
from prefalign.api import train
from prefalign.errors import OutOfMemoryError, TrainingError
from prefalign.runtime.memory import out_of_memory
from prefalign.train.methods import load_train_config

KIND = "out of memory"
HERE = Path(__file__).parent
TIPS = ("`prefalign plan ", "gradient_checkpointing: true", "lora: true")


def _said(text: str) -> dict:
    """What an out-of-memory error tells: where, the tips it gives, what it says was kept."""
    return dict(where=text.split(" (")[0], tips=[t for t in TIPS if t in text],
                batch=text.split("a smaller batch_size")[1].split(";")[0] if "a smaller batch_size" in text else None,
                kept=text.rsplit(". ", 1)[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc/self/status: Linux")
def test_real_rlimit_as_at_a_big_step_is_one_clear_error(tiny_models, tmp_path):
    """`prefalign train` under an address-space limit its model and data fit in and its first step (128
    sequences of ~1000 tokens) does not: without a limit that step took VmPeak from 1,084 to 2,308 MB on
    the 2-core CPU machine this was written on, five times the 256 MB margin."""
    rng = random.Random(0)
    rows = [{"prompt": "Question: what?", "completion": " " + " ".join(rng.choice(WORDS) for _ in range(1000))}
            for _ in range(128)]
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    warm, small = tmp_path / "warm.json", write_jsonl(tmp_path / "small.jsonl", learnable_pairs(8))
    warm.write_text(json.dumps(dict(method="sft", model=str(tiny_models["llama"]), data=str(small),
                                    output=str(tmp_path / "warm"), max_steps=1, batch_size=2, device="cpu",
                                    report_to=["none"], kl_every=0)))
    out = tmp_path / "run"
    # one compute thread and no tokenizer thread pool: the threads a run starts after the limit is set
    # would need address space (their stacks, glibc's per-thread arenas) that the warm-up did not measure
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(HERE / "under_rlimit.py"), "256", str(warm), "train", "--method", "sft",
           "--model", str(tiny_models["llama"]), "--data", str(data), "-o", str(out), "--no-progress",
           "batch_size=128", "max_length=2048", "max_steps=2", "device=cpu", "report_to=none", "kl_every=0"]
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:  # tallied as lost, then raised
        tally(KIND, survived=False, lost=1, detail="RLIMIT_AS: the run hung")
        raise
    error = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    said = _said(error[0].removeprefix("error: ")) if len(error) == 1 else {}
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    ok = (r.returncode == 1 and "Traceback" not in r.stderr and said.get("where") == "out of memory at step 1"
          and said.get("tips") == list(TIPS) and left == ["config.yaml", "metrics.jsonl"])
    tally(KIND, survived=ok, lost=0 if ok else 1, detail="RLIMIT_AS (VmPeak + 256 MB), sft batch_size 128 at step 1")
    assert "rlimit_as=" in r.stderr, r.stderr[-3000:]  # the limit was set: the warm-up ran under none
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert said == dict(where="out of memory at step 1", tips=list(TIPS),
                        batch=" with a larger grad_accum, the same 128 examples a step (batch_size: 64, grad_accum: 2)",
                        kept="No checkpoint was written."), error
    assert "allocate" in error[0]  # the allocator's own words are kept
    assert left == ["config.yaml", "metrics.jsonl"]  # no final/, no run.json, no half-written checkpoint
    assert load_train_config(out / "config.yaml").batch_size == 128  # the config `prefalign plan` is pointed at


def test_out_of_memory_at_a_step_keeps_the_committed_checkpoints(tiny_models, pair_file, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = dict(method="dpo", model=str(tiny_models["llama"]), data=str(pair_file), output=str(out), max_steps=4,
               batch_size=6, grad_accum=2, save_every=1, kl_every=0, report_to=["none"], learning_rate=1e-3)
    monkeypatch.setenv(faults.ENV, "oom@step#3")  # MemoryError as step 3 starts, after step 2's checkpoint
    outcome, error = {}, None
    try:
        with pytest.raises(OutOfMemoryError) as raised:
            train(cfg, log=lambda _: None, progress=False, card=False)
        e = raised.value
        weights = [load_file(str(out / "checkpoints" / f"step-{s}" / "trainable.safetensors")) for s in (1, 2)]
        outcome = dict(
            said=_said(str(e)), kinds=(isinstance(e, MemoryError), isinstance(e, TrainingError)),
            left=sorted(p.name for p in out.iterdir() if p.name in ("final", "run.json", "checkpoints")),
            committed=sorted(p.name for p in (out / "checkpoints").iterdir()),
            finite=all(bool(torch.isfinite(t).all()) for w in weights for t in w.values()))
        monkeypatch.delenv(faults.ENV)  # memory enough again: the run resumes from step 2 to the end
        outcome["resumed"] = train({**cfg, "resume": True}, log=lambda _: None, progress=False,
                                   card=False).summary["steps"]
    except Exception as exc:  # counted as lost below, then raised
        error = exc
    batch = " with a larger grad_accum, the same 12 examples a step (batch_size: 3, grad_accum: 4)"
    expected = dict(said=dict(where="out of memory at step 3", tips=list(TIPS), batch=batch,
                              kept="Checkpoints up to step 2 are intact (resume: true continues from it)."),
                    kinds=(True, True), left=["checkpoints"], committed=["step-1", "step-2"], finite=True, resumed=4)
    ok = error is None and outcome == expected
    tally(KIND, survived=ok, lost=0 if ok else 1, detail="oom@step#3 dpo, checkpoints every step")
    if error is not None:
        raise error
    assert outcome == expected


@pytest.mark.parametrize(("method", "fault", "where"), [
    ("sft", "oom@model.load#1", "out of memory while loading the model"),
    ("dpo", "oom@reference.precompute#1", "out of memory in the reference precompute"),
    ("grpo", "oom@rollout#2", "out of memory at step 2"),
])
def test_the_cli_prints_one_line(method, fault, where, tiny_models, pair_file, tmp_path, monkeypatch, capsys):
    from prefalign.cli import main

    args = ["prefalign", "train", "--method", method, "--model", str(tiny_models["llama"]), "-o", str(tmp_path / "run"),
            "--no-progress", "max_steps=3", "batch_size=2", "kl_every=0", "report_to=none"]
    if method != "grpo":
        args += ["--data", str(pair_file)] + (["reference=precompute"] if method == "dpo" else [])
    else:
        args += ["--prompts", str(pair_file), "--reward", f"{HERE.parent / 'fixtures' / 'rewards.py'}:length",
                 "samples_per_prompt=2", "max_new_tokens=4", "ppo_epochs=1"]
    monkeypatch.setattr(sys, "argv", args)
    monkeypatch.setenv(faults.ENV, fault)
    try:
        with pytest.raises(SystemExit) as exited:
            main()
    except BaseException:  # not the one clear error: tallied as lost, then raised
        tally(KIND, survived=False, lost=1, detail=f"{fault} {method} (CLI)")
        raise
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    tips = _said(lines[0].removeprefix("error: "))["tips"] if lines else []
    ok = exited.value.code == 1 and len(lines) == 1 and lines[0].startswith(f"error: {where} (fault injected")
    ok = ok and "Traceback" not in err and tips == list(TIPS) and not (tmp_path / "run" / "final").exists()
    tally(KIND, survived=ok, lost=0 if ok else 1, detail=f"{fault} {method} (CLI)")
    assert exited.value.code == 1 and "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith(f"error: {where} (fault injected"), err
    assert tips == list(TIPS) and not (tmp_path / "run" / "final").exists()
    if method == "grpo":  # RL has no grad_accum: its own ways to smaller steps
        assert "a smaller batch_size (prompts per rollout), max_new_tokens or a larger num_minibatches" in lines[0]


def test_what_counts_as_out_of_memory():
    """The allocators' own failures (raised here for real where they can be) are out of memory; other
    errors, and the error prefalign already explained, are not."""
    try:
        torch.empty(2**62, dtype=torch.uint8)  # more than any address space: the CPU allocator's error
    except RuntimeError as e:
        cpu = e
    yes = [cpu, MemoryError(), torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
           RuntimeError("MPS backend out of memory"), OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))]
    no = [ValueError("bad"), RuntimeError("shape mismatch"), OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
          OutOfMemoryError("out of memory at step 1")]
    assert [out_of_memory(e) for e in yes] == [True] * len(yes), cpu
    assert [out_of_memory(e) for e in no] == [False] * len(no)
