"""Device `auto`: one picking function (runtime/device.py) for train, eval, sample and bench, ROCm
reported by name; QLoRA stops with a clear error before any work where it cannot run."""

import ast
from pathlib import Path

import pytest
import torch

from prefalign.errors import ModelError
from prefalign.runtime.device import describe, pick_device
from prefalign.train.methods import make_config
from prefalign.train.run import train

SRC = Path(__file__).parent.parent / "src" / "prefalign"


def test_auto_is_the_best_device_here_and_named_as_users_name_it():
    expected = "cuda" if torch.cuda.is_available() else "cpu"  # this machine: no XPU/MPS
    assert pick_device("auto").type == expected
    assert pick_device("cpu") == torch.device("cpu")
    assert describe(torch.device("cpu")) == "cpu"


def test_only_the_device_module_picks_a_device():
    """Every command resolves `device: auto` through pick_device/set_up: no module probes the
    accelerators on its own to choose where to run."""
    probes = ("is_available",)
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.name == "device.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in probes:
                owner = ast.unparse(node.func.value)
                if owner in ("torch.xpu", "torch.backends.mps") or (owner == "torch.cuda" and _chooses(path)):
                    offenders.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert offenders == []


def _chooses(path: Path) -> bool:
    # torch.cuda.is_available() may guard GPU-only bookkeeping (RNG state, device counts); it must
    # not decide the device, which only these command entry points would do
    return path.parent.name in ("tasks", "feedback", "eval", "bench") or path.parent.name == "cli"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without CUDA")
def test_qlora_without_cuda_stops_before_any_work(tiny_models, pair_file, tmp_path):
    out = tmp_path / "run"
    cfg = make_config(method="dpo", model=str(tiny_models["llama"]), data=str(pair_file), output=str(out),
                      lora=True, quantize_4bit=True, max_steps=2)
    with pytest.raises(ModelError, match="quantize_4bit .*needs a CUDA device"):
        train(cfg, progress=False)
    assert not (out / "metrics.jsonl").exists() and not (out / "ref_logps.safetensors").exists()
