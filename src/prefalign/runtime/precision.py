"""Precision: where training and evaluation compute in bf16 under autocast."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from functools import partial

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def bf16_capable(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "xpu"


def weights_dtype(dtype: str, device: torch.device, frozen_base: bool) -> torch.dtype:
    """The dtype the weights are loaded in. `auto`: bf16 for a frozen base (LoRA) on a device with bf16,
    else fp32; a trained weight stays fp32 (it is the optimizer's master copy), its compute may still
    run in bf16 under `precision`."""
    if dtype != "auto":
        return DTYPES[dtype]
    return torch.bfloat16 if frozen_base and bf16_capable(device) else torch.float32


def bf16_wanted(precision: str, device: torch.device) -> bool:
    """`precision` auto | fp32 | bf16 resolved: auto is bf16 on a CUDA GPU that has it."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda" and bf16_capable(device))


def autocast_for(precision: str, device: torch.device) -> Callable:
    """`precision` auto | fp32 | bf16: a context factory, bf16 autocast or none (bf16_wanted)."""
    if not bf16_wanted(precision, device):
        return nullcontext
    return partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)
