"""One run over several processes with PyTorch's own engines: DDP (every rank holds the model, the
gradients are averaged) or FSDP2 (`fully_shard`: weights, gradients and optimizer state sharded
over the ranks). prefalign adds no engine of its own; it only

- puts a method's differentiable forward (batch -> per-sequence log-probs or scores) behind one
  module call, `Forward`, because both engines act in hooks on module calls, and the log-prob path
  reads the output head's weight directly (only the positions it scores go through the head);
- gathers full tensors (whole checkpoints and final/) and scatters them back (a resume), so that
  a run resumes on any other count (train/checkpoint.py; sharded checkpoints go through
  torch.distributed.checkpoint instead).
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from ..errors import ConfigError
from ..models.load import trunk_of
from ..models.logps import batch_logps
from ..models.scalar import sequence_scores
from ..runtime.distributed import World


class Forward(nn.Module):
    """The training forward as one module: per-sequence log-probs (slot-major, models/logps.py)
    or, for a reward model, one score per sequence."""

    def __init__(self, model: nn.Module, scores: bool, chunk_mb: float):
        super().__init__()
        self.model, self.scores, self.chunk_mb = model, scores, chunk_mb

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        if self.scores:
            return sequence_scores(self.model, batch["input_ids"], batch["attention_mask"])
        return batch_logps(self.model, batch, self.chunk_mb)


def blocks(model: nn.Module) -> list[nn.Module]:
    """The trunk's repeated layers (LlamaModel.layers, GPT2Model.h, MambaModel.layers, ...): the
    units FSDP2 shards and gathers one at a time."""
    found = [child for child in trunk_of(model).children() if isinstance(child, nn.ModuleList)]
    if not found:
        raise ConfigError(f"distributed: fsdp cannot find the repeated layers of {type(trunk_of(model)).__name__}")
    return list(max(found, key=len))


def ddp(module: nn.Module, world: World, device: torch.device) -> nn.Module:
    """`module` under DDP with several processes; itself with one."""
    if not world.active:
        return module
    ids = [device.index] if device.type == "cuda" else None
    # buffers off: the only buffers are constant (rotary tables); syncing them on every forward would
    # make evaluation a collective too
    newer = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    no_sync = {"forward_sync_buffers" if newer else "broadcast_buffers": False}
    return DistributedDataParallel(module, device_ids=ids, **no_sync)


def parallelize(forward: Forward, world: World, strategy: str, precision_bf16: bool, cpu_offload: bool,
                device: torch.device) -> nn.Module:
    """`forward` as the strategy runs it; with one process, itself."""
    if not world.active:
        return forward
    if strategy == "ddp":
        return ddp(forward, world, device)
    if strategy != "fsdp":  # deepspeed: its engine is built with the optimizer (train/deepspeed.py)
        raise ConfigError(f"parallelize: {strategy} is not a torch strategy")
    # bf16 compute on gathered weights, gradients reduced in fp32 (FSDP2's recommended mix)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision_bf16 \
        else MixedPrecisionPolicy()
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    for block in blocks(forward.model):
        fully_shard(block, mp_policy=mp, offload_policy=offload)
    fully_shard(forward, mp_policy=mp, offload_policy=offload)  # the rest: embeddings, final norm, head
    return forward


def full(t: Tensor) -> Tensor:
    """The whole tensor on every rank (a collective for an FSDP2 shard), on the CPU."""
    if hasattr(t, "full_tensor"):  # a DTensor
        t = t.full_tensor()
    return t.detach().cpu().contiguous()


def sharded(model: nn.Module) -> bool:
    return any(hasattr(p, "device_mesh") for p in model.parameters())


def full_state(model: nn.Module, keep: bool, only_trainable: bool = False) -> dict[str, Tensor]:
    """The model's state dict with whole tensors: every rank takes part in each gather, one tensor
    at a time, and only a rank that will write `keep`s them (the others hold one tensor at most).
    `only_trainable`: a LoRA run's adapters, all its final/ holds. Tied weights (one parameter under
    two names) stay one tensor, so save_pretrained writes it once, as for the unsharded model."""
    params = dict(model.named_parameters(remove_duplicate=False))
    gathered: dict[int, Tensor] = {}
    out = {}
    for name, t in model.state_dict().items():
        if only_trainable and not (name in params and params[name].requires_grad):
            continue
        key = id(params[name]) if name in params else id(t)
        if key not in gathered:
            gathered[key] = full(t)
        if keep:
            out[name] = gathered[key]
        else:
            gathered[key] = torch.empty(0)  # gathered for the others; not kept
    return out


def shard_like(value: Tensor, like: Tensor) -> Tensor:
    """A full tensor laid out as `like`: this rank's shard when `like` is an FSDP2 DTensor."""
    if hasattr(like, "device_mesh"):
        return distribute_tensor(value.to(like.dtype), like.device_mesh, like.placements)
    return value.to(device=like.device, dtype=like.dtype)


@contextmanager
def accumulating(module, accumulate: bool):
    """Forward and backward without DDP's gradient reduction while `accumulate` (all but a step's last
    micro-batch): DDP's no_sync. FSDP2 reduce-scatters every micro-batch: turning that off would
    hold whole unsharded gradients between micro-batches (and zero_grad does not clear them, so a
    skipped step would leak into the next); one process: nothing to skip."""
    if accumulate and isinstance(module, DistributedDataParallel):
        with module.no_sync():
            yield
    else:
        yield
