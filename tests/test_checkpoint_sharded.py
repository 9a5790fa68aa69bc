"""Sharded FSDP2 checkpoints (torch.distributed.checkpoint, safetensors files): each rank writes only
its own shards, and the checkpoint resumes on another process count and strategy with the losses of a
run never interrupted. Real runs of the CLI on gloo (torchrun), as in test_distributed.py."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open

from test_distributed import _losses, _train

COMMON = ("max_steps=4", "reference=precompute", "lora=false")


def _pieces(shards) -> list[dict[str, tuple[list[int], torch.Tensor]]]:
    """Each shard file's tensors: name -> (offsets in the whole tensor, the piece)."""
    files = sorted(shards.glob("*.safetensors"))
    out = []
    for f in files:
        with safe_open(str(f), "pt") as h:
            offsets = json.loads(h.metadata()["DCP_SHARDING_INFO"])
            out.append({k: (offsets[k]["saved_offsets"], h.get_tensor(k)) for k in h.keys()})
    return out


def _assert_each_rank_wrote_its_half(two_proc: list[dict], one_proc: list[dict]):
    """The 2-process checkpoint's two files hold complementary row ranges of every sharded tensor
    (FSDP2 shards dim 0), never a whole one, and together equal the 1-process checkpoint's tensors."""
    assert len(two_proc) == 2 and len(one_proc) == 1
    whole = {k: t for k, (_, t) in one_proc[0].items()}
    assert {k for f in two_proc for k in f} == whole.keys()
    assert any(k.startswith("optimizer.") and k.endswith(".exp_avg") for k in whole)
    for k, t in whole.items():
        held = [f[k] for f in two_proc if k in f]
        if t.ndim == 0:  # AdamW's step count: the same on every rank, written once
            assert len(held) == 1 and float(held[0][1]) == float(t) == 2.0, (k, held)
            continue
        assert len(held) == 2, (k, "a rank wrote no piece of it")
        (off0, a), (off1, b) = sorted(held, key=lambda x: x[0][0])
        assert off0[0] == 0 and off1[0] == a.shape[0] and a.shape[0] + b.shape[0] == t.shape[0], (k, off0, off1)
        assert a.shape[0] < t.shape[0] and b.shape[0] < t.shape[0], (k, "a rank wrote the whole tensor")
        assert torch.allclose(torch.cat([a, b]), t, atol=1e-5, rtol=0), (k, (torch.cat([a, b]) - t).abs().max())


@pytest.fixture(scope="module")
def model(tiny_models):
    return tiny_models["llama"]


def _load_error(path, model) -> str:
    """The TrainingError a one-process load of checkpoint `path` raises."""
    from prefalign.errors import TrainingError
    from prefalign.models.load import load_model
    from prefalign.train.checkpoint import load_checkpoint
    from prefalign.train.config import RunConfig
    from prefalign.train.loop import build_optimizer

    net = load_model(str(model))
    _, optimizer, scheduler = build_optimizer(RunConfig(model=str(model), output=str(path)), net)
    with pytest.raises(TrainingError) as e:
        load_checkpoint(path, net, optimizer, scheduler)
    return str(e.value)


def test_sharded_checkpoints_resume_across_process_counts(model, pair_file, tmp_path):
    """A 1-process run with sharded checkpoints (one file, whole tensors) is the uninterrupted run;
    2 FSDP2 processes with checkpoint_format auto write step 2 as shards (each rank its half of every
    tensor, nothing gathered; state.json names both files); 1 process (plain) resumes from those
    shards, and 2 FSDP2 processes resume from the 1-process shards: every resumed loss equals the
    uninterrupted run's. A shard file missing from step 2 is a TrainingError on load. A `step-3.tmp`
    (the folder of a save killed half-way) beside step 2 is not resumed from and is removed on resume."""
    whole, two, to_one, to_two = (tmp_path / d for d in ("whole", "two", "to_one", "to_two"))
    sharded = ("distributed=fsdp", "checkpoint_format=sharded", "save_every=2", "keep_checkpoints=5")
    _train(whole, model, pair_file, *COMMON, *sharded)
    _train(two, model, pair_file, *COMMON, "distributed=fsdp", "save_every=2", "max_steps=2", nproc=2)  # auto
    step2 = two / "checkpoints" / "step-2"
    assert sorted(p.name for p in step2.iterdir()) == ["checksums.json", "shards", "state.json",
                                                       "state.safetensors"]  # auto: sharded
    files = ["shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors"]
    assert json.loads((step2 / "state.json").read_text())["shard_files"] == files
    _assert_each_rank_wrote_its_half(_pieces(step2 / "shards"), _pieces(whole / "checkpoints" / "step-2" / "shards"))

    # a shard file lost (or written on another node's disk): the file state.json names is missing;
    # without that record (an older checkpoint), the pieces left do not cover the tensors
    broken = tmp_path / "lost" / "step-2"
    shutil.copytree(step2, broken)
    (broken / "shards" / files[0]).unlink()
    assert f"{files[0]} is missing" in _load_error(broken, model)
    info = json.loads((broken / "state.json").read_text())
    (broken / "state.json").write_text(json.dumps({k: v for k, v in info.items() if k != "shard_files"}))
    assert "a shard file is missing" in _load_error(broken, model)

    shutil.copytree(two, to_one)
    half_done = to_one / "checkpoints" / "step-3.tmp"  # as if the processes died while saving step 3
    shutil.copytree(step2, half_done)
    (half_done / "shards" / files[1]).unlink()
    run = _train(to_one, model, pair_file, *COMMON, "resume=true")  # distributed: ddp, one process
    assert "resumed from checkpoints/step-2" in run.stdout + run.stderr
    assert not half_done.exists()

    (to_two / "checkpoints").mkdir(parents=True)
    shutil.copytree(whole / "checkpoints" / "step-2", to_two / "checkpoints" / "step-2")
    _train(to_two, model, pair_file, *COMMON, "resume=true", "distributed=fsdp", nproc=2)

    expected = _losses(whole)
    for run_dir in (to_one, to_two):
        got = _losses(run_dir)
        for step in (3, 4):
            assert abs(expected[step] - got[step]) < 1e-5, (run_dir.name, step, expected[step], got[step])
    assert abs(expected[2] - _losses(two)[2]) < 1e-5


def test_sharded_format_is_refused_where_nothing_is_sharded():
    from prefalign.errors import ConfigError
    from prefalign.train.methods import make_config

    with pytest.raises(ConfigError, match="checkpoint_format: sharded writes FSDP2 shards; distributed: ddp"):
        make_config(method="dpo", model="m", data="d", output="o", checkpoint_format="sharded")
    make_config(method="dpo", model="m", data="d", output="o", checkpoint_format="sharded", distributed="fsdp")


def test_a_sharded_checkpoint_of_another_model_is_a_clear_error(tiny_models, tmp_path):
    """One process, no launcher: a full fine-tune's shards do not fit a LoRA run's parameters."""
    from prefalign.errors import TrainingError
    from prefalign.models.load import add_lora, load_model
    from prefalign.train.checkpoint import load_checkpoint, save_checkpoint
    from prefalign.train.config import RunConfig
    from prefalign.train.loop import build_optimizer

    cfg = RunConfig(model=str(tiny_models["llama"]), output=str(tmp_path))
    full = load_model(str(tiny_models["llama"]))
    _, optimizer, scheduler = build_optimizer(cfg, full)
    path = save_checkpoint(tmp_path, 1, 1, full, optimizer, scheduler, {}, keep=2, shards=True)
    lora = add_lora(load_model(str(tiny_models["llama"])), {"r": 4})
    _, optimizer, scheduler = build_optimizer(cfg, lora)
    with pytest.raises(TrainingError, match="cannot be loaded into this run.*Missing key in checkpoint.*lora_A"):
        load_checkpoint(path, lora, optimizer, scheduler)


def test_a_checkpoint_with_an_empty_parameter_group_still_loads(tiny_models, tmp_path):
    """build_optimizer used to keep an empty no-decay group for a LoRA run (no 1-D trainable
    parameters), and the schedule a learning rate for it; it leaves it out now (DeepSpeed drops it).
    Such a checkpoint loads into today's optimizer: weights, AdamW state and schedule."""
    from prefalign.models.load import add_lora, load_model
    from prefalign.train.checkpoint import load_checkpoint, save_checkpoint
    from prefalign.train.config import RunConfig
    from prefalign.train.loop import build_optimizer, lr_lambda

    cfg = RunConfig(model=str(tiny_models["llama"]), output=str(tmp_path), warmup_steps=5, learning_rate=1e-2)
    old = add_lora(load_model(str(tiny_models["llama"])), {"r": 4})
    trained = [p for p in old.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": trained, "weight_decay": 0.0}, {"params": [], "weight_decay": 0.0}],
                                  lr=cfg.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    for _ in range(2):
        old(torch.arange(12).view(2, 6)).logits.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    path = save_checkpoint(tmp_path, 2, 2, old, optimizer, scheduler, {}, keep=2)

    new = add_lora(load_model(str(tiny_models["llama"])), {"r": 4})
    _, optimizer2, scheduler2 = build_optimizer(cfg, new)
    assert len(optimizer2.param_groups) == 1
    load_checkpoint(path, new, optimizer2, scheduler2)
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()[:1] == [cfg.learning_rate * 3 / 6]
    scheduler.step()
    scheduler2.step()
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()[:1]
    names = [n for n, p in new.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, trained, [p for p in new.parameters() if p.requires_grad], strict=True):
        assert torch.equal(a, b), name
        assert torch.equal(optimizer.state[a]["exp_avg"], optimizer2.state[b]["exp_avg"]), name


def _tiny(tiny_models, tmp_path):
    from prefalign.models.load import load_model
    from prefalign.train.config import RunConfig
    from prefalign.train.loop import build_optimizer

    net = load_model(str(tiny_models["llama"]))
    return (net, *build_optimizer(RunConfig(model=str(tiny_models["llama"]), output=str(tmp_path)), net)[1:])


def test_a_killed_save_is_never_a_checkpoint_and_the_next_save_removes_it(tiny_models, tmp_path, monkeypatch):
    """A save that fails after trainable.safetensors is written (state.json cannot be written) leaves a
    step-2.tmp and no step-2: step 1 stays the newest checkpoint. The next save removes step-2.tmp.
    A committed save fsyncs its files, its folder, and the checkpoints folder after the rename."""
    from prefalign.train.checkpoint import WholeTensors, list_checkpoints, save_checkpoint

    class DiesWhileSaving(WholeTensors):
        def gather(self, model, optimizer, keep):
            weights, optim = super().gather(model, optimizer, keep)
            groups = [{**g, "unwritable": lambda: None} for g in optim["param_groups"]]
            return weights, {**optim, "param_groups": groups}

    net, optimizer, scheduler = _tiny(tiny_models, tmp_path)
    save_checkpoint(tmp_path, 1, 1, net, optimizer, scheduler, {}, keep=5)
    with pytest.raises(TypeError, match="not JSON serializable"):
        save_checkpoint(tmp_path, 2, 2, net, optimizer, scheduler, {}, keep=5, tensors=DiesWhileSaving())
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-1", "step-2.tmp"]
    assert (ckpts / "step-2.tmp" / "trainable.safetensors").exists() and list_checkpoints(tmp_path) == [1]

    synced, fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), fsync(fd)))
    save_checkpoint(tmp_path, 3, 3, net, optimizer, scheduler, {}, keep=5)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-1", "step-3"]
    tmp = f"{ckpts}/step-3.tmp"
    assert synced == [f"{tmp}/trainable.safetensors", f"{tmp}/state.safetensors", f"{tmp}/state.json",
                      f"{tmp}/checksums.json", tmp, str(ckpts)]


def test_a_sharded_save_before_any_update_makes_up_no_optimizer_state(tiny_models, tmp_path):
    """Every step before the first save skipped (the NaN guard): AdamW has no state. The sharded save
    leaves it without (torch's state_dict API would take a step with lr 0, and AdamW's step count
    would read one more than the updates made); the load gives the weights and no state either."""
    from prefalign.train.checkpoint import load_checkpoint, save_checkpoint

    net, optimizer, scheduler = _tiny(tiny_models, tmp_path)
    with torch.no_grad():
        next(net.parameters()).add_(1.0)
    path = save_checkpoint(tmp_path, 1, 1, net, optimizer, scheduler, {}, keep=2, shards=True)
    assert len(optimizer.state) == 0
    net2, optimizer2, scheduler2 = _tiny(tiny_models, tmp_path)
    load_checkpoint(path, net2, optimizer2, scheduler2)
    assert len(optimizer2.state) == 0
    for (name, a), b in zip(net.named_parameters(), net2.parameters(), strict=True):
        assert torch.equal(a, b), name
    for m, o in ((net, optimizer), (net2, optimizer2)):
        m(torch.arange(12).view(2, 6)).logits.pow(2).mean().backward()
        o.step()
    assert [float(s["step"]) for s in optimizer2.state.values()] == [1.0] * len(optimizer.state)


def test_sharded_needs_a_torch_with_hugging_face_storage(monkeypatch):
    """On a torch without HuggingFaceStorageWriter: `sharded` is a ConfigError naming the version it
    needs, `auto` falls back to whole checkpoints (under FSDP2 with 2 processes it is sharded)."""
    import torch.distributed.checkpoint as dcp

    from prefalign.errors import ConfigError
    from prefalign.runtime.distributed import World
    from prefalign.train.checkpoint import sharded_format
    from prefalign.train.config import RunConfig

    two = World(rank=0, size=2)
    auto, explicit = (RunConfig(model="m", output="o", distributed="fsdp", checkpoint_format=f)
                      for f in ("auto", "sharded"))
    assert sharded_format(auto, two) and not sharded_format(auto, World())
    assert not sharded_format(RunConfig(model="m", output="o"), two)  # ddp: whole
    monkeypatch.delattr(dcp, "HuggingFaceStorageWriter")
    assert not sharded_format(auto, two)
    with pytest.raises(ConfigError, match=r"checkpoint_format: sharded needs torch >= 2\.9"):
        sharded_format(explicit, two)
