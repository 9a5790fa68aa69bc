"""`prefalign merge`: a LoRA adapter folder + its base -> one plain HF folder (safetensors)."""

from __future__ import annotations

import json
from pathlib import Path

from peft import PeftModel

from ..errors import ModelError
from .load import load_model, load_tokenizer


def merge_adapter(adapter: str | Path, out: str | Path) -> Path:
    adapter = Path(adapter)
    cfg_file = adapter / "adapter_config.json"
    if not cfg_file.exists():
        raise ModelError(f"{adapter}: not a PEFT adapter folder (no adapter_config.json)")
    base = json.loads(cfg_file.read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(load_model(base), str(adapter)).merge_and_unload()
    out = Path(out)
    model.save_pretrained(str(out), safe_serialization=True)
    tok_src = adapter if (adapter / "tokenizer_config.json").exists() else Path(base)
    load_tokenizer(tok_src).save_pretrained(str(out))
    return out
