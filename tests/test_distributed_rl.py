"""PPO, RLOO and GRPO over several processes (DDP, gloo on this CPU): each process samples and updates
on its share of the prompts, and statistics of the whole rollout (advantage whitening, score
normalisation, the running score moments, the KL controller's input) come from every share. The
statistics are checked against one process holding the whole rollout; runs end to end through the
CLI, and resume on another process count."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import write_jsonl
from prefalign.losses.ppo import whiten
from prefalign.runtime.distributed import World
from prefalign.train.methods import make_config
from prefalign.train.ppo import RunningMoments, shape_scores


def _rollout(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 6, generator=g) * 3 + 1
    mask = (torch.rand(8, 6, generator=g) > 0.3).float()
    mask[:, 0] = 1  # every completion has a token
    raw = torch.randn(8, generator=g) * 2 + 0.5
    return x, mask, raw


def _statistics(x, mask, raw, reduce):
    cfg = make_config(method="ppo", model="m", prompts="p", reward="r", output="o", reward_norm="batch")
    running = make_config(method="ppo", model="m", prompts="p", reward="r", output="o", reward_norm="running")
    moments = RunningMoments()  # two rollouts folded into the running moments
    shape_scores(running, raw, torch.ones_like(raw, dtype=torch.bool), mask.sum(-1), moments, reduce)
    shaped = shape_scores(running, raw * 2 - 1, torch.ones_like(raw, dtype=torch.bool), mask.sum(-1), moments, reduce)
    return {"whiten": whiten(x, mask, reduce=reduce),
            "batch_norm": shape_scores(cfg, raw, torch.ones_like(raw, dtype=torch.bool), mask.sum(-1),
                                       RunningMoments(), reduce),
            "running": shaped, "moments": torch.tensor([moments.mean, moments.var, moments.count])}


def _worker(rank: int, size: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size)
    world = World(rank, size, rank)
    x, mask, raw = _rollout()
    share = slice(rank * 4, (rank + 1) * 4)
    got = _statistics(x[share], mask[share], raw[share], world.reduce)
    torch.save(got, f"{out}.{rank}")
    dist.destroy_process_group()


def test_statistics_of_the_whole_rollout_from_every_share(tmp_path):
    mp.spawn(_worker, args=(2, f"file://{tmp_path}/pg", str(tmp_path / "r")), nprocs=2, join=True)
    x, mask, raw = _rollout()
    whole = _statistics(x, mask, raw, None)
    parts = [torch.load(tmp_path / f"r.{r}") for r in range(2)]
    for key in ("whiten", "batch_norm", "running"):
        got = torch.cat([p[key] for p in parts])
        assert torch.allclose(got, whole[key], atol=1e-5, rtol=1e-5), (key, (got - whole[key]).abs().max())
    for p in parts:
        assert torch.allclose(p["moments"], whole["moments"], atol=1e-5, rtol=1e-5), (p["moments"], whole["moments"])
    # the shares' own statistics differ: without `reduce`, whitening would be per process
    alone = whiten(x[:4], mask[:4])
    assert not torch.allclose(alone, whole["whiten"][:4], atol=1e-3)


def _rl(out, model, prompts, *args, nproc=1, method="ppo"):
    cmd = [sys.executable, "-m", "prefalign", "train", "--method", method, "--model", str(model), "--prompts",
           str(prompts), "--reward", "prefalign.judges.sentiment:positive", "-o", str(out), "--no-progress",
           "batch_size=4", "max_new_tokens=8", "kl_every=0", "lr_schedule=constant", *args]
    cmd += ["--nproc", str(nproc)] if nproc > 1 else []
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


@pytest.mark.parametrize(("method", "args"), [("ppo", ("reward_norm=batch",)), ("grpo", ()),
                                             ("ppo", ("critic=model", "lora=true", "kl_every=2"))])
def test_rl_on_two_processes_resumes_on_one(method, args, tiny_models, tmp_path):
    """Two processes train 2 rollouts (PPO: value head, whitened GAE, batch-normalised scores; or a
    LoRA critic model, whose every trainable parameter must get a gradient under DDP, with rank 0's
    KL monitor), rank 0 writes; one process resumes from their checkpoint and trains 2 more."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"I watched film {i} and"} for i in range(16)])
    out = tmp_path / method
    run = _rl(out, tiny_models["llama"], prompts, "max_steps=2", "save_every=2", *args, nproc=2, method=method)
    assert "2 processes (ddp)" in run.stdout + run.stderr
    assert json.loads((out / "run.json").read_text())["processes"] == 2
    _rl(out, tiny_models["llama"], prompts, "max_steps=4", "resume=true", *args, method=method)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


NAN_ON_RANK_1 = """
import math, os

calls = []


def reward(prompts, completions):
    calls.append(1)
    bad = os.environ.get("RANK") == "1" and len(calls) == 1
    return [math.nan if bad else float(len(c)) for c in completions]
"""


def test_a_non_finite_reward_in_one_process_skips_the_rollout_in_all(tiny_models, tmp_path):
    """Rank 1's judge returns NaN on the first rollout, rank 0's does not: both skip it (were rank 0
    to update alone, it would wait for rank 1 in DDP's reduction until the timeout)."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"I watched film {i} and"} for i in range(16)])
    judge = tmp_path / "judge.py"
    judge.write_text(NAN_ON_RANK_1)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "prefalign", "train", "--method", "grpo", "--model", str(tiny_models["llama"]),
           "--prompts", str(prompts), "--reward", f"{judge}:reward", "-o", str(out), "--no-progress", "batch_size=4",
           "max_new_tokens=8", "kl_every=0", "max_steps=2", "--nproc", "2"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "non-finite rewards (here, or in another process); rollout skipped" in run.stdout + run.stderr
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in rows] == [1, 1] and "loss" in rows[1] and "loss" not in rows[0]
