"""`prefalign merge`: a LoRA adapter folder + its base -> one plain HF folder (safetensors).

`merged` is the one place a run's final/ becomes a plain model and its tokenizer; `prefalign export`
builds on it. load_model already merges an adapter folder into its base (a chain of adapters too:
each records the previous run's final/ as its base), so a full fine-tune and a LoRA run load alike.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import ModelError
from .convert import dense
from .hub import resolve_model
from .load import load_model, load_tokenizer_for


def merged(path: str | Path, dtype: torch.dtype | None = None):
    """(model, tokenizer) of a run's final/: a full fine-tune as saved, a LoRA adapter merged into its base.
    By default a full fine-tune loads in the type it was saved in (nothing to merge: a bf16 7B model stays
    14 GB, not 28), and a merge runs in fp32 (adding B·A to bf16 weights in bf16 rounds twice)."""
    path = resolve_model(path)  # a run's final/, or a Hub id (an adapter repo or a model)
    if dtype is None:
        dtype = torch.float32 if (path / "adapter_config.json").exists() else "auto"
    model = load_model(path, dtype=dtype)
    if getattr(model, "hf_quantizer", None) is not None:  # an adapter on a .gguf base: dequantised on load
        model = dense(model, path)
    return model, load_tokenizer_for(path)


def save_merged(model, tokenizer, out: str | Path) -> Path:
    """A plain HF folder that transformers 4.x (as vLLM installs often pin) loads the same as 5.x does."""
    out = Path(out)
    model.save_pretrained(str(out), safe_serialization=True)
    # the chat template inside tokenizer_config.json, where every version looks (not only chat_template.jinja)
    tokenizer.save_pretrained(str(out), save_jinja_files=False)
    _add_legacy_keys(out)
    return out


def _add_legacy_keys(out: Path) -> None:
    """transformers 5 writes RoPE as `rope_parameters`, the type as `dtype` and a generic tokenizer as
    `TokenizersBackend`, none of which 4.x knows: it would run RoPE with theta 10000 whatever was trained and
    fail to load the tokenizer. Add the 4.x spellings; 5.x reads them back to the same values."""
    config = json.loads((out / "config.json").read_text())
    rope = dict(config.get("rope_parameters") or {})
    if rope and "rope_theta" in rope and not any(isinstance(v, dict) for v in rope.values()):
        for key in ("rope_theta", "partial_rotary_factor"):  # top-level keys before 5.x
            if key in rope:
                config[key] = rope.pop(key)
        if rope.get("rope_type", "default") != "default":
            config["rope_scaling"] = rope  # 5.x reads rope_scaling first and adds rope_theta back to it
    if "dtype" in config:
        config["torch_dtype"] = config["dtype"]
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    if tokenizer_config.get("tokenizer_class") == "TokenizersBackend":  # 5.x's name for the same class
        tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
        (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")


def merge_adapter(adapter: str | Path, out: str | Path) -> Path:
    adapter = resolve_model(adapter)
    if not (adapter / "adapter_config.json").exists():
        raise ModelError(f"{adapter}: not a PEFT adapter folder (no adapter_config.json)")
    return save_merged(*merged(adapter), out)
