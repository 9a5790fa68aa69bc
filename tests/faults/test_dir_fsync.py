"""A folder made for checkpoints is durable before anything is committed into it (docs/reliability.md,
"Checkpoints"): creating `checkpoints/` (and the run folder) fsyncs the folder that holds it, and a
sharded save fsyncs `shards/` (DCP fsyncs its files, not their folder entries). Checked on real saves
with os.fsync wrapped to record which path each fsynced descriptor is."""

from __future__ import annotations

import os

from prefalign.storage import make_dirs


def _record(monkeypatch) -> list[str]:
    synced, fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), fsync(fd)))
    return synced


def _tiny(tiny_models, out):
    from prefalign.models.load import load_model
    from prefalign.train.config import RunConfig
    from prefalign.train.loop import build_optimizer

    net = load_model(str(tiny_models["llama"]))
    return (net, *build_optimizer(RunConfig(model=str(tiny_models["llama"]), output=str(out)), net)[1:])


def test_new_folders_are_fsynced_in_their_parents(tmp_path, monkeypatch):
    synced = _record(monkeypatch)
    make_dirs(tmp_path / "a" / "b" / "c")
    assert synced == [str(tmp_path), str(tmp_path / "a"), str(tmp_path / "a" / "b")]
    synced.clear()
    make_dirs(tmp_path / "a" / "b" / "c")  # nothing new: nothing to sync
    assert synced == []


def test_the_first_save_fsyncs_the_run_folder_and_a_sharded_one_its_shards(tiny_models, tmp_path, monkeypatch):
    from prefalign.train.checkpoint import save_checkpoint
    from prefalign.train.lock import run_lock

    out = tmp_path / "new" / "run"
    synced = _record(monkeypatch)
    with run_lock(out, log=lambda _: None):  # the run folder, made by the run's lock
        assert synced[:2] == [str(tmp_path), str(tmp_path / "new")]
    net, optimizer, scheduler = _tiny(tiny_models, out)
    synced.clear()
    save_checkpoint(out, 1, 1, net, optimizer, scheduler, {}, keep=5)
    ckpts, tmp = out / "checkpoints", f"{out}/checkpoints/step-1.tmp"
    assert synced == [str(out), f"{tmp}/trainable.safetensors", f"{tmp}/state.safetensors", f"{tmp}/state.json",
                      f"{tmp}/checksums.json", tmp, str(ckpts)]  # checkpoints/ made: the run folder first

    synced.clear()
    save_checkpoint(out, 2, 2, net, optimizer, scheduler, {}, keep=5, shards=True)
    tmp = f"{ckpts}/step-2.tmp"
    ours = [p for p in synced if not p.startswith(f"{tmp}/shards/")]  # DCP's own fsyncs of its files
    assert ours == [f"{tmp}/shards", f"{tmp}/state.safetensors", f"{tmp}/state.json", f"{tmp}/checksums.json",
                    tmp, str(ckpts)], synced
