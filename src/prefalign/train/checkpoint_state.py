"""A checkpoint's state besides its weights, in safetensors and JSON, never pickled: `state.safetensors`
holds the tensors (RNG states; the whole format's AdamW moments and step counts), `state.json` the rest
(with the step and data position checkpoint.py writes there). `_legacy_state` reads the `state.pt` of
checkpoints an older prefalign wrote."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def write_state(tmp: Path, state: dict[str, Any]) -> dict[str, Any]:
    """state.safetensors: the state's tensors (RNG states; the whole format's AdamW moments and step
    counts, `optimizer.<param>.<key>` as in the sharded format's files). Returns the rest, for
    state.json: the schedule, the parameter groups, any optimizer value that is not a tensor."""
    tensors = {"rng.torch": state["torch_rng"]}
    tensors.update({f"rng.cuda.{i}": t for i, t in enumerate(state.get("cuda_rng", []))})
    optim = state.get("optimizer", {"state": {}, "param_groups": state.get("param_groups", [])})
    scalars: dict[str, dict[str, Any]] = {}
    for name, values in optim["state"].items():
        for k, v in values.items():
            if torch.is_tensor(v):
                tensors[f"optimizer.{name}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(name, {})[k] = v
    save_file(tensors, str(tmp / "state.safetensors"))
    rest = {"param_groups": optim["param_groups"], "scalars": scalars}
    if "optimizer_state" in state:  # sharded: whether the shards hold AdamW state
        rest["has_state"] = state["optimizer_state"]
    return {"scheduler": state["scheduler"], "optimizer": rest}


def read_state(path: Path, info: dict[str, Any]) -> dict[str, Any]:
    """What write_state wrote, as the dict the loaders take: `optimizer` (whole format: name-keyed
    state and groups) or `param_groups` + `optimizer_state` (sharded), `scheduler`, `torch_rng`, `cuda_rng`."""
    if not (path / "state.safetensors").exists() and (path / "state.pt").exists():
        return _legacy_state(path)
    tensors = load_file(str(path / "state.safetensors"))
    cuda = sorted((int(k.rsplit(".", 1)[1]), k) for k in tensors if k.startswith("rng.cuda."))
    state = {"scheduler": info["scheduler"], "torch_rng": tensors.pop("rng.torch")}
    if cuda:
        state["cuda_rng"] = [tensors.pop(k) for _, k in cuda]
    saved = info["optimizer"]
    groups = [{**g, **({"betas": tuple(g["betas"])} if isinstance(g.get("betas"), list) else {})}
              for g in saved["param_groups"]]  # JSON has no tuples; AdamW's own state_dict has one
    if "has_state" in saved:
        state.update(param_groups=groups, optimizer_state=saved["has_state"])
        return state
    optim = {"state": {}, "param_groups": groups}
    for key in [k for k in tensors if k.startswith("optimizer.")]:
        name, k = key[len("optimizer."):].rsplit(".", 1)
        optim["state"].setdefault(name, {})[k] = tensors.pop(key)
    for name, values in saved.get("scalars", {}).items():
        optim["state"].setdefault(name, {}).update(values)
    state["optimizer"] = optim
    return state


def _legacy_state(path: Path) -> dict[str, Any]:
    """The one place a checkpoint is unpickled: `state.pt` of a prefalign from before state.safetensors.
    weights_only: torch's restricted unpickler, which builds tensors and plain containers, never
    arbitrary objects; new checkpoints are never written this way."""
    return torch.load(path / "state.pt", weights_only=True)
