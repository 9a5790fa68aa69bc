"""Checkpoints: `checkpoints/step-N/` folders that resume on any process count and strategy.

Two formats; a run resumes from either, whatever its own strategy and process count:

- whole (`trainable.safetensors` + `state.safetensors`): rank 0 gathers every trainable tensor and its AdamW
  state and writes the files of a one-process run, the optimizer state keyed by parameter name.
  Simple, but rank 0 must hold the trainable weights and their optimizer state in host memory.
- sharded (`shards/`, FSDP2): every rank writes only its own shards with torch.distributed.checkpoint
  (DCP), in safetensors files (torch's Hugging Face storage layout: one file per rank, each tensor
  piece with its offsets in the file's metadata); nothing is gathered. On load DCP reads, on each
  rank, the pieces of the checkpoint that cover that rank's own shards: it reshards, so 2 processes
  resume on 1 (or 4) and a plain or DDP run resumes from an FSDP2 one. `state.safetensors` holds
  the RNG states, which are not sharded.

Both: `state.json` (step, data position, what an update adds, and the untensored state: the schedule,
the optimizer's parameter groups by name), `checksums.json` (sha256 and size of every file, shards
too, written last), and the same commit point: every file goes into `step-N.tmp/`, which rank 0
renames to `step-N/` once all are written, so a folder named step-N is always complete and a save
killed half-way leaves only a `.tmp` no resume reads (the next save, or a resume, removes it). Rank 0
fsyncs what it writes, the folder, and after the rename `checkpoints/`. A sharded checkpoint's
state.json names every rank's file, checked on load. Nothing is pickled: a checkpoint is safetensors
and JSON (a checkpoint of an older prefalign, with `state.pt`, is still read: checkpoint_state.py).
A resume verifies checksums.json newest checkpoint first and falls back to the newest one that
verifies (a bit flip, a truncated or a lost file); a save that runs out of disk is a StorageError,
its `.tmp` removed, the checkpoints before it untouched.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from .. import faults
from ..errors import ConfigError, StorageError, TrainingError
from ..runtime.distributed import World
from ..storage import (
    CHECKSUMS,
    disk_full,
    disk_full_errno,
    file_entry,
    fsync,
    remove,
    replace_folder,
    restore_aside,
    storage_error,
    verify_checksums,
    write_checksums,
)
from .checkpoint_state import read_state, write_state
from .config import RunConfig
from .parallel import full, shard_like, sharded

SHARDS = "shards"  # the sharded format's DCP folder: only DCP's safetensors files are in it
# HuggingFaceStorageWriter(save_distributed=True) (one safetensors file per rank) first shipped in torch 2.9
SHARDED_TORCH = "2.9"


def _hf_storage():
    """torch's Hugging Face storage classes, imported here so that the whole format runs on the older
    torch pyproject allows; a torch without them (or without save_distributed) cannot shard."""
    try:
        from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
    except ImportError:
        HuggingFaceStorageWriter = None
    if HuggingFaceStorageWriter is None or "save_distributed" not in inspect.signature(
            HuggingFaceStorageWriter).parameters:
        raise ConfigError(f"checkpoint_format: sharded needs torch >= {SHARDED_TORCH} (torch.distributed.checkpoint's "
                          f"HuggingFaceStorageWriter with save_distributed); this is torch {torch.__version__}: "
                          "use checkpoint_format: whole, or upgrade torch")
    return HuggingFaceStorageWriter, HuggingFaceStorageReader


def sharded_format(cfg: RunConfig, world: World) -> bool:
    """Whether this run writes sharded checkpoints (config.py: checkpoint_format). `auto` on a torch
    too old for them writes whole ones; an explicit `sharded` there is a ConfigError."""
    if cfg.checkpoint_format == "auto":
        if not (cfg.distributed == "fsdp" and world.active):
            return False
        try:
            _hf_storage()
        except ConfigError:
            return False
        return True
    if cfg.checkpoint_format == "sharded":
        _hf_storage()
        return True
    return False


# ------------------------------------------------------------------ whole tensors, name-keyed


def _trainable(model, keep: bool = True) -> dict[str, Tensor]:
    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            t = full(p)  # a gather every rank takes part in, for an FSDP2 shard
            if keep:
                out[n] = t
    return out


def _param_names(model, optimizer) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def optimizer_state(model, optimizer, keep: bool = True) -> dict[str, Any]:
    """The optimizer's state keyed by parameter name, with whole tensors: the same file whatever the
    process count or strategy (an FSDP2 rank holds shards; torch's own dict is keyed by position).
    Every rank gathers a shard's tensors with the others; only a rank that `keep`s them holds them."""
    sd, names = optimizer.state_dict(), _param_names(model, optimizer)
    state = {}
    for i, s in sd["state"].items():
        whole = {k: full(v) if torch.is_tensor(v) else v for k, v in s.items()}
        if keep:
            state[names[i]] = whole
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]
    return {"state": state, "param_groups": groups}


def load_optimizer_state(model, optimizer, saved: dict[str, Any]) -> None:
    if any(isinstance(p, int) for g in saved["param_groups"] for p in g["params"]):  # before name-keyed state
        optimizer.load_state_dict(saved)
        return
    index = {n: i for i, n in enumerate(_param_names(model, optimizer))}
    params = dict(model.named_parameters())
    state = {index[n]: {k: shard_like(v, params[n]) if torch.is_tensor(v) and v.ndim else v for k, v in s.items()}
             for n, s in saved["state"].items()}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in saved["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


class WholeTensors:
    """How the whole format reads and writes a run's trainable tensors. With torch's optimizers: the
    parameters (an FSDP2 shard gathered, or scattered back) and `optimizer.state_dict()`; DeepSpeed's
    ZeRO keeps them in partitions of its own (train/deepspeed.py has its WholeTensors)."""

    # torch's state_dict API reaches these tensors, so DCP loads a sharded checkpoint into them in place
    in_place = True

    def everyone(self, model) -> bool:
        """Whether a gather needs every rank (DDP's rank 0 holds whole tensors itself)."""
        return sharded(model)

    def gather(self, model, optimizer, keep: bool) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """(trainable weights, name-keyed optimizer state), whole, on a rank that `keep`s them."""
        return _trainable(model, keep), optimizer_state(model, optimizer, keep)

    def scatter(self, model, optimizer, weights: dict[str, Tensor], optim: dict[str, Any]) -> None:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(shard_like(value, params[name]))
        load_optimizer_state(model, optimizer, optim)


def _load_whole(path: Path, info: dict[str, Any], model, optimizer, tensors: WholeTensors) -> dict[str, Any]:
    state = read_state(path, info)
    optim = state["optimizer"]
    optim["param_groups"] = _drop_empty_groups(optim["param_groups"], state["scheduler"])
    tensors.scatter(model, optimizer, load_file(str(path / "trainable.safetensors")), optim)
    return state


def _drop_empty_groups(groups: list[dict[str, Any]], scheduler: dict[str, Any]) -> list[dict[str, Any]]:
    """A checkpoint from before build_optimizer left out empty parameter groups (a LoRA run has no 1-D
    trainable parameters) holds one, and its schedule one learning rate per group: both without it."""
    keep = [i for i, g in enumerate(groups) if g["params"]]
    for key in ("base_lrs", "_last_lr", "lr_lambdas"):
        if isinstance(scheduler.get(key), list) and len(scheduler[key]) == len(groups):
            scheduler[key] = [scheduler[key][i] for i in keep]
    return [groups[i] for i in keep]


# ------------------------------------------------------------------ sharded (DCP)


def _dcp_tensors(model, optimizer, with_optimizer: bool = True) -> tuple[dict[str, Tensor], list[dict[str, Any]]]:
    """This rank's trainable weights and AdamW state as DCP sees them (FSDP2: DTensor shards, which
    DCP writes piece by piece; a plain model: whole tensors) under the names of the whole format,
    and the optimizer's parameter groups (by name). Both come from torch's own state_dict API, which
    also gives an optimizer without state its (zero) state by taking a step with lr 0: AdamW's step
    count then reads 1. Without `with_optimizer` (no update yet: nothing to save) only the weights."""
    opts = StateDictOptions(ignore_frozen_params=True, strict=False)
    if with_optimizer:
        weights, optim = get_state_dict(model, optimizer, options=opts)
    else:
        weights = get_model_state_dict(model, options=opts)
        optim = {"state": {}, "param_groups": optimizer_state(model, optimizer, False)["param_groups"]}
    # named_parameters names a tied weight once (an embedding that is also the output head):
    # safetensors refuses two names for one tensor, and one is all a load needs
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    out = {n: t for n, t in weights.items() if n in trainable}
    for name, state in optim["state"].items():
        out.update({f"optimizer.{name}.{k}": v for k, v in state.items() if torch.is_tensor(v)})
    return out, optim["param_groups"]


def _save_sharded(tmp: Path, model, optimizer, world: World, state: dict[str, Any]) -> tuple[list[str], dict]:
    """Every rank writes its own shards into tmp/shards/: no rank gathers anything. The files DCP
    says the ranks wrote (its metadata gathers them) must all be in rank 0's view of the folder.
    Returns them and their checksums.json entries, each file hashed by the rank that wrote it."""
    writer, _ = _hf_storage()
    # every step before the first save skipped (the NaN guard): no AdamW state, and none made up
    state["optimizer_state"] = world.any_true(len(optimizer.state) > 0)
    tensors, state["param_groups"] = _dcp_tensors(model, optimizer, state["optimizer_state"])
    # save_distributed: one file per rank (shard-0000R-...), tensors saved as the pieces a rank holds;
    # a tensor every rank holds whole (AdamW's step count) is written once
    storage, written = writer(str(tmp / SHARDS), save_distributed=True), []
    write_data = storage.write_data  # its future's results name the file(s) this rank wrote

    def record(plan, planner):
        written.append(write_data(plan, planner))
        return written[-1]

    storage.write_data = record
    try:
        dcp.save(tensors, storage_writer=storage, no_dist=not world.active)
    except CheckpointException as e:  # every rank gets every rank's failures: all stop alike
        _disk_full_in(e, tmp, world, sum(t.numel() * t.element_size() for t in tensors.values()))
        raise
    mine = sorted({r.storage_data.relative_path for w in written for r in w.value()})
    sums = {f"{SHARDS}/{f}": file_entry(tmp / SHARDS / f) for f in mine if (tmp / SHARDS / f).is_file()}
    every = [(mine, sums)]
    if world.active:
        every = [None] * world.size
        dist.all_gather_object(every, (mine, sums))
    files = sorted({f for names, _ in every for f in names})
    missing = [f for f in files if not (tmp / SHARDS / f).exists()] if world.main else []
    if world.any_true(bool(missing)):  # every rank stops, none waits in the next collective
        raise TrainingError(f"{tmp / SHARDS} lacks {', '.join(missing) or 'files other processes wrote'}: sharded "
                            "checkpoints need an output folder every node shares (or checkpoint_format: whole)")
    return files, {k: v for _, s in every for k, v in s.items()}


def _disk_full_in(e: CheckpointException, tmp: Path, world: World, needed: int) -> None:
    """A StorageError (rank 0 removing the .tmp) when a rank's DCP write failed for a full disk."""
    for exc, _ in e.failures.values():
        if disk_full_errno(exc) is not None:
            if world.main:
                remove(tmp)
            raise storage_error(tmp.with_name(tmp.name.removesuffix(".tmp")), needed, exc) from e  # step-N


def _check_shards(path: Path, recorded: list[str] | None) -> None:
    """DCP's reader takes the layout from whatever files are in shards/: a missing one would leave
    its rows at their initial values without a word. The files state.json names must be there, and
    every tensor's pieces (offsets and shapes in the files' headers) must cover the whole tensor."""
    for name in recorded or []:
        if not (path / SHARDS / name).exists():
            raise TrainingError(f"{path / SHARDS / name} is missing: the checkpoint is incomplete (a shard "
                                "file deleted, or written on another node's disk)")
    pieces: dict[str, list[tuple[list[int], list[int]]]] = {}
    for f in sorted((path / SHARDS).glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            info = json.loads((h.metadata() or {}).get("DCP_SHARDING_INFO", "{}"))
            for k in h.keys():
                shape = h.get_slice(k).get_shape()
                pieces.setdefault(k, []).append((info.get(k, {}).get("saved_offsets", [0] * len(shape)), shape))
    for k, ps in pieces.items():
        size = [max(o[i] + s[i] for o, s in ps) for i in range(len(ps[0][1]))]
        covered = sum(math.prod(s) for _, s in {(tuple(o), tuple(s)) for o, s in ps})
        if covered != math.prod(size):
            raise TrainingError(f"{path / SHARDS}: the pieces of {k} cover {covered} of its {math.prod(size)} "
                                "values: a shard file is missing")


def _optim_from(tensors: dict[str, Tensor], state: dict[str, Any]) -> dict[str, Any]:
    """The name-keyed optimizer state dict from DCP's flat `optimizer.<param>.<key>` tensors (popped)."""
    optim = {"state": {}, "param_groups": _drop_empty_groups(state["param_groups"], state["scheduler"])}
    for key in [k for k in tensors if k.startswith("optimizer.")]:
        name, k = key[len("optimizer."):].rsplit(".", 1)
        optim["state"].setdefault(name, {})[k] = tensors.pop(key)
    return optim


def _load_sharded(path: Path, info: dict[str, Any], model, optimizer, world: World) -> dict[str, Any]:
    state = read_state(path, info)
    with_optim = state.get("optimizer_state", True)
    tensors, _ = _dcp_tensors(model, optimizer, with_optim)
    try:  # in place: each rank reads the pieces that cover its own shards
        dcp.load(tensors, storage_reader=_hf_storage()[1](str(path / SHARDS)), no_dist=not world.active)
    except CheckpointException as e:  # (a BaseException) every rank's trace; its last line says what is wrong
        raise TrainingError(f"{path} cannot be loaded into this run (another model, or other LoRA settings?): "
                            f"{str(e).strip().splitlines()[-1][:300]}") from e
    optim = _optim_from(tensors, state)
    opts = StateDictOptions(ignore_frozen_params=True, strict=False)
    if with_optim:
        set_state_dict(model, optimizer, model_state_dict=tensors, optim_state_dict=optim, options=opts)
    else:  # no update before the save: the weights, and the optimizer's groups with no state
        set_model_state_dict(model, tensors, options=opts)
        load_optimizer_state(model, optimizer, optim)
    return state


# ------------------------------------------------------------------ the folders


def remove_stale_saves(out: Path) -> None:
    """step-N.tmp folders of saves killed half-way (a full AdamW state each): no resume reads them."""
    for tmp in (out / "checkpoints").glob("step-*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
    for aside in (out / "checkpoints").glob(".step-*.old"):  # a same-step save killed between its renames
        restore_aside(aside.with_name(aside.name[1:-4]))
    restore_aside(out / "final")


def _nbytes(weights: dict[str, Tensor] | None, state: dict[str, Any]) -> int:
    """What a whole save writes, near enough for a disk-full message: its tensors' bytes."""
    tensors = list((weights or {}).values()) + [state["torch_rng"]]
    tensors += [v for s in state.get("optimizer", {}).get("state", {}).values() for v in s.values()
                if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors)


def _write_files(tmp: Path, weights: dict[str, Tensor] | None, state: dict[str, Any], info: dict[str, Any],
                 sums: dict[str, dict]) -> None:
    """Rank 0's files, each fsynced, checksums.json last (its entries read back from the disk)."""
    if weights is not None:
        save_file(weights, str(tmp / "trainable.safetensors"))
        fsync(tmp / "trainable.safetensors")
    faults.point("checkpoint.write", tmp / "state.safetensors")
    info.update(write_state(tmp, state))
    (tmp / "state.json").write_text(json.dumps(info))
    for p in (tmp / "state.safetensors", tmp / "state.json"):
        fsync(p)
    write_checksums(tmp, sums)
    fsync(tmp)


def save_checkpoint(out: Path, step: int, position: int, model, optimizer, scheduler, extra: dict, keep: int,
                    world: World = World(), shards: bool = False, tensors: WholeTensors = WholeTensors()) -> Path:
    """checkpoints/step-N/ in either format (module docstring); every rank takes part (an FSDP2
    shard is gathered, or written by its own rank), rank 0 writes the rest and commits. A full disk:
    a StorageError on every rank, the .tmp removed, the checkpoints before this one untouched."""
    ckpts = out / "checkpoints"
    final, tmp = ckpts / f"step-{step}", ckpts / f"step-{step}.tmp"
    if world.main:
        remove_stale_saves(out)  # saves that died half-way before this one
        tmp.mkdir(parents=True)
    world.barrier()  # the folder exists before any rank writes into it
    state: dict[str, Any] = {"scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():  # sampling on a GPU draws from its generators: resume needs them too
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    files, sums, weights = {}, {}, None
    if shards:  # DCP fsyncs its files (FileSystemWriter's sync_files)
        files["shard_files"], sums = _save_sharded(tmp, model, optimizer, world, state)  # once every rank wrote
    elif world.main or tensors.everyone(model):  # DDP's other ranks hold the same tensors: nothing to gather
        weights, state["optimizer"] = tensors.gather(model, optimizer, world.main)
    error = None
    if world.main:
        try:
            with disk_full(final, lambda: _nbytes(weights, state), tmp):  # named as the checkpoint it was to be
                _write_files(tmp, weights, state, {"step": step, "position": position, **extra, **files}, sums)
        except Exception as e:  # any failure, not only a full disk: the other ranks wait on this answer
            error = e
    failed = world.any_true(error is not None)  # every rank learns of rank 0's failure; none waits for it
    if world.main and not failed:
        # the rename is the commit point: a folder named step-N is always complete
        faults.point("checkpoint.commit", tmp)
        replace_folder(tmp, final)  # the same step saved again (a resume): the old one aside until it is in
        for old in sorted(list_checkpoints(out))[:-keep] if keep > 0 else []:
            shutil.rmtree(ckpts / f"step-{old}", ignore_errors=True)
    world.barrier()  # no rank goes on before the checkpoint exists
    if failed:
        full = world.any_true(isinstance(error, StorageError))  # what the others say: rank 0's kind of failure
        if error is not None:
            raise error
        if full:
            raise StorageError(f"{tmp}: rank 0 could not write the checkpoint (the disk is full: its error says more)")
        raise TrainingError(f"{tmp}: rank 0 could not write the checkpoint (its error says why)")
    return final


def list_checkpoints(out: Path) -> list[int]:
    """The committed checkpoints' steps; a `step-N.tmp` (a save that did not finish) is not one."""
    ckpts = out / "checkpoints"
    if not ckpts.exists():
        return []
    return sorted(int(p.name[5:]) for p in ckpts.iterdir() if p.name.startswith("step-") and p.name[5:].isdigit())


def _read_sharded_whole(path: Path, info: dict[str, Any], tensors: WholeTensors, model, optimizer) -> dict[str, Any]:
    """A sharded checkpoint read whole on every rank and handed to `tensors` as the whole format's
    (a DeepSpeed run, whose ZeRO partitions torch's state_dict API does not reach)."""
    reader = _hf_storage()[1]
    meta = reader(str(path / SHARDS)).read_metadata().state_dict_metadata
    whole = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()}
    dcp.load(whole, storage_reader=reader(str(path / SHARDS)), no_dist=True)
    state = read_state(path, info)
    optim = _optim_from(whole, state)
    tensors.scatter(model, optimizer, whole, optim)
    return state


def load_checkpoint(path: Path, model, optimizer, scheduler, world: World = World(),
                    tensors: WholeTensors = WholeTensors()) -> dict[str, Any]:
    """Weights, optimizer, schedule and RNG from either format, into a model of any strategy."""
    info = json.loads((path / "state.json").read_text())
    if (path / "trainable.safetensors").exists():
        state = _load_whole(path, info, model, optimizer, tensors)
    elif (path / SHARDS).is_dir() and not tensors.in_place:
        _check_shards(path, info.get("shard_files"))
        state = _read_sharded_whole(path, info, tensors, model, optimizer)
    elif (path / SHARDS).is_dir():
        _check_shards(path, info.get("shard_files"))
        state = _load_sharded(path, info, model, optimizer, world)
    else:
        raise TrainingError(f"{path} holds neither trainable.safetensors nor {SHARDS}/: not a checkpoint")
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return info


def _verify(path: Path, log: Callable[[str], None]) -> str | None:
    """What is wrong with checkpoint `path` against its checksums.json, or None when it verifies (one
    of an older prefalign, with state.pt and no checksums.json, is taken with a note)."""
    if not (path / CHECKSUMS).exists() and (path / "state.pt").exists():
        log(f"note: checkpoints/{path.name} has no {CHECKSUMS} (an older prefalign wrote it): loaded unverified")
        return None
    return verify_checksums(path)


def _newest_good(out: Path, log: Callable[[str], None]) -> tuple[int, list[str]]:
    """The newest checkpoint that verifies (-1: none does) and what is wrong with each newer one. Those
    are moved aside to step-N.corrupt once a good one is found, so no later resume or save counts them;
    when none verifies, all stay where they are, for whoever restores them."""
    failed: list[tuple[Path, str]] = []
    for step in reversed(list_checkpoints(out)):
        path = out / "checkpoints" / f"step-{step}"
        problem = _verify(path, log)
        if problem is None:
            for bad, why in failed:
                remove(bad.with_name(bad.name + ".corrupt"))
                os.replace(bad, bad.with_name(bad.name + ".corrupt"))
                log(f"warning: checkpoints/{bad.name} failed its checksum ({why}): moved aside to {bad.name}.corrupt")
            return step, [f"{bad.name} failed its checksum: {why}" for bad, why in failed]
        failed.append((path, problem))
    return -1, [f"{bad.name}: {why}" for bad, why in failed]


def resume(cfg: RunConfig, model, optimizer, scheduler, log: Callable[[str], None],
           world: World = World(), tensors: WholeTensors = WholeTensors()) -> dict[str, Any] | None:
    """The newest checkpoint that verifies (weights, optimizer, schedule and RNG restored), or None when
    there is none to resume. Every process must see the same checkpoints (the run folder on a
    filesystem they all share); rank 0 verifies them and every rank loads the one it chose."""
    out = Path(cfg.output)
    sharded_format(cfg, world)  # sharded on a torch without it: the ConfigError now, not at the first save
    if world.main:
        remove_stale_saves(out)
    latest = list_checkpoints(out)[-1] if cfg.resume and list_checkpoints(out) else -1
    if not world.all_true(latest == world.max(latest)):
        raise TrainingError(f"the processes see different newest checkpoints in {out}: put the run folder on a "
                            "filesystem every process shares")
    if latest < 0:
        return None
    chosen, failed, error = -1, [], None
    if world.main:
        try:
            chosen, failed = _newest_good(out, log)
        except TrainingError as e:  # a read error: nothing moved; every rank stops with it, none waits
            error = e
    if world.any_true(error is not None):
        raise error or TrainingError(f"rank 0 could not read the checkpoints in {out} (its error says which file); "
                                     "nothing was moved: retry")
    chosen = int(world.max(chosen))  # rank 0's choice, on every rank (the others give -1)
    if chosen < 0:  # never a silent fresh start over checkpoints that exist
        raise TrainingError(f"no checkpoint in {out / 'checkpoints'} passes its checksum ("
                            f"{'; '.join(failed) or 'rank 0 says why'}): restore them, or start afresh with "
                            "resume: false or another output folder")
    state = load_checkpoint(out / "checkpoints" / f"step-{chosen}", model, optimizer, scheduler, world, tensors)
    log(f"resumed from checkpoints/step-{chosen}" + (f" ({'; '.join(failed)})" if failed else ""))
    return state
