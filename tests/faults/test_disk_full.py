"""A full disk while prefalign writes (docs/reliability.md, "Checkpoints, caches and full disks"): a
checkpoint, metrics.jsonl, the reference cache, final/, curate's and split's outputs. Each write kind is
aimed at a real small filesystem (a tmpfs mounted for the test with just less room than the write needs;
where mount is refused, as in an unprivileged container, the write runs in a subprocess under
RLIMIT_FSIZE, so it fails with EFBIG). Every time: a StorageError naming the file, the bytes being written
and the bytes free; no half-written file left; what was there before intact (the previous checkpoint
resumes to the uninterrupted run's losses). The `nospace` fail point aims at the same writes inside a
whole run, and the CLI prints the error as one line."""

from __future__ import annotations

import gc
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import ckptkit
import pytest
import torch
from ckptkit import resume, steps_lost
from faultkit import sample, tally

from conftest import learnable_pairs, write_jsonl
from prefalign import faults
from prefalign.data.curate import CurateConfig, SplitConfig, curate, split
from prefalign.errors import StorageError
from prefalign.models.load import load_model
from prefalign.models.reference import read_cache, write_cache
from prefalign.storage import verify_checksums
from prefalign.train.checkpoint import save_checkpoint
from prefalign.train.config import RunConfig
from prefalign.train.loop import RunLog, build_optimizer
from prefalign.train.methods import make_config
from prefalign.train.run import train

HERE = Path(__file__).resolve().parent
CACHE = "ref_logps.safetensors"
# the write each kind aims at, and the room left for it: less than it needs, more than anything written
# before it (a checkpoint: trainable.safetensors, 128 kB, fits and state.safetensors, 263 kB, does not)
ROOM = {"checkpoint": 190_000, "sharded checkpoint": 190_000, "final": 64_000, "reference cache": 100_000,
        "metrics": 8_000, "curate": 64_000, "split": 64_000}
OLD = "an earlier run's output\n"


def _mount(path: Path, size: int) -> bool:
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def _can_mount() -> bool:
    with tempfile.TemporaryDirectory() as d:
        if os.geteuid() != 0 or not _mount(Path(d), 1 << 16):
            return False
        subprocess.run(["umount", d], check=True)
        return True


# PREFALIGN_FAULTS_NO_MOUNT=1: the RLIMIT_FSIZE fallback even where mount works (to test it)
MOUNT = os.environ.get("PREFALIGN_FAULTS_NO_MOUNT") != "1" and _can_mount()


@contextmanager
def small_disk(work: Path, room: int):
    """`work`'s files with `room` bytes left for more: copied onto a tmpfs remounted to what they use plus
    `room`, and back when done; yields (the folder to write in, None). Where mount is refused: (work,
    room as the RLIMIT_FSIZE of the subprocess that writes)."""
    if not MOUNT:
        yield work, room
        return
    disk = work.with_name(work.name + "-disk")
    disk.mkdir()
    assert _mount(disk, 64 << 20)
    try:
        shutil.copytree(work, disk, dirs_exist_ok=True)
        used = shutil.disk_usage(disk).used
        subprocess.run(["mount", "-o", f"remount,size={used + room}", str(disk)], check=True)
        yield disk, None
        shutil.rmtree(work)
        shutil.copytree(disk, work, symlinks=True)  # what the write left, for the checks after
    finally:
        gc.collect()  # tensors a failed run left (safetensors maps the files it loads) let go of the disk
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode:
            subprocess.run(["umount", "--lazy", str(disk)], check=True)  # detached: gone when the last map is
        disk.rmdir()


def act(kind: str, work: str, spec: dict) -> dict:
    """The write `kind` aims at, into `work`; what it raised (in a subprocess too: the RLIMIT_FSIZE fallback)."""
    work_dir = Path(work)
    try:
        if kind in ("checkpoint", "final"):  # a resumed run: steps 3 and 4, then the save (or only final/)
            train(make_config(**{**spec["config"], "output": str(work_dir / "run"), "resume": True}),
                  log=lambda _: None, progress=False)
        elif kind == "sharded checkpoint":  # one process's DCP file: weights and AdamW state, 377 kB
            save_checkpoint(work_dir, 2, 2, *_stepped(spec["model"]), {}, keep=2, shards=True)
        elif kind == "reference cache":
            write_cache(work_dir / CACHE, torch.arange(100_000.0).view(-1, 2), "new")
        elif kind == "metrics":
            cfg = make_config(method="dpo", model="m", data="d", output=str(work_dir), report_to="none")
            log = RunLog(work_dir, None, cfg=cfg, log=lambda _: None)
            for step in range(1, 100):
                log.write({"step": step, "loss": 1 / step, "note": "x" * 300})
        elif kind == "curate":
            cfg = CurateConfig(dedup=False, conflicts="keep")  # every record kept: out.jsonl is the big one
            curate(spec["input"], work_dir / "out.jsonl", work_dir / "out.quarantine.jsonl", cfg)
        else:
            split(spec["input"], work_dir / "split", SplitConfig(eval_fraction=0.2))
    except Exception as e:
        return {"error": type(e).__name__, "message": str(e)}
    return {"error": None, "message": ""}


def _stepped(model: str) -> tuple:
    """(a tiny model, its AdamW after one step, the schedule): what a sharded save writes."""
    net = load_model(model)
    _, optimizer, scheduler = build_optimizer(RunConfig(model=model, output="unused"), net)
    net(torch.arange(12).view(2, 6)).logits.pow(2).mean().backward()
    optimizer.step()
    return net, optimizer, scheduler


def _limit(size: int):
    def apply() -> None:  # in the child, before exec: an ignored SIGXFSZ stays ignored through exec
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so a write over the limit fails with EFBIG, not a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))
    return apply


def run_act(kind: str, work: Path, spec: dict, limit: int | None) -> dict:
    if limit is None:
        return act(kind, str(work), spec)
    code = (f"import json, sys; sys.path[:0] = [{str(HERE)!r}, {str(HERE.parent)!r}]\n"
            f"from test_disk_full import act\nprint(json.dumps(act({kind!r}, {str(work)!r}, {spec!r})))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, preexec_fn=_limit(limit),
                       timeout=300)
    try:  # a crash is an outcome like any other: the test tallies it before it asserts
        return json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else \
            {"error": f"exit status {r.returncode}", "message": r.stderr[-2000:]}
    except (ValueError, IndexError):
        return {"error": "no result", "message": (r.stdout + r.stderr)[-2000:]}


def _prepare(kind: str, work: Path, run: Path, spec: dict) -> None:
    """What is there before the write: a run killed after step 2 (checkpoint), one whose final/ was not
    written (final), an earlier cache, or an earlier run's outputs (curate, split)."""
    if kind in ("checkpoint", "final"):
        shutil.copytree(run, work / "run")
        drop = ["final", "run.json"] + (["checkpoints/step-4", "checkpoints/step-6"] if kind == "checkpoint" else [])
        for name in drop:
            shutil.rmtree(work / "run" / name) if (work / "run" / name).is_dir() else (work / "run" / name).unlink()
    elif kind == "sharded checkpoint":
        save_checkpoint(work, 1, 1, *_stepped(spec["model"]), {}, keep=2, shards=True)
    elif kind == "reference cache":
        write_cache(work / CACHE, torch.ones(4, 2), "old")
    elif kind in ("curate", "split"):
        names = ["out.jsonl", "out.quarantine.jsonl"] if kind == "curate" else ["split/train.jsonl", "split/eval.jsonl"]
        for name in names:
            (work / name).parent.mkdir(exist_ok=True)
            (work / name).write_text(OLD)


def _named(kind: str) -> str:
    return {"checkpoint": "checkpoints/step-4", "sharded checkpoint": "checkpoints/step-2", "final": "run/final",
            "reference cache": CACHE, "metrics": "metrics.jsonl", "curate": "out.jsonl", "split": "split/"}[kind]


def _left_behind(kind: str, work: Path) -> list[str]:
    """Files a reader could take for good that are not whole: temporaries, a .tmp checkpoint, a final/
    without its weights, a metrics line cut short, an earlier output replaced."""
    bad = [str(p.relative_to(work)) for p in work.rglob("*") if p.name.endswith(".tmp")]
    if kind == "checkpoint":
        ckpts = work / "run" / "checkpoints"
        bad += [] if sorted(p.name for p in ckpts.iterdir()) == ["step-2"] else ["checkpoints other than step-2"]
        bad += [] if verify_checksums(ckpts / "step-2") is None else ["step-2 no longer verifies"]
    if kind == "sharded checkpoint":
        ckpts = work / "checkpoints"
        bad += [] if sorted(p.name for p in ckpts.iterdir()) == ["step-1"] else ["checkpoints other than step-1"]
        bad += [] if verify_checksums(ckpts / "step-1") is None else ["step-1 no longer verifies"]
    if kind == "final" and (work / "run" / "final").exists():
        bad.append("final/")
    if kind == "reference cache" and read_cache(work / CACHE, "old", log=lambda _: None) is None:
        bad.append("the earlier cache")
    if kind == "metrics":
        text = (work / "metrics.jsonl").read_text()
        try:
            steps = [json.loads(x)["step"] for x in text.splitlines()]
        except ValueError:
            steps = None
        bad += [] if text.endswith("\n") and steps == list(range(1, len(steps) + 1)) else ["a metrics line cut"]
    if kind in ("curate", "split"):
        names = ["out.jsonl", "out.quarantine.jsonl"] if kind == "curate" else ["split/train.jsonl", "split/eval.jsonl"]
        bad += [n for n in names if not (work / n).exists() or (work / n).read_text() != OLD]
    return bad


@pytest.fixture(scope="module")
def big_input(tmp_path_factory) -> Path:
    """~275 kB of pairs (1938 distinct): curate and split write more than ROOM."""
    return write_jsonl(tmp_path_factory.mktemp("big") / "pairs.jsonl", learnable_pairs(3000))


@pytest.mark.parametrize("kind", sample(list(ROOM), 4, seed=16))
def test_a_full_disk_is_a_clear_error_and_leaves_nothing_half_written(kind, tiny_models, tmp_path_factory,
                                                                      tmp_path, big_input):
    run, cfg = ckptkit.straight(tiny_models, tmp_path_factory)
    spec = {"config": cfg.model_dump(mode="json", exclude={"output"}), "input": str(big_input),
            "model": str(tiny_models["llama"])}
    work = tmp_path / "work"
    work.mkdir()
    _prepare(kind, work, run, spec)
    with small_disk(work, ROOM[kind]) as (where, limit):
        result = run_act(kind, where, spec, limit)
    message, left, lost = result["message"], ["(not checked)"], 1
    clear = (result["error"] == "StorageError" and _named(kind) in message and "bytes to write" in message
             and "bytes free" in message)
    try:
        left = _left_behind(kind, work)
        lost = len(left)
        if kind in ("checkpoint", "final") and not left:  # room made: the run goes on from what was kept
            logs = resume(cfg, work / "run")
            lost += steps_lost(work / "run", run) + (not (work / "run" / "final" / "model.safetensors").exists())
            clear = clear and ("resumed from checkpoints/step-2" in logs if kind == "checkpoint" else True)
    finally:
        tally("disk full", survived=clear and lost == 0, lost=lost, detail=f"{kind}: {message[:200]}")
    assert clear, result
    assert not left, left
    assert lost == 0


@pytest.mark.parametrize("rule", sample(["nospace@metrics.write#5", "nospace@reference.cache.write#1",
                                         "nospace@checkpoint.write#2", "nospace@final.write#1"], 1, seed=16))
def test_the_nospace_fail_point_inside_a_whole_run(rule, tiny_models, tmp_path_factory, tmp_path, monkeypatch):
    """ENOSPC at one write of a whole run (`nospace` fail point): a StorageError naming it; the run resumes
    (room made) to the uninterrupted run's losses."""
    run, cfg = ckptkit.straight(tiny_models, tmp_path_factory)
    out = tmp_path / "run"
    monkeypatch.setenv(faults.ENV, rule)
    error = None
    try:
        train(cfg.model_copy(update={"output": str(out)}), log=lambda _: None, progress=False)
    except StorageError as e:
        error = str(e)
    monkeypatch.delenv(faults.ENV)
    lost = 6
    try:
        if error:
            resume(cfg, out)
            lost = steps_lost(out, run) + (not (out / "final" / "model.safetensors").exists())
    finally:
        tally("disk full", survived=bool(error) and "bytes to write" in error and lost == 0, lost=lost,
              detail=f"{rule}: {error}")
    assert error and "bytes to write" in error, error
    assert lost == 0


def test_a_metrics_line_cut_short_does_not_break_resume(tiny_models, tmp_path_factory, tmp_path):
    """A last line cut by a full disk (an older prefalign wrote rows in pieces): the resume drops it with a note."""
    run, cfg = ckptkit.straight(tiny_models, tmp_path_factory)
    out = tmp_path / "run"
    shutil.copytree(run, out)
    shutil.rmtree(out / "checkpoints" / "step-6")
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "loss": 0.69')
    logs, lost = [], 6
    try:
        logs = resume(cfg, out)
        lost = steps_lost(out, run)
    finally:
        noted = any("dropped 1 line(s) that do not parse" in x for x in logs)
        tally("disk full", survived=noted and lost == 0, lost=lost, detail="metrics.jsonl's last line cut short")
    assert noted and lost == 0, logs


def test_the_cli_prints_a_full_disk_as_one_line(tmp_path, big_input):
    work = tmp_path / "work"
    work.mkdir()
    with small_disk(work, ROOM["curate"]) as (where, limit):
        args = ["data", "curate", str(big_input), "-o", str(where / "out.jsonl"), "--no-dedup", "--conflicts", "keep"]
        r = subprocess.run([sys.executable, "-m", "prefalign", *args], capture_output=True, text=True, timeout=120,
                           preexec_fn=_limit(limit) if limit else None)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    one_line = r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ") and "out.jsonl" in lines[0]
    tally("disk full", survived=one_line and not list(work.iterdir()), lost=len(list(work.iterdir())),
          detail=f"prefalign data curate: {r.stderr.strip()[:200]}")
    assert one_line, r.stderr
    assert not list(work.iterdir())
