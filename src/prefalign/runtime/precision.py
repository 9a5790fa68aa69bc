"""Precision: where training and evaluation compute in bf16 under autocast."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from functools import partial

import torch


def autocast_for(precision: str, device: torch.device) -> Callable:
    """`precision` auto | fp32 | bf16: a context factory, bf16 autocast or none (auto: bf16 on a CUDA GPU
    that has it)."""
    bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
    use_bf16 = precision == "bf16" or (precision == "auto" and bf16_ok)
    if not use_bf16:
        return nullcontext
    return partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)
