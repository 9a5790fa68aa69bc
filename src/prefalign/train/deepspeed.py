"""DeepSpeed ZeRO-2/3 (`distributed: deepspeed`), built by accelerate's DeepSpeed plugin, where
deepspeed is installed (`pip install deepspeed --no-build-isolation`, once torch is there).

DeepSpeed's engine does what train/loop.py's `Optimization` does with torch's AdamW: the backward
(divided by the accumulation), the gradient reduction, accumulation over `grad_accum` micro-batches,
clipping and the step. ZeRO-2 partitions the gradients and AdamW state over the processes, ZeRO-3 the
weights too. prefalign keeps the rest, as under DDP and FSDP2: the batches (`batch_size` is the global
micro-batch, each process its share), the AdamW and schedule it builds (DeepSpeed steps that same
AdamW on its flat partitions, and the LambdaLR sets the learning rate on the same parameter groups),
the NaN/Inf guard, and the checkpoints: prefalign's whole safetensors files with AdamW's state keyed
by parameter name, read and written through DeepSpeed's safe_get/set_full_* functions, never
DeepSpeed's own pickled checkpoints. A ZeRO run resumes on one process, DDP or FSDP2, and they on ZeRO.

Weights stay fp32 in the engine (no DeepSpeed fp16/bf16 mode); `precision: bf16` is torch's autocast on CPU,
as for every other strategy, and refused on a GPU (the engine turns an outer CUDA autocast off: see
check_precision). No CPU/NVMe offload: not offered until it has run somewhere it matters.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin
from torch import Tensor, nn

from ..errors import ConfigError, TrainingError
from ..runtime.distributed import World
from .checkpoint import WholeTensors
from .config import RunConfig
from .loop import Optimization

INSTALL = "pip install deepspeed --no-build-isolation (it builds against the torch already installed)"


def installed() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def launcher_problem(cfg: RunConfig) -> str | None:
    """What `accelerate launch --use_deepspeed ...` asked for that the config does not say: prefalign's
    config decides (stage, accumulation, clipping), so a launcher that says otherwise is an error,
    not silently overruled."""
    env = os.environ
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and cfg.distributed != "deepspeed":
        return f"accelerate launch --use_deepspeed, but the config says distributed: {cfg.distributed}; set " \
               "distributed: deepspeed (or launch without --use_deepspeed)"
    if cfg.distributed != "deepspeed":
        return None
    stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if stage is not None and int(stage) != cfg.zero_stage:
        return f"accelerate launch --zero_stage {stage}, but the config's deepspeed_stage is {cfg.zero_stage}"
    if env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none") != "none":
        return "accelerate launch --deepspeed_config_file is not read: deepspeed_stage, grad_accum, max_grad_norm " \
               "and batch_size in prefalign's config make the DeepSpeed config"
    for key in ("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"):
        if env.get(key, "none") != "none":
            return f"{key.lower().replace('_', ' ')} is not supported here (no offload); launch without it"
    return None


def check(cfg: RunConfig) -> None:
    """Before any work: deepspeed present, a launcher that agrees with the config."""
    problem = launcher_problem(cfg)
    if problem:
        raise ConfigError(problem)
    if cfg.distributed == "deepspeed" and not installed():
        raise ConfigError(f"distributed: deepspeed needs the deepspeed package, which is not installed: {INSTALL}; "
                          "or use distributed: ddp or fsdp")


def check_precision(bf16: bool, device: torch.device) -> None:
    """DeepSpeed's engine runs the forward with an outer CUDA autocast turned off unless its own
    `torch_autocast` is configured (deepspeed 0.19.8, runtime/torch_autocast.py): bf16 would silently
    compute in fp32 there, against a reference computed in bf16. Refused until that has run on a GPU;
    CPU autocast is not touched by it (the CPU tests run bf16 through the engine)."""
    if bf16 and device.type == "cuda":
        raise ConfigError("distributed: deepspeed with bf16 autocast on a GPU is not supported yet (DeepSpeed's "
                          "engine turns an outer autocast off): set precision: fp32, or use distributed: fsdp")


def prepare(forward: nn.Module, model: nn.Module, cfg: RunConfig, world: World,
            log: Callable[[str], None]) -> tuple[nn.Module, DeepSpeedOptimization]:
    """The engine around `forward` (call it as the forward), and the loop's optimization over it.
    DeepSpeed's config comes from prefalign's: the global batch split over the processes, the
    accumulation, the clipping, the stage."""
    base = Optimization.build(cfg, model, log)  # torch's AdamW (no empty group) and the schedule
    name_of = {id(p): n for n, p in model.named_parameters()}
    names = [[name_of[id(p)] for p in g["params"]] for g in base.optimizer.param_groups]
    plugin = DeepSpeedPlugin(zero_stage=cfg.zero_stage, gradient_accumulation_steps=cfg.grad_accum,
                             gradient_clipping=cfg.max_grad_norm, offload_optimizer_device="none",
                             offload_param_device="none", zero3_init_flag=False)
    plugin.deepspeed_config.update({"train_micro_batch_size_per_gpu": cfg.batch_size // world.size,
                                    "train_batch_size": cfg.batch_size * cfg.grad_accum,
                                    "steps_per_print": 2**31 - 1})  # the loop logs
    # mixed_precision "no": the engine keeps fp32 weights; bf16 is the loop's autocast (`precision`)
    accelerator = Accelerator(deepspeed_plugin=plugin, mixed_precision="no", gradient_accumulation_steps=cfg.grad_accum)
    engine, _ = accelerator.prepare(forward, base.optimizer)
    _prime(engine.optimizer)
    log(f"DeepSpeed ZeRO-{cfg.zero_stage} engine over {world.size} processes")
    return engine, DeepSpeedOptimization(engine, base, names)


def _flats(zero) -> list[Tensor]:
    """The flat fp32 partitions ZeRO's AdamW steps (stage 1/2, stage 3)."""
    flats = getattr(zero, "single_partition_of_fp32_groups", None)
    return list(flats if flats is not None else zero.fp32_partitioned_groups_flat)


def _prime(zero) -> None:
    """AdamW's state for every flat partition, zero, as AdamW's own first step creates it; linked to each
    parameter's fragment. DeepSpeed (0.19) creates the state at its first step, and links ZeRO-1/2's
    fragments to it right after stepping the first parameter group, before the second (biases and
    norms) has any: safe_get_full_optimizer_state then failed for those. And a resume, before any
    step, would find neither state nor links to set (tested: without the links it fails)."""
    basic = zero.optimizer
    for flat in _flats(zero):
        if not basic.state[flat]:
            basic.state[flat] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(flat),
                                 "exp_avg_sq": torch.zeros_like(flat)}
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


class DeepSpeedOptimization(Optimization):
    """The loop's optimization when the engine steps. The guard stays meaningful: every process
    checks each micro-batch's loss before its backward (OfflineUpdate), and the step's gradient norm
    is the one DeepSpeed computed over all partitions before clipping."""

    def __init__(self, engine, base: Optimization, names: list[list[str]]):
        super().__init__(base.params, base.optimizer, base.max_grad_norm, base.guard, base.scheduler)
        self.engine, self.tensors = engine, ZeroTensors(engine.optimizer, names)

    def backward(self, loss: Tensor, micro_batches: int, finite: bool) -> None:
        if micro_batches != self.engine.gradient_accumulation_steps():
            raise TrainingError(f"{micro_batches} micro-batches a step, DeepSpeed's accumulation is "
                                f"{self.engine.gradient_accumulation_steps()}")
        # A non-finite micro-batch cannot be left out: the engine counts micro-batches to find the step's
        # end, and ZeRO reduces gradients during backward. Its gradient is made NaN instead, on every
        # process, which DeepSpeed's own check of the global norm turns into a skipped update.
        self.engine.backward(loss if finite else loss * float("nan"))  # the engine divides by micro_batches
        self.engine.step()  # an update only after the step's last micro-batch

    def norm(self) -> float:
        n = self.engine.get_global_grad_norm()
        return float("nan") if n is None else float(n)

    def apply(self, step: int, what: str = "step") -> float:
        norm = self.norm()
        if math.isfinite(norm):
            self.guard.good()
        else:  # DeepSpeed found the norm non-finite and did not update
            self.skipped += 1
            self.guard.bad(step, f"non-finite gradient; {what} skipped")
        return norm

    def skip(self, step: int, why: str) -> None:
        if math.isfinite(self.norm()):  # the poisoned backward did not reach DeepSpeed's check
            raise TrainingError(f"step {step}: {why}, but DeepSpeed updated the weights (its gradient norm is "
                                "finite)")
        self.skipped += 1
        self.guard.bad(step, why)


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


class ZeroTensors(WholeTensors):
    """The whole format's tensors of a ZeRO run: each parameter's fp32 master weight and AdamW state,
    assembled from every process's partition (a collective per tensor), through DeepSpeed's API."""

    in_place = False  # torch's state_dict API does not reach ZeRO's partitions

    def __init__(self, zero, names: list[list[str]]):
        self.zero, self.names = zero, names

    def everyone(self, model) -> bool:
        return True

    def _step(self) -> Tensor:
        steps = {float(self.zero.optimizer.state[f]["step"]) for f in _flats(self.zero)}
        if len(steps) != 1:
            raise TrainingError(f"DeepSpeed's parameter groups have taken different numbers of steps: {steps}")
        return torch.tensor(steps.pop())

    def gather(self, model, optimizer, keep: bool) -> tuple[dict[str, Tensor], dict]:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        step, weights, state = self._step(), {}, {}
        for name, p in _trainable(model):
            w = safe_get_full_fp32_param(p)
            moments = {k: safe_get_full_optimizer_state(p, k) for k in ("exp_avg", "exp_avg_sq")}
            if keep:
                weights[name] = w.detach().cpu().contiguous()
                state[name] = {"step": step.clone(), **{k: v.detach().cpu().contiguous() for k, v in moments.items()}}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": names}
                  for g, names in zip(self.zero.optimizer.param_groups, self.names, strict=True)]
        return weights, {"state": state, "param_groups": groups}

    def scatter(self, model, optimizer, weights: dict[str, Tensor], optim: dict) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        self._set_groups(optim["param_groups"])
        params = _trainable(model)
        missing = sorted({n for n, _ in params} - weights.keys())
        if missing:
            raise TrainingError(f"the checkpoint has no weights for {missing[:3]}... (another model, or LoRA "
                                "settings?)")
        uneven = [n for n, p in params if hasattr(p, "ds_id") and p.ds_numel % dist.get_world_size()]
        if uneven:  # the same list on every process: all raise, none waits in a collective
            raise TrainingError(f"resuming ZeRO-3 needs every trainable tensor's size divisible by the process "
                                f"count ({uneven[0]} is not; deepspeed 0.19.8's set_full_hp_param reads past its "
                                "end): resume with another process count, ZeRO-2, FSDP or one process")
        steps = set()
        for name, p in params:
            value = weights[name].to(torch.float32)
            _set_module_weight(p, value)  # what the forward computes with
            safe_set_full_fp32_param(p, value.to(p.device))  # DeepSpeed's fp32 master partition
            for k in ("exp_avg", "exp_avg_sq"):
                if name in optim["state"]:  # torch has no state for a parameter that never had a gradient
                    safe_set_full_optimizer_state(p, optim["state"][name][k].to(p.device, torch.float32), k)
            steps.add(float(optim["state"].get(name, {}).get("step", 0)))
        for flat in _flats(self.zero):
            self.zero.optimizer.state[flat]["step"].fill_(max(steps))

    def _set_groups(self, saved: list[dict]) -> None:
        """The saved groups' hyperparameters (learning rate, ...) onto DeepSpeed's, matched by names."""
        if any(isinstance(n, int) for g in saved for n in g["params"]):
            raise TrainingError("this checkpoint's optimizer state is keyed by position (an older prefalign): "
                                "resume it once with ddp or one process, which rewrites it by name")
        by_names = {tuple(g["params"]): g for g in saved}
        for group, names in zip(self.zero.optimizer.param_groups, self.names, strict=True):
            if tuple(names) not in by_names:
                raise TrainingError("the checkpoint's parameter groups are not this run's (another model?)")
            group.update({k: v for k, v in by_names[tuple(names)].items() if k != "params"})


def _set_module_weight(p: nn.Parameter, value: Tensor) -> None:
    """ZeRO-2: every process holds the whole weight; ZeRO-3: gathered, set, partitioned again."""
    if not hasattr(p, "ds_id"):
        with torch.no_grad():
            p.data.copy_(value.to(p.device, p.dtype))
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
        if dist.get_rank() == 0:
            p.data.copy_(value.to(p.device, p.dtype))


def final_state(model: nn.Module, keep: bool, only_trainable: bool) -> dict[str, Tensor] | None:
    """final/'s tensors: None under ZeRO-2 (every process holds the whole weights, rank 0 saves its
    own); under ZeRO-3 each parameter gathered in turn, kept by a rank that writes."""
    if not any(hasattr(p, "ds_id") for p in model.parameters()):
        return None
    import deepspeed

    params = dict(model.named_parameters(remove_duplicate=False))
    gathered: dict[int, Tensor] = {}
    out = {}
    for name, t in model.state_dict().items():
        p = params.get(name)
        if only_trainable and not (p is not None and p.requires_grad):
            continue
        if p is None:  # a buffer: never partitioned
            value = t.detach().cpu()
        else:
            if id(p) not in gathered:  # a tied weight is one parameter under two names
                with deepspeed.zero.GatheredParameters([p]):
                    gathered[id(p)] = p.detach().cpu().clone() if keep else torch.empty(0)
            value = gathered[id(p)]
        if keep:
            out[name] = value
    return out
