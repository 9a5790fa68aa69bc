"""`malloc_mmap_threshold_mb`: freed activation-sized blocks go back to the OS instead of staying
in the heap as holes (the step-after-step RSS growth of a training run under glibc's defaults)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from prefalign.train.methods import make_config

# In a fresh process: free one 20 MB block (glibc then raises its mmap threshold to 20 MB, as a
# training step's first large free does), allocate 48 blocks of 8 MB alternating kept/dropped,
# drop every other one, and report how much RSS the holes still hold.
PROBE = r"""
import json, os, sys
import torch
from prefalign.runtime.memory import set_malloc_mmap_threshold
was_set = set_malloc_mmap_threshold(float(sys.argv[1]))
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
big = torch.ones(5 * 2**20)  # 20 MB
del big
blocks = [torch.ones(2 * 2**20) for _ in range(48)]  # 8 MB each, every page touched
full = rss()
del blocks[::2]
print(json.dumps({"set": was_set, "returned_mb": (full - rss()) / 2**20}))
"""


def _returned_mb(threshold_mb: float) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, str(threshold_mb)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_return_to_the_os():
    fixed = _returned_mb(1.0)
    default = _returned_mb(0.0)  # the control: glibc's own behaviour, which the setting exists to change
    if not fixed["set"]:
        pytest.skip("not glibc")
    assert fixed["returned_mb"] > 150  # 24 dropped blocks of 8 MB = 192 MB
    assert default["returned_mb"] < 50  # holes in the heap: kept


def test_default_and_bounds():
    cfg = make_config(model="m", data="d", output="o")
    assert cfg.malloc_mmap_threshold_mb == 0.0  # glibc's own behaviour unless asked: the setting costs time
    with pytest.raises(ValueError):
        make_config(model="m", data="d", output="o", malloc_mmap_threshold_mb=64)  # glibc's maximum is 32 MB
