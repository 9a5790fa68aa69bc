"""What an out-of-memory error advises (train/run.py raises it): the settings of this config that need
less memory *where the run ran out*. Loading the model needs less only with smaller weights, the data
only with shorter examples, the reference precompute (no backward) only with smaller batches; a training
step with any of the usual levers. A batch size it suggests keeps the step's examples (batch_size x
grad_accum; batch_size is the micro-batch of all processes together) and divides over the processes."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..runtime import memory
from .checkpoint import list_checkpoints
from .config import RunConfig


def _phase(where: str) -> str:
    """The phase of `memory.doing`'s phrase: load, copy, data, precompute, step or other."""
    for phase, words in (("load", "loading the model"), ("copy", "copying the model"), ("data", "reading the"),
                         ("precompute", "reference precompute"), ("step", "at step ")):
        if words in where:
            return phase
    return "other"


def _processes() -> int:
    return max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))


def smaller_batch(batch_size: int, grad_accum: int, processes: int) -> tuple[int, int] | None:
    """(batch_size, grad_accum) with a smaller micro-batch and the same examples a step, the batch still
    a multiple of the processes (each takes batch_size / processes); None when each process has one."""
    each = batch_size // processes
    if each <= 1:
        return None
    fewer = max(d for d in range(1, each) if each % d == 0)
    return fewer * processes, grad_accum * each // fewer


def _batch_tip(cfg: RunConfig, why: str = "") -> str | None:
    accum = getattr(cfg, "grad_accum", None)  # offline methods; RL splits its updates with num_minibatches
    if accum is None:
        return _rl_batch_tip(cfg)
    processes = _processes()
    smaller = smaller_batch(cfg.batch_size, accum, processes)
    if smaller is None:
        return None
    over = f", over {processes} processes" if processes > 1 else ""
    return (f"a smaller batch_size{why} with a larger grad_accum, the same {cfg.batch_size * accum} examples a "
            f"step{over} (batch_size: {smaller[0]}, grad_accum: {smaller[1]})")


def _rl_batch_tip(cfg: RunConfig) -> str:
    rows = cfg.batch_size // _processes() * cfg.samples_per_prompt  # each process's rollout rows
    more = next((m for m in range(cfg.num_minibatches + 1, rows + 1) if rows % m == 0), None)
    split = f"num_minibatches: {more} (the same rollout, updated in smaller pieces)" if more else None
    return "; ".join(x for x in (split, "a smaller batch_size (prompts per rollout) or max_new_tokens") if x)


def _weights_tips(cfg: RunConfig, device_is_cuda: bool) -> list[str]:
    """Smaller weights as loaded: lower precision or 4-bit for a frozen (LoRA) base, else a smaller model."""
    tips = []
    if cfg.lora:
        if cfg.dtype not in ("bf16", "fp16") and not cfg.quantize_4bit:
            tips.append("dtype: bf16 (the frozen base in half the memory)")
        if not cfg.quantize_4bit and device_is_cuda:
            tips.append("quantize_4bit: true (a 4-bit base, bitsandbytes, CUDA only)")
    else:
        tips.append("a full fine-tune keeps its weights in fp32: with lora: true the base can load in "
                    "dtype: bf16 or 4-bit (quantize_4bit: true, CUDA)")
    tips.append("a smaller model")
    return tips


def _reference_tip(cfg: RunConfig, copying: bool = False) -> str | None:
    """A frozen copy of the model held as the reference: what needs none instead."""
    if not (copying or memory.holds_reference_copy()):
        return None
    if hasattr(cfg, "grad_accum"):  # offline: a table of log-probs instead
        return "reference: precompute (its log-probs computed once, before training: no second model)"
    return ("lora: true with " if not cfg.lora else "") + (
        "reference: adapter (the base with its adapters off is the reference: no second model)")


def _tips(cfg: RunConfig, phase: str, device_is_cuda: bool) -> list[str]:
    if phase == "load":
        return _weights_tips(cfg, device_is_cuda)
    if phase == "copy":
        return [t for t in (_reference_tip(cfg, copying=True), *_weights_tips(cfg, device_is_cuda)) if t]
    if phase == "data":
        length = f"a smaller max_length (now {cfg.max_length})" if hasattr(cfg, "max_length") else (
            f"a smaller max_prompt_length (now {cfg.max_prompt_length})")
        return [length + ": the tokenized examples are held in memory", "a smaller data file"]
    if phase == "precompute":  # a forward pass without gradients, batch_size examples at a time
        batch = _batch_tip(cfg, " (the precompute's batch)")
        return [t for t in (batch, f"a smaller max_length (now {cfg.max_length})") if t]
    tips = []
    if not cfg.gradient_checkpointing:
        tips.append("gradient_checkpointing: true (activations recomputed in the backward)")
    batch = _batch_tip(cfg)
    if batch is None and hasattr(cfg, "max_length"):
        batch = f"a smaller max_length (now {cfg.max_length})"
    tips += [batch] if batch else []
    if not cfg.lora:
        tips.append("lora: true (no gradients nor AdamW state for the base weights)")
    return tips + [t for t in (_reference_tip(cfg),) if t]


def out_of_memory_advice(cfg: RunConfig, where: str, e: BaseException, device_is_cuda: bool = False) -> str:
    """What ran out and where, the settings of this config that need less memory there, and what was kept."""
    said = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
    said = re.sub(r"^\[enforce fail at [^\]]*\]\s*(err == 0\.\s*)?", "", said)  # c10's prefix: not for users
    config = Path(cfg.output) / "config.yaml"  # the resolved config, written when the run starts
    tips = [f"`prefalign plan {config if config.exists() else 'CONFIG.yaml'}` estimates the peak memory term by "
            "term and which settings fit this device", *_tips(cfg, _phase(where), device_is_cuda)]
    steps = list_checkpoints(Path(cfg.output))
    kept = (f"checkpoints up to step {steps[-1]} are intact (resume: true continues from it)" if steps
            else "no checkpoint was written")
    return f"out of memory {where} ({said[:300]}). To need less: {'; '.join(tips)}. {kept[0].upper()}{kept[1:]}."
