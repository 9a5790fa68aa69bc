"""Corrupted checkpoints and reference caches (docs/reliability.md, "Checkpoints, caches and full disks"):
a bit flip at a seeded offset, a truncation, an emptied or a deleted file, in every file a checkpoint
holds (whole and sharded formats, checksums.json itself) and in the reference cache, is caught by the
checksum written at save time. A resume falls back to the newest checkpoint that verifies and gives
the uninterrupted run's losses; a corrupt cache is recomputed, never used; when no checkpoint
verifies, the run stops with a TrainingError instead of starting afresh."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import ckptkit
import pytest
import torch
from ckptkit import losses, resume, steps_lost
from faultkit import FULL, sample, tally
from safetensors import safe_open

from conftest import learnable_pairs, write_jsonl
from prefalign.errors import TrainingError
from prefalign.models.reference import read_cache
from prefalign.storage import CHECKSUMS, verify_checksums
from prefalign.train.checkpoint_state import read_state
from prefalign.train.run import train

KINDS = ("bit flip", "truncated", "empty", "deleted")
WHOLE = ("trainable.safetensors", "state.safetensors", "state.json", CHECKSUMS)
SHARD = "shards/shard-00001-model-00001-of-00001.safetensors"  # the one process's DCP file
# (format, file, damage) of every checkpoint file; the sharded format's own files are the whole format's
CASES = [("whole", f, k) for f in WHOLE for k in KINDS] + [("sharded", SHARD, k) for k in KINDS]
CACHE = "ref_logps.safetensors"


def damage(path: Path, kind: str, seed: int) -> str:
    """`path` damaged as `kind` (a bit flip at a seeded offset); what was done, for the tally's detail."""
    data = path.read_bytes()
    if kind == "bit flip":
        rng = random.Random(f"{path.name}/{seed}")
        offset, bit = rng.randrange(len(data)), rng.randrange(8)
        path.write_bytes(data[:offset] + bytes([data[offset] ^ (1 << bit)]) + data[offset + 1:])
        return f"{path.name}: bit {bit} of byte {offset} of {len(data)} flipped"
    if kind == "truncated":
        path.write_bytes(data[:len(data) // 2])
        return f"{path.name}: truncated to {len(data) // 2} of {len(data)} bytes"
    if kind == "empty":
        path.write_bytes(b"")
        return f"{path.name}: emptied"
    path.unlink()
    return f"{path.name}: deleted"


@pytest.fixture(scope="module")
def straight(tiny_models, tmp_path_factory):
    """fmt -> (an uninterrupted run with checkpoints at steps 2, 4 and 6, its config); trained on first use."""
    return lambda fmt: ckptkit.straight(tiny_models, tmp_path_factory, fmt)


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def test_every_damage_to_every_checkpoint_file_is_detected(straight, tmp_path):
    """The whole matrix, without training: each damaged copy of step-6 fails its checksum, naming the file."""
    for i, (fmt, name, kind) in enumerate(CASES):
        step = _copy(straight(fmt)[0] / "checkpoints" / "step-6", tmp_path / str(i))
        detail = damage(step / name, kind, seed=i)
        problem = verify_checksums(step)
        named = problem is not None and (Path(name).name in problem or CHECKSUMS in problem)
        tally("corrupt checkpoint", survived=named, lost=int(problem is None), detail=detail)
        assert problem is not None, detail
        assert named, (detail, problem)
    assert verify_checksums(straight("whole")[0] / "checkpoints" / "step-6") is None


@pytest.mark.parametrize(("fmt", "name", "kind"), sample(CASES, 2, seed=16))
def test_resume_falls_back_to_the_newest_good_checkpoint(straight, tmp_path, fmt, name, kind):
    """step-6 damaged: the resume says so, loads step-4, moves step-6 aside and retrains steps 5 and 6
    to the uninterrupted run's losses (1e-6)."""
    run, cfg = straight(fmt)
    out = _copy(run, tmp_path / "run")
    detail = damage(out / "checkpoints" / "step-6" / name, kind, seed=0)
    logs, lost = [], 6
    try:
        logs = resume(cfg, out)
        lost = steps_lost(out, run)
    finally:
        fell_back = any(x.startswith("resumed from checkpoints/step-4 (step-6 failed its checksum") for x in logs)
        tally("corrupt checkpoint", survived=fell_back and lost == 0, lost=lost, detail=detail)
    assert fell_back, logs
    assert lost == 0, (losses(out), losses(run))
    ckpts = out / "checkpoints"
    assert (ckpts / "step-6.corrupt").is_dir() and verify_checksums(ckpts / "step-6") is None  # saved again


def test_no_checkpoint_that_verifies_is_an_error_not_a_fresh_start(straight, tmp_path):
    run, cfg = straight("whole")
    out = _copy(run, tmp_path / "run")
    details = [damage(out / "checkpoints" / f"step-{s}" / "state.safetensors", "bit flip", seed=s) for s in (2, 4, 6)]
    rows = (out / "metrics.jsonl").read_text()
    error, untouched = None, False
    try:
        resume(cfg, out)
    except TrainingError as e:
        error = str(e)
    finally:  # no fresh start: metrics.jsonl and the checkpoints as they were
        untouched = (out / "metrics.jsonl").read_text() == rows and sorted(
            p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4", "step-6"]
        tally("corrupt checkpoint", survived=error is not None and untouched, lost=0 if error else 6,
              detail="every checkpoint's state.safetensors flipped", count=3)
    assert error and "no checkpoint" in error and "step-6: state.safetensors does not match its sha256" in error
    assert "resume: false" in error and untouched, details


def test_a_checkpoint_from_before_checksums_still_loads(straight, tmp_path):
    """An older prefalign's checkpoint (state.pt, no checksums.json) loads, with a note, and resumes exactly."""
    run, cfg = straight("whole")
    out = _copy(run, tmp_path / "run")
    shutil.rmtree(out / "checkpoints" / "step-6")
    step = out / "checkpoints" / "step-4"
    info = json.loads((step / "state.json").read_text())
    torch.save(read_state(step, info), step / "state.pt")  # the old layout, as torch.save wrote it
    for name in ("state.safetensors", CHECKSUMS):
        (step / name).unlink()
    (step / "state.json").write_text(json.dumps({k: v for k, v in info.items() if k not in ("scheduler", "optimizer")}))
    logs = resume(cfg, out)
    assert any(f"{CHECKSUMS} (an older prefalign wrote it): loaded unverified" in x for x in logs), logs
    assert "resumed from checkpoints/step-4" in logs
    got, want = losses(out), losses(run)
    assert sorted(got) == sorted(want) and all(abs(got[s] - want[s]) < 1e-6 for s in want), (got, want)


CACHE_CASES = [("bit flip", s) for s in range(6)] + [("truncated", 0), ("empty", 0)]


def test_a_corrupt_reference_cache_is_never_used(straight, tmp_path):
    """Each damaged copy of the cache reads as None, with `corrupt` logged; the intact one reads back."""
    cache = straight("whole")[0] / CACHE
    with safe_open(str(cache), "pt") as f:
        fp = f.metadata()["fingerprint"]
    assert read_cache(cache, fp, log=lambda m: None) is not None
    for kind, seed in CACHE_CASES:
        copy = tmp_path / f"{kind}-{seed}" / CACHE
        copy.parent.mkdir()
        shutil.copy(cache, copy)
        detail, logs = damage(copy, kind, seed), []
        table = read_cache(copy, fp, log=logs.append)
        caught = table is None and any("is corrupt" in x and "recomputing" in x for x in logs)
        tally("corrupt reference cache", survived=caught, lost=int(table is not None), detail=detail)
        assert caught, (detail, logs)


@pytest.mark.parametrize(("kind", "seed"), sample(CACHE_CASES, 1, seed=16))
def test_a_run_recomputes_a_corrupt_cache(straight, tmp_path, kind, seed):
    """A fresh run over a damaged cache recomputes it and trains to the uninterrupted run's losses."""
    run, cfg = straight("whole")
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(run / CACHE, out / CACHE)
    detail, logs, lost = damage(out / CACHE, kind, seed), [], 6
    try:
        train(cfg.model_copy(update={"output": str(out)}), log=logs.append, progress=False)
        lost = steps_lost(out, run)
    finally:
        recomputed = any("is corrupt" in x for x in logs) and any("reference log-probs: computed" in x for x in logs)
        tally("corrupt reference cache", survived=recomputed and lost == 0, lost=lost, detail=detail)
    assert recomputed and lost == 0, logs
    # the cache written again is the uninterrupted run's (its header's key order is safetensors' own)
    assert _cache(out / CACHE) == _cache(run / CACHE)


def _cache(path: Path) -> tuple[dict, list]:
    with safe_open(str(path), "pt") as f:
        return f.metadata(), f.get_tensor("logps").tolist()


@pytest.mark.skipif(not FULL, reason="two processes under torchrun: make faults")
def test_two_processes_fall_back_to_the_same_checkpoint(tiny_models, tmp_path):
    """Rank 0 verifies, every rank loads what it chose: step-3 damaged, both resume from step-2 and
    retrain step 3 to the uninterrupted two-process run's loss."""
    from test_distributed import _losses, _train

    data = write_jsonl(tmp_path / "pairs.jsonl", learnable_pairs(16))
    args = ("save_every=1", "keep_checkpoints=3", "reference=precompute")
    _train(tmp_path / "straight", tiny_models["llama"], data, *args, nproc=2)
    out = _copy(tmp_path / "straight", tmp_path / "run")
    detail = damage(out / "checkpoints" / "step-3" / "trainable.safetensors", "bit flip", seed=2)
    run, lost = None, 3
    try:
        run = _train(out, tiny_models["llama"], data, *args, "resume=true", nproc=2)
        got, want = _losses(out), _losses(tmp_path / "straight")
        lost = sum(abs(got.get(s, float("inf")) - want[s]) > 1e-5 for s in want)
    finally:
        said = run is not None and "resumed from checkpoints/step-2 (step-3 failed its checksum" in (
            run.stdout + run.stderr)
        tally("corrupt checkpoint", survived=said and lost == 0, lost=lost, detail=f"2 processes: {detail}")
    assert said and lost == 0


@pytest.mark.parametrize("name", [CHECKSUMS, "state.safetensors"])
def test_a_read_error_is_not_corruption(straight, tmp_path, name):
    """A file of step-6 that cannot be read (a real EIO: a link to /proc/self/mem, whose offset 0 is never
    mapped) is no verdict on the checkpoint: the resume stops with a TrainingError naming the file, and
    nothing is moved aside or trained (a good checkpoint quarantined for a flaky read would be lost)."""
    from prefalign.storage import _own_sum

    run, cfg = straight("whole")
    out = _copy(run, tmp_path / "run")
    step = out / "checkpoints" / "step-6"
    if name != CHECKSUMS:  # the manifest must agree on its size (0), so that only the read fails
        manifest = json.loads((step / CHECKSUMS).read_text())
        manifest["checksums"][name]["bytes"] = 0
        manifest["self_sha256"] = _own_sum(manifest["checksums"])
        (step / CHECKSUMS).write_text(json.dumps(manifest))
    (step / name).unlink()
    (step / name).symlink_to("/proc/self/mem")
    rows, error = (out / "metrics.jsonl").read_text(), ""
    try:
        resume(cfg, out)
    except TrainingError as e:
        error = str(e)
    except OSError as e:
        error = f"raw {e!r}"
    untouched = (out / "metrics.jsonl").read_text() == rows and sorted(
        p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4", "step-6"]
    problems = [] if untouched else [f"moved or trained: {sorted(p.name for p in (out / 'checkpoints').iterdir())}"]
    if f"step-6/{name}: could not read it" not in error or "nothing was moved" not in error:
        problems.append(f"not a TrainingError naming the file: {error or 'no error'}")
    tally("read error (EIO)", survived=not problems, lost=int(not untouched), detail=f"{name}: EIO")
    assert not problems, problems
