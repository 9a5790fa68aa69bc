"""Model shapes the benchmark builds with random weights from a config (or a local folder)."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    LlamaConfig,
    Mamba2Config,
    MambaConfig,
)

from ..models.load import load_model
from ..models.scalar import load_scalar_model

SHAPES = {  # random-init shapes; llama-1b is Llama-3.2-1B's shape, mamba-130m mamba-130m's, mamba2-130m mamba2-130m's
    "tiny": dict(arch="llama", vocab=512, hidden=64, layers=2, heads=4, kv_heads=4, intermediate=128),
    "llama-30m": dict(arch="llama", vocab=32000, hidden=384, layers=6, heads=6, kv_heads=6, intermediate=1024),
    "llama-1b": dict(arch="llama", vocab=128256, hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192),
    "mamba-130m": dict(arch="mamba", vocab=50280, hidden=768, layers=24),
    # state-spaces/mamba2-130m: d_state 128, 24 heads of 64 (expand 2), one group, chunks of 256
    "mamba2-130m": dict(arch="mamba2", vocab=50288, hidden=768, layers=24, heads=24, state=128),
}


def build(shape: str | dict, model_dir: str | None, dev: torch.device, scalar: bool = False):
    if model_dir:
        return (load_scalar_model(model_dir, device=dev) if scalar else load_model(model_dir, device=dev))
    s = SHAPES[shape] if isinstance(shape, str) else shape
    if s["arch"] == "mamba":
        cfg = MambaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], num_hidden_layers=s["layers"], pad_token_id=0)
    elif s["arch"] == "mamba2":
        cfg = Mamba2Config(vocab_size=s["vocab"], hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                           num_heads=s["heads"], head_dim=2 * s["hidden"] // s["heads"], state_size=s["state"],
                           expand=2, n_groups=1, chunk_size=256, tie_word_embeddings=True, pad_token_id=0)
    else:
        cfg = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                          num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                          intermediate_size=s["intermediate"], tie_word_embeddings=True, pad_token_id=0,
                          max_position_embeddings=4096)
    cls = AutoModelForSequenceClassification if scalar else AutoModelForCausalLM
    if scalar:
        cfg.num_labels = 1
    return cls.from_config(cfg).to(dev)
