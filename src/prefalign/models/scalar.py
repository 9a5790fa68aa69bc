"""Scalar heads on a causal-LM trunk: reward models (one score per sequence) and critics (one value
per token). A reward model is a standard `AutoModelForSequenceClassification` folder with one label,
so anything that reads HF models reads ours.

Where the score is read: at the last *attended* position of each row, found from the attention mask.
transformers' own forward finds it from `pad_token_id` instead, which is wrong whenever the pad token
is also the EOS token that ends every completion (a common setting): it would read the token before
EOS. Both agree when pad != eos (tested).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import AutoModelForSequenceClassification

from ..errors import PrefalignError
from ..losses.ppo import last_token_index
from .hub import resolve_model
from .load import ModelError, _attention_kwargs, _from_pretrained, _local, hidden_states, refuse_pickled_adapter, unwrap


def is_reward_model(path: str | Path) -> bool:
    config = resolve_model(path, tokenizer_only=True) / "config.json"  # a Hub id: its configs, no weights
    if not config.exists():
        return False
    archs = json.loads(config.read_text()).get("architectures") or []
    return any(a.endswith("ForSequenceClassification") for a in archs)


def load_scalar_model(path: str | Path, *, pad_token_id: int | None = None, dtype: torch.dtype = torch.float32,
                      trust_remote_code: bool = False, device: str | torch.device = "cpu",
                      attn_implementation: str = "auto", training: bool = False):
    """A one-label sequence-classification model from a reward-model folder, or a new scalar head
    (zero-initialised, so it starts by scoring everything 0) on a causal LM's trunk. attn_implementation
    and training as in `load_model`."""

    path = _local(path, code=trust_remote_code)
    if (path / "adapter_config.json").exists():  # transformers would hand an adapter folder to PEFT
        refuse_pickled_adapter(path)
    if not any(path.glob("*.safetensors")):
        raise ModelError(f"{path}: no *.safetensors weights; prefalign never unpickles .bin/.pt files")
    fresh = not is_reward_model(path)
    kw: dict[str, Any] = {"num_labels": 1, "dtype": dtype, "trust_remote_code": trust_remote_code,
                          "use_safetensors": True, "local_files_only": True,
                          **_attention_kwargs(attn_implementation, device, training)}
    try:
        model = _from_pretrained(AutoModelForSequenceClassification, path, kw)
    except PrefalignError:  # a ModelError or ConfigError already worded (both are ValueErrors too)
        raise
    except ValueError as e:
        raise ModelError(f"{path}: this architecture has no sequence-classification head in transformers "
                         f"(a reward model or critic model needs one; PPO's critic: value_head): {e}") from None
    if fresh:
        with torch.no_grad():
            score_head(model).weight.zero_()
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id  # transformers' own forward needs one for batches
    return model.to(device)


def score_head(model) -> torch.nn.Module:
    hf = unwrap(model)
    head = getattr(hf, "score", None)
    if head is None:
        raise ModelError(f"{type(hf).__name__} has no 'score' head")
    return head


def token_scores(model, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """(B, T) the head applied at every position (a critic's values), fp32."""
    return score_head(model)(hidden_states(model, input_ids, attention_mask)).squeeze(-1).float()


def sequence_scores(model, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """(B,) the head at the last attended token of each row, for left- or right-padded rows."""
    hidden = hidden_states(model, input_ids, attention_mask)  # (B, T, H)
    last = last_token_index(attention_mask)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    return score_head(model)(hidden[rows, last]).squeeze(-1).float()
