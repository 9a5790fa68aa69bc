"""DeepSpeed ZeRO-2/3 (`distributed: deepspeed`, through accelerate) on this CPU with gloo: 2 processes
equal 1 at the same global batch (losses and final weights to 1e-5), checkpoints (prefalign's whole
safetensors, written through DeepSpeed's safe_get_full_* functions) resume across process counts
and strategies, the NaN guard stops a ZeRO run as it stops one process. The real runs need deepspeed
(not in the CI environment: they skip there); without it, `distributed: deepspeed` is a clear
error before any work."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import held_out_pairs, learnable_pairs, nan_model, write_jsonl
from prefalign.errors import ConfigError
from test_distributed import BASE, _losses, _train, _weights

COMMON = ("max_steps=4", "reference=precompute", "grad_accum=2")
HAVE_DEEPSPEED = __import__("importlib").util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAVE_DEEPSPEED, reason="deepspeed is not installed (pip install deepspeed)")


@pytest.fixture(scope="module")
def model(tiny_models):
    return tiny_models["llama"]


@pytest.mark.skipif(HAVE_DEEPSPEED, reason="deepspeed is installed here")
def test_without_deepspeed_it_is_a_config_error_before_any_process_starts(model, pair_file, tmp_path):
    cmd = [sys.executable, "-m", "prefalign", "train", "--method", "dpo", "--model", str(model), "--data",
           str(pair_file), "-o", str(tmp_path / "run"), *BASE, "distributed=deepspeed", "--nproc", "2"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    assert "distributed: deepspeed needs the deepspeed package" in run.stderr
    assert "pip install deepspeed --no-build-isolation" in run.stderr
    assert "starting 2 processes" not in run.stdout + run.stderr and not (tmp_path / "run").exists()


def test_bf16_autocast_under_the_engine_is_refused_on_a_gpu_only():
    """DeepSpeed's engine turns an outer CUDA autocast off: bf16 there would silently run in fp32."""
    from prefalign.train.deepspeed import check_precision

    with pytest.raises(ConfigError, match="precision: fp32"):
        check_precision(True, torch.device("cuda", 0))
    check_precision(False, torch.device("cuda", 0))
    check_precision(True, torch.device("cpu"))  # CPU autocast is left on by the engine


def test_a_launcher_that_disagrees_with_the_config_is_an_error(monkeypatch):
    from prefalign.train import deepspeed
    from prefalign.train.methods import make_config

    cfg = make_config(method="dpo", model="m", data="d", output="o", distributed="deepspeed", deepspeed_stage=3)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    with pytest.raises(ConfigError, match="--zero_stage 2, but the config's deepspeed_stage is 3"):
        deepspeed.check(cfg)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match="--use_deepspeed, but the config says distributed: ddp"):
        deepspeed.check(make_config(method="dpo", model="m", data="d", output="o"))
    with pytest.raises(ConfigError, match="deepspeed_stage is for distributed: deepspeed, not fsdp"):
        make_config(method="dpo", model="m", data="d", output="o", distributed="fsdp", deepspeed_stage=2)


def _assert_same_losses(a, b, steps):
    la, lb = _losses(a), _losses(b)
    for step in steps:
        assert abs(la[step] - lb[step]) < 1e-5, (step, la[step], lb[step])


_RUNS: dict[str, object] = {}  # runs shared by the tests of this module, each made once


def _common(factory) -> tuple[str, ...]:
    """COMMON and held-out pairs, scored every 2 steps (ZeRO-3 evaluates through the engine)."""
    if "eval" not in _RUNS:
        _RUNS["eval"] = write_jsonl(factory.mktemp("eval") / "eval.jsonl", held_out_pairs(learnable_pairs(), 8))
    return (*COMMON, f"eval_data={_RUNS['eval']}", "eval_every=2")


def _one_process(model, pair_file, factory):
    """The uninterrupted run: one process (its config says fsdp with sharded checkpoints, which one
    process trains plainly and writes as one shard file), a checkpoint at step 2."""
    if "one" not in _RUNS:
        _RUNS["one"] = factory.mktemp("one") / "run"
        _train(_RUNS["one"], model, pair_file, *_common(factory), "distributed=fsdp", "checkpoint_format=sharded",
               "save_every=2", "keep_checkpoints=5")
    return _RUNS["one"]


def _zero(stage, model, pair_file, factory):
    """The same config under ZeRO-`stage` on 2 processes, a checkpoint at step 2: ZeRO-2 launched by
    `accelerate launch --use_deepspeed --zero_stage 2`, ZeRO-3 by `prefalign train --nproc 2`."""
    if f"zero{stage}" not in _RUNS:
        out = factory.mktemp(f"zero{stage}") / "run"
        args = (*_common(factory), "distributed=deepspeed", f"deepspeed_stage={stage}", "save_every=2",
                "keep_checkpoints=5")
        if stage == 2:
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--zero_stage", "2",
                   "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend",
                   "no", "-m", "prefalign", "train", "--method", "dpo", "--model", str(model), "--data",
                   str(pair_file), "-o", str(out), "--no-progress", *BASE, *args]
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
            assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        else:
            run = _train(out, model, pair_file, *args, nproc=2)
        assert f"DeepSpeed ZeRO-{stage} engine over 2 processes" in run.stdout + run.stderr
        _RUNS[f"zero{stage}"] = out
    return _RUNS[f"zero{stage}"]


@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_two_processes_equal_one(stage, model, pair_file, tmp_path_factory):
    """The same DPO config, full fine-tune, grad_accum 2, under ZeRO-2 (accelerate launch) and ZeRO-3
    (torchrun) equals one process in every loss and final weight (ZeRO-3's final/ gathered from the
    partitions), and the weights moved."""
    one = _one_process(model, pair_file, tmp_path_factory)
    out = _zero(stage, model, pair_file, tmp_path_factory)
    _assert_same_losses(one, out, [1, 2, 3, 4])
    wa, wb, initial = _weights(one), _weights(out), load_file(str(model / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5, rtol=0), (k, (wa[k] - wb[k]).abs().max())
    assert max(float((wa[k] - initial[k]).abs().max()) for k in wa) > 1e-3
    rows = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, out)]
    # grad_norm: DeepSpeed's, over every partition before clipping, is torch's clip_grad_norm_'s
    norms = [[r["grad_norm"] for r in run if "grad_norm" in r] for run in rows]
    assert len(norms[0]) == 4 and norms[0] == pytest.approx(norms[1], rel=1e-4)
    evals = [[r["eval/loss"] for r in run if "eval/loss" in r] for run in rows]  # steps 0, 2, 4
    assert len(evals[0]) == 3 and evals[0] == pytest.approx(evals[1], abs=1e-5)
    # each process computed its share of the batch: the tokens add up to one process's
    assert json.loads((one / "run.json").read_text())["tokens"] == json.loads((out / "run.json").read_text())["tokens"]


@needs_deepspeed
def test_zero3_lora_two_processes_equal_one(model, pair_file, tmp_path):
    """LoRA under ZeRO-3: the frozen base is partitioned too; final/ holds the adapters only,
    gathered from the partitions, equal to one process's."""
    one, two = tmp_path / "one", tmp_path / "two"
    _train(one, model, pair_file, *COMMON, "lora=true")
    _train(two, model, pair_file, *COMMON, "lora=true", "distributed=deepspeed", "deepspeed_stage=3", nproc=2)
    _assert_same_losses(one, two, [1, 2, 3, 4])
    wa, wb = _weights(one), _weights(two)
    assert wa.keys() == wb.keys() and all("lora_" in k for k in wa)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5, rtol=0), (k, (wa[k] - wb[k]).abs().max())


@needs_deepspeed
def test_zero_checkpoints_resume_on_one_process_and_back(model, pair_file, tmp_path_factory, tmp_path):
    """ZeRO-3's step-2 checkpoint (whole tensors assembled from the partitions) resumes on one process
    (distributed: ddp); one process's step-2 checkpoint (a DCP shard file) resumes under ZeRO-2. Both
    log the losses of the run never interrupted."""
    one = _one_process(model, pair_file, tmp_path_factory)
    zero3_step2 = _zero(3, model, pair_file, tmp_path_factory) / "checkpoints" / "step-2"
    assert sorted(p.name for p in zero3_step2.iterdir()) == ["checksums.json", "state.json", "state.safetensors",
                                                             "trainable.safetensors"]

    to_one, to_zero = tmp_path / "to_one", tmp_path / "to_zero"
    for src, dst in ((zero3_step2, to_one), (one / "checkpoints" / "step-2", to_zero)):
        shutil.copytree(src, dst / "checkpoints" / "step-2")
    run = _train(to_one, model, pair_file, *_common(tmp_path_factory), "resume=true")
    assert "resumed from checkpoints/step-2" in run.stdout + run.stderr
    run = _train(to_zero, model, pair_file, *_common(tmp_path_factory), "resume=true", "distributed=deepspeed", nproc=2)
    assert "resumed from checkpoints/step-2" in run.stdout + run.stderr
    for d in (to_one, to_zero):
        _assert_same_losses(one, d, [3, 4])


@needs_deepspeed
def test_zero_skips_non_finite_steps_and_stops(tiny_models, tmp_path):
    """A model whose every loss is NaN: each step is skipped (DeepSpeed does not update, the guard
    counts), and max_bad_steps in a row stop the run, as with one process."""
    nan_model(tiny_models["llama"], tmp_path / "nan_model")
    data = write_jsonl(tmp_path / "pairs.jsonl", learnable_pairs())
    cmd = [sys.executable, "-m", "prefalign", "train", "--method", "dpo", "--model", str(tmp_path / "nan_model"),
           "--data", str(data), "-o", str(tmp_path / "run"), "--no-progress", *BASE, "max_steps=20",
           "max_bad_steps=2", "reference=copy", "distributed=deepspeed", "--nproc", "2"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 1 and "2 non-finite steps in a row" in run.stdout + run.stderr, run.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in rows] == [1, 2]


def test_plan_refuses_zero_over_several_gpus_and_plans_one(model, pair_file):
    """`prefalign plan` has no model of ZeRO's memory (its fp32 master partition, its buckets): it says
    so over several GPUs, and plans one process (which trains without DeepSpeed) as usual."""
    from prefalign.bench.planner import plan
    from prefalign.train.methods import make_config

    cfg = make_config(method="dpo", model=str(model), data=str(pair_file), output="o", distributed="deepspeed",
                      deepspeed_stage=3)
    with pytest.raises(ConfigError, match="plan does not model DeepSpeed ZeRO-3: plan with --strategy fsdp"):
        plan(cfg, device="cpu", runtime=0, device_memory=2**40, gpus=2)
    assert plan(cfg, device="cpu", runtime=0, device_memory=2**40, gpus=1)["plans"][0]["fits"]
