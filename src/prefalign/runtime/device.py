"""The device: one picking function for train, eval, sample and bench, and what machine this is."""

from __future__ import annotations

import os
import platform

import psutil
import torch

from ..config import Runtime


def pick_device(name: str = "auto") -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():  # NVIDIA CUDA and AMD ROCm (HIP builds report through torch.cuda)
        return torch.device("cuda")
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return torch.device("xpu")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def gpu_available() -> bool:
    """A CUDA or ROCm GPU on this machine (what a planner or a GPU-only path asks; `pick_device`
    chooses where to run)."""
    return torch.cuda.is_available()


def describe(device: torch.device) -> str:
    """The device as a user names it: ROCm builds of torch drive AMD GPUs through torch.cuda, so
    a "cuda" device there is reported as rocm (with the card's name), never as CUDA."""
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    kind = "rocm" if getattr(torch.version, "hip", None) else "cuda"
    return f"{kind}:{index} ({torch.cuda.get_device_name(index)})"


def set_up(runtime: Runtime) -> torch.device:
    """The device a command's Runtime settings name, with their thread count and seed applied."""
    if runtime.threads:
        torch.set_num_threads(runtime.threads)
    torch.manual_seed(runtime.seed)
    return pick_device(runtime.device)


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def detect(device: torch.device) -> dict:
    info = {"device_type": device.type, "torch": torch.__version__, "cpu_model": cpu_model(),
            "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        hip = getattr(torch.version, "hip", None)
        info.update(vendor="amd" if hip else "nvidia", name=props.name, memory_bytes=props.total_memory,
                    runtime=f"hip {hip}" if hip else f"cuda {torch.version.cuda}",
                    compute_capability=f"{props.major}.{props.minor}")
        try:
            info["driver"] = torch.cuda.driver_version() if hasattr(torch.cuda, "driver_version") else None
        except RuntimeError:
            info["driver"] = None
    elif device.type == "xpu":
        info.update(vendor="intel", name=torch.xpu.get_device_name(device))
    elif device.type == "mps":
        info.update(vendor="apple", name="Apple MPS")
    else:
        info.update(vendor="cpu", name=info["cpu_model"], memory_bytes=psutil.virtual_memory().total)
    return info


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type in ("cuda", "xpu") else torch.float32


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "xpu":
        torch.xpu.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()

