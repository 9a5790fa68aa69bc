"""Checkpoints: `checkpoints/step-N/` folders that resume on any process count and strategy.

Two formats; a run resumes from either, whatever its own strategy and process count:

- whole (`trainable.safetensors` + `state.pt`): rank 0 gathers every trainable tensor and its AdamW
  state and writes the files of a one-process run, the optimizer state keyed by parameter name.
  Simple, but rank 0 must hold the trainable weights and their optimizer state in host memory.
- sharded (`shards/`, FSDP2): every rank writes only its own shards with torch.distributed.checkpoint
  (DCP), in safetensors files (torch's Hugging Face storage layout: one file per rank, each tensor
  piece with its offsets in the file's metadata); nothing is gathered. On load DCP reads, on each
  rank, the pieces of the checkpoint that cover that rank's own shards: it reshards, so 2 processes
  resume on 1 (or 4) and a plain or DDP run resumes from an FSDP2 one. `state.pt` holds what is not
  sharded: the optimizer's parameter groups (by name), the schedule, the RNG.

Both: `state.json` (step, data position, what an update adds), and the same commit point: every
file goes into `step-N.tmp/`, which rank 0 renames to `step-N/` once all are written, so a folder
named step-N is always complete and a save killed half-way leaves only a `.tmp` no resume reads.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from ..errors import TrainingError
from ..runtime.distributed import World
from .config import RunConfig
from .parallel import full, shard_like, sharded

SHARDS = "shards"  # the sharded format's DCP folder: only DCP's safetensors files are in it


def sharded_format(cfg: RunConfig, world: World) -> bool:
    """Whether this run writes sharded checkpoints (config.py: checkpoint_format)."""
    if cfg.checkpoint_format == "auto":
        return cfg.distributed == "fsdp" and world.active
    return cfg.checkpoint_format == "sharded"


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


def _load_whole(path: Path, model, optimizer, tensors: WholeTensors) -> dict[str, Any]:
    # weights_only: the state file holds tensors and plain containers, never arbitrary objects
    state = torch.load(path / "state.pt", weights_only=True)
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


def _dcp_tensors(model, optimizer) -> tuple[dict[str, Tensor], list[dict[str, Any]]]:
    """This rank's trainable weights and AdamW state as DCP sees them (FSDP2: DTensor shards, which
    DCP writes piece by piece; a plain model: whole tensors) under the names of the whole format,
    and the optimizer's parameter groups (by name). Both come from torch's own state_dict API, which
    also gives a fresh optimizer its (zero) state, so that a resume has tensors to load into."""
    opts = StateDictOptions(ignore_frozen_params=True, strict=False)
    weights, optim = get_state_dict(model, optimizer, options=opts)
    # named_parameters names a tied weight once (an embedding that is also the output head):
    # safetensors refuses two names for one tensor, and one is all a load needs
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    out = {n: t for n, t in weights.items() if n in trainable}
    for name, state in optim["state"].items():
        out.update({f"optimizer.{name}.{k}": v for k, v in state.items() if torch.is_tensor(v)})
    return out, optim["param_groups"]


def _save_sharded(tmp: Path, model, optimizer, world: World) -> list[dict[str, Any]]:
    """Every rank writes its own shards into tmp/shards/: no rank gathers anything."""
    tensors, groups = _dcp_tensors(model, optimizer)
    # save_distributed: one file per rank (shard-0000R-...), tensors saved as the pieces a rank holds;
    # a tensor every rank holds whole (AdamW's step count) is written once
    dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(tmp / SHARDS), save_distributed=True),
             no_dist=not world.active)
    return groups


def _load_sharded(path: Path, model, optimizer, world: World) -> dict[str, Any]:
    tensors, _ = _dcp_tensors(model, optimizer)
    try:  # in place: each rank reads the pieces that cover its own shards
        dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(path / SHARDS)), no_dist=not world.active)
    except CheckpointException as e:  # (a BaseException) every rank's trace; its last line says what is wrong
        raise TrainingError(f"{path} cannot be loaded into this run (another model, or other LoRA settings?): "
                            f"{str(e).strip().splitlines()[-1][:300]}") from e
    state = torch.load(path / "state.pt", weights_only=True)
    optim = {"state": {}, "param_groups": _drop_empty_groups(state["param_groups"], state["scheduler"])}
    for key, t in tensors.items():
        if key.startswith("optimizer."):
            name, k = key[len("optimizer."):].rsplit(".", 1)
            optim["state"].setdefault(name, {})[k] = t
    weights = {n: t for n, t in tensors.items() if not n.startswith("optimizer.")}
    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optim,
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
    return state


# ------------------------------------------------------------------ the folders


def save_checkpoint(out: Path, step: int, position: int, model, optimizer, scheduler, extra: dict, keep: int,
                    world: World = World(), shards: bool = False, tensors: WholeTensors = WholeTensors()) -> Path:
    """checkpoints/step-N/ in either format (module docstring); every rank takes part (an FSDP2
    shard is gathered, or written by its own rank), rank 0 writes the rest and commits."""
    ckpts = out / "checkpoints"
    final, tmp = ckpts / f"step-{step}", ckpts / f"step-{step}.tmp"
    if world.main:
        shutil.rmtree(tmp, ignore_errors=True)  # a save that died half-way before this one
        tmp.mkdir(parents=True)
    world.barrier()  # the folder exists before any rank writes into it
    state: dict[str, Any] = {"scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():  # sampling on a GPU draws from its generators: resume needs them too
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    if shards:
        state["param_groups"] = _save_sharded(tmp, model, optimizer, world)  # returns once every rank wrote
    elif world.main or tensors.everyone(model):  # DDP's other ranks hold the same tensors: nothing to gather
        weights, state["optimizer"] = tensors.gather(model, optimizer, world.main)
        if world.main:
            save_file(weights, str(tmp / "trainable.safetensors"))
    if world.main:
        torch.save(state, tmp / "state.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "position": position, **extra}))
        # the rename is the commit point: a folder named step-N is always complete
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(list_checkpoints(out))[:-keep] if keep > 0 else []:
            shutil.rmtree(ckpts / f"step-{old}", ignore_errors=True)
    world.barrier()  # no rank goes on before the checkpoint exists
    return final


def list_checkpoints(out: Path) -> list[int]:
    """The committed checkpoints' steps; a `step-N.tmp` (a save that did not finish) is not one."""
    ckpts = out / "checkpoints"
    if not ckpts.exists():
        return []
    return sorted(int(p.name[5:]) for p in ckpts.iterdir() if p.name.startswith("step-") and p.name[5:].isdigit())


def _read_sharded_whole(path: Path, tensors: WholeTensors, model, optimizer) -> dict[str, Any]:
    """A sharded checkpoint read whole on every rank and handed to `tensors` as the whole format's
    (a DeepSpeed run, whose ZeRO partitions torch's state_dict API does not reach)."""
    meta = HuggingFaceStorageReader(str(path / SHARDS)).read_metadata().state_dict_metadata
    whole = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()}
    dcp.load(whole, storage_reader=HuggingFaceStorageReader(str(path / SHARDS)), no_dist=True)
    state = torch.load(path / "state.pt", weights_only=True)
    optim = {"state": {}, "param_groups": _drop_empty_groups(state["param_groups"], state["scheduler"])}
    for key in [k for k in whole if k.startswith("optimizer.")]:
        name, k = key[len("optimizer."):].rsplit(".", 1)
        optim["state"].setdefault(name, {})[k] = whole.pop(key)
    tensors.scatter(model, optimizer, whole, optim)
    return state


def load_checkpoint(path: Path, model, optimizer, scheduler, world: World = World(),
                    tensors: WholeTensors = WholeTensors()) -> dict[str, Any]:
    """Weights, optimizer, schedule and RNG from either format, into a model of any strategy."""
    if (path / "trainable.safetensors").exists():
        state = _load_whole(path, model, optimizer, tensors)
    elif (path / SHARDS).is_dir() and not tensors.in_place:
        state = _read_sharded_whole(path, tensors, model, optimizer)
    elif (path / SHARDS).is_dir():
        state = _load_sharded(path, model, optimizer, world)
    else:
        raise TrainingError(f"{path} holds neither trainable.safetensors nor {SHARDS}/: not a checkpoint")
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return json.loads((path / "state.json").read_text())


def resume(cfg: RunConfig, model, optimizer, scheduler, log: Callable[[str], None],
           world: World = World(), tensors: WholeTensors = WholeTensors()) -> dict[str, Any] | None:
    """The newest checkpoint's state (weights, optimizer, schedule and RNG restored), or None. Every
    process must see the same newest one (the run folder on a filesystem they all share)."""
    out = Path(cfg.output)
    latest = list_checkpoints(out)[-1] if cfg.resume and list_checkpoints(out) else -1
    if not world.all_true(latest == world.max(latest)):
        raise TrainingError(f"the processes see different newest checkpoints in {out}: put the run folder on a "
                            "filesystem every process shares")
    if latest < 0:
        return None
    state = load_checkpoint(out / "checkpoints" / f"step-{latest}", model, optimizer, scheduler, world, tensors)
    log(f"resumed from checkpoints/step-{latest}")
    return state
