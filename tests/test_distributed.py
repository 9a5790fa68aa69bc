"""Several processes on PyTorch's own engines (DDP, FSDP2), on this CPU with the gloo backend: the
same config gives the same optimisation whatever the process count (losses and final weights to
1e-5), checkpoints resume on another count (a process that dies: tests/faults/test_rank_kill.py). Every run
is the real CLI in its own processes (torchrun)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import held_out_pairs, learnable_pairs, unpaired_from, write_jsonl

# lr large enough that three steps move every weight well past the 1e-5 the tests compare at
BASE = ["max_steps=3", "batch_size=4", "learning_rate=1e-3", "lr_schedule=constant", "kl_every=0", "seed=3"]


def _train(out, model, data, *overrides, nproc=1, method="dpo", timeout=240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "prefalign", "train", "--method", method, "--model", str(model), "--data", str(data),
           "-o", str(out), "--no-progress", *BASE, *overrides] + (["--nproc", str(nproc)] if nproc > 1 else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def _losses(out) -> dict[int, float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _weights(out) -> dict[str, torch.Tensor]:
    files = [f for f in ("model.safetensors", "adapter_model.safetensors") if (out / "final" / f).exists()]
    return load_file(str(out / "final" / files[0]))


def _assert_same_run(a, b, initial: dict[str, torch.Tensor] | None = None):
    la, lb = _losses(a), _losses(b)
    assert la.keys() == lb.keys() and len(la) == 3
    for step in la:
        assert abs(la[step] - lb[step]) < 1e-5, (step, la[step], lb[step])
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5, rtol=0), (k, (wa[k] - wb[k]).abs().max())
    # each rank computed its share, not the whole batch again: the tokens add up to one process's
    ta, tb = (json.loads((d / "run.json").read_text())["tokens"] for d in (a, b))
    assert ta == tb, (ta, tb)
    if initial is not None:  # the comparison means something only if training moved the weights
        moved = max(float((wa[k] - initial[k]).abs().max()) for k in wa if k in initial)
        assert moved > 1e-3, moved


@pytest.fixture(scope="module")
def model(tiny_models):
    return tiny_models["llama"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The one-process run several tests compare with, made once per set of arguments (each costs a
    process start and a training run)."""
    made: dict[tuple, object] = {}

    def run(model, data, *overrides, method="dpo"):
        key = (str(model), str(data), method, overrides)
        if key not in made:
            made[key] = tmp_path_factory.mktemp("one")
            _train(made[key], model, data, *overrides, method=method)
        return made[key]
    return run


def test_ddp_dpo_two_processes_equal_one(model, pair_file, tmp_path):
    """DPO, full fine-tune, reference precomputed by the two ranks in halves: the same table, the same
    losses, the same weights. grad_accum 2: gradients reduced once a step, on the last micro-batch.
    eval_data (every process evaluates) and the KL monitor (rank 0 samples) give one process's values."""
    one, two = tmp_path / "one", tmp_path / "two"
    held_out = write_jsonl(tmp_path / "eval.jsonl", held_out_pairs(learnable_pairs(), 8))
    args = ("reference=precompute", "grad_accum=2", f"eval_data={held_out}", "eval_every=3", "kl_every=3",
            "kl_prompts=4", "kl_max_new_tokens=8")
    _train(one, model, pair_file, *args)
    run = _train(two, model, pair_file, *args, nproc=2)
    assert "2 processes (ddp)" in run.stdout + run.stderr
    _assert_same_run(one, two, load_file(str(model / "model.safetensors")))
    last = [json.loads(x) for x in ((d / "metrics.jsonl").read_text().splitlines()[-1] for d in (one, two))]
    watched = [k for k in last[0] if k.startswith(("eval/", "kl/"))]
    assert "eval/loss" in watched and "kl/policy_ref_token" in watched, watched
    for k in watched:
        assert abs(last[0][k] - last[1][k]) < 1e-5, (k, last[0][k], last[1][k])
    ta, tb = (load_file(str(d / "ref_logps.safetensors"))["logps"] for d in (one, two))
    assert torch.allclose(ta, tb, atol=1e-6, rtol=0)
    assert json.loads((two / "run.json").read_text())["processes"] == 2
    # rank 0 alone writes: one metrics row per step (and step 0's eval), not one per process
    assert [json.loads(x)["step"] for x in (two / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3]


def test_ddp_sft_lora_two_processes_equal_one(model, tmp_path):
    """SFT's loss is a token mean over the whole batch: each rank divides by the batch's mean length
    over all ranks, not its own. Completions of unequal length make a per-rank mean differ."""
    rows = [{"prompt": f"I watched film {i}", "completion": " it was" + " good" * (1 + i % 5) + "."}
            for i in range(16)]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    one, two = tmp_path / "one", tmp_path / "two"
    _train(one, model, data, "lora=true", method="sft")
    _train(two, model, data, "lora=true", method="sft", nproc=2)
    _assert_same_run(one, two)


@pytest.mark.parametrize("method", ["kto", "reward"])
def test_ddp_kto_and_reward_two_processes_equal_one(method, model, pair_file, tmp_path):
    """KTO's KL reference point is a mean over the whole micro-batch (each rank's share summed over
    the ranks); a reward model's forward is its scalar head, behind the same DDP module."""
    data = pair_file
    if method == "kto":
        data = write_jsonl(tmp_path / "kto.jsonl", unpaired_from(learnable_pairs()))
    one, two = tmp_path / "one", tmp_path / "two"
    _train(one, model, data, "grad_accum=2", method=method)
    _train(two, model, data, "grad_accum=2", method=method, nproc=2)
    _assert_same_run(one, two, load_file(str(model / "model.safetensors")))


def test_fsdp_dpo_two_processes_equal_one(model, pair_file, one_process, tmp_path):
    """FSDP2 (fully_shard per decoder layer, then the rest) on gloo: torch 2.13's gloo backend has
    the all-gather and reduce-scatter FSDP2 needs. Weights, gradients and AdamW state are sharded;
    final/ holds whole tensors with the tied embedding written once, as one process writes it."""
    one, two = one_process(model, pair_file, "reference=precompute", "grad_accum=2"), tmp_path / "two"
    run = _train(two, model, pair_file, "reference=precompute", "grad_accum=2", "distributed=fsdp", nproc=2)
    assert "2 processes (fsdp)" in run.stdout + run.stderr
    _assert_same_run(one, two, load_file(str(model / "model.safetensors")))


@pytest.mark.parametrize(("first", "then", "lora"), [((2, "ddp"), (1, "ddp"), True), ((1, "ddp"), (2, "fsdp"), True),
                                                    ((2, "fsdp"), (1, "ddp"), False)])
def test_resume_across_process_counts(first, then, lora, model, pair_file, one_process, tmp_path):
    """A run checkpointed at step 2 with one process count (and strategy) resumes with another and
    logs the losses of a run never interrupted."""
    split = tmp_path / "split"
    common = ("max_steps=4", "reference=precompute", f"lora={str(lora).lower()}")
    whole = one_process(model, pair_file, *common)
    # FSDP2 gathered into the whole format (auto would shard: 2 -> 1 sharded is test_checkpoint_sharded's)
    fmt = ("checkpoint_format=whole",) if first[1] == "fsdp" else ()
    _train(split, model, pair_file, *common, *fmt, "save_every=2", "max_steps=2", f"distributed={first[1]}",
           nproc=first[0])
    assert (split / "checkpoints" / "step-2" / "trainable.safetensors").exists()  # auto under ddp: whole too
    _train(split, model, pair_file, *common, "resume=true", f"distributed={then[1]}", nproc=then[0])
    a, b = _losses(whole), _losses(split)
    assert sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])


def test_accelerate_launch_runs_the_same_training(model, pair_file, one_process, tmp_path):
    """`accelerate launch` sets the environment torchrun sets: the same two processes, the same run."""
    one, two = one_process(model, pair_file, "reference=precompute", "grad_accum=2"), tmp_path / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "prefalign", "train",
           "--method", "dpo", "--model", str(model), "--data", str(pair_file), "-o", str(two), "--no-progress",
           *BASE, "reference=precompute", "grad_accum=2"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "2 processes (ddp)" in run.stdout + run.stderr
    _assert_same_run(one, two, load_file(str(model / "model.safetensors")))


def test_nproc_checks_the_config_before_starting_processes(model, pair_file, tmp_path):
    cmd = [sys.executable, "-m", "prefalign", "train", "--method", "dpo", "--model", str(model), "--data",
           str(pair_file), "-o", str(tmp_path / "run"), *BASE, "batch_size=3", "--nproc", "2"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "batch_size 3 is the global micro-batch" in run.stderr, run.stderr[-2000:]
    assert "starting 2 processes" not in run.stdout + run.stderr
