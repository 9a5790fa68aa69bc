"""`prefalign merge`: a LoRA adapter folder + its base -> one plain HF folder (safetensors).

`merged` is the one place a run's final/ becomes a plain model and its tokenizer; `prefalign export`
builds on it. load_model already merges an adapter folder into its base (a chain of adapters too:
each records the previous run's final/ as its base), so a full fine-tune and a LoRA run load alike.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ModelError
from .convert import dense
from .load import load_model, load_tokenizer_for


def merged(path: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of a run's final/: a full fine-tune as saved, a LoRA adapter merged into its base.
    The merge runs in `dtype` (fp32 by default: adding B·A to bf16 weights in bf16 rounds twice)."""
    model = load_model(path, dtype=dtype)
    if getattr(model, "hf_quantizer", None) is not None:  # an adapter on a .gguf base: dequantised on load
        model = dense(model, path)
    return model, load_tokenizer_for(path)


def save_merged(model, tokenizer, out: str | Path) -> Path:
    out = Path(out)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out


def merge_adapter(adapter: str | Path, out: str | Path) -> Path:
    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").exists():
        raise ModelError(f"{adapter}: not a PEFT adapter folder (no adapter_config.json)")
    return save_merged(*merged(adapter), out)
