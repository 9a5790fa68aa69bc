"""Memory: a process's peak (CUDA allocator peak on a GPU, peak RSS on a CPU), and glibc's allocator on
CPU, which can hand freed activation memory back to the OS (Linux only).

A training step frees gigabytes of activations. glibc keeps freed heap blocks resident as holes, and
its dynamic mmap threshold grows to 32 MB after the first large free, so activations come from the
heap and the resident set grows over steps well beyond what is live (config.py,
`malloc_mmap_threshold_mb`).
"""

from __future__ import annotations

import ctypes
import errno
import resource
import sys

import torch

from ..errors import PrefalignError


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # musl and others: no mallopt to call
        return None


def set_malloc_mmap_threshold(mb: float) -> bool:
    """Fix glibc's mmap threshold at `mb` MB (0: leave it), so freed activations go back to the OS
    instead of staying in the heap as holes (config.py, `malloc_mmap_threshold_mb`). Process-wide;
    True when it was set (False off Linux/glibc)."""
    libc = _libc() if mb else None
    if libc is None:
        return False
    m_mmap_threshold = -3  # <malloc.h>; setting it also stops glibc's dynamic threshold adjustment
    return bool(libc.mallopt(m_mmap_threshold, int(mb * 2**20)))


def peak_rss_bytes() -> int:
    """This process's peak resident set: a high-water mark that cannot be reset. Linux: VmHWM, the
    peak of this program's own memory; getrusage's ru_maxrss also keeps the peak of the process it
    was forked from, before exec (a worker started by a large parent would report the parent's)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB, macOS bytes


def peak_memory_bytes(device: torch.device) -> int:
    """The allocator's peak on a GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return peak_rss_bytes()


# what a run is doing now, in words an out-of-memory error can end with: "at step 3"
_doing = ["while starting the run"]
# what allocators say when they fail: torch's CPU allocator raises a plain RuntimeError (torch 2.13:
# "DefaultCPUAllocator: can't allocate memory ... Error code 12 (Cannot allocate memory)"), CUDA, MPS
# and cuBLAS their own words; torch.OutOfMemoryError exists from torch 2.5
_OOM_TEXT = ("can't allocate memory", "Cannot allocate memory", "out of memory", "CUBLAS_STATUS_ALLOC_FAILED")


def doing(what: str) -> None:
    """Record what the run does now ("while loading the model", "at step 3"): the phrase an
    out-of-memory error names (train/run.py). One process trains one run at a time."""
    _doing[0] = what


def where() -> str:
    return _doing[0]


def out_of_memory(e: BaseException) -> bool:
    """Whether `e` is running out of memory: Python's MemoryError, torch's OutOfMemoryError (CUDA,
    MPS), an allocator's RuntimeError, or ENOMEM from the OS (an mmap, a new thread)."""
    if isinstance(e, PrefalignError):  # already explained
        return False
    if isinstance(e, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return True
    if isinstance(e, OSError):
        return e.errno == errno.ENOMEM
    return isinstance(e, RuntimeError) and any(s in str(e) for s in _OOM_TEXT)
