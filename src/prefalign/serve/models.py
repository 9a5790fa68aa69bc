"""The models a server holds: each MODEL argument is a name clients choose by; base weights are loaded once.

A model folder is loaded as it is. A LoRA run's `final/` (an adapter folder) is attached as a PEFT
adapter to its base, and several adapters on one base share that base's weights: `prefalign serve
BASE RUN/final` holds the base once and serves it both bare (adapters disabled) and adapted. An
adapter whose base is itself an adapter (iterative DPO, PPO after DPO) is attached to that chain
merged (models/load.py merges chains). A batch runs one served model at a time; batches of several
models take turns step by step (engine.py).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel

from ..errors import ModelError
from ..models.generate import eos_ids
from ..models.hub import adapter_base, resolve_model
from ..models.load import load_model, load_tokenizer, load_tokenizer_for, refuse_pickled_adapter


@dataclass
class Base:
    path: str
    model: torch.nn.Module  # a PeftModel when adapters are attached to it


@dataclass
class Served:
    name: str  # what clients send as `model`
    base: Base
    adapter: str | None  # the PEFT adapter's name on base.model, or None: the base itself
    tokenizer: object
    eos: list[int]
    context: int  # prompt + completion tokens at most

    def active(self):
        """Selects this model's weights for the next forward pass: its adapter, or none."""
        model = self.base.model
        if not isinstance(model, PeftModel):
            return nullcontext()
        if self.adapter is None:
            return model.disable_adapter()
        model.set_adapter(self.adapter)
        return nullcontext()

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))


def _adapter_base(name: str) -> str | None:
    """The base of an adapter (a folder or a Hub id), as load_model takes it; None for a whole model."""
    return adapter_base(resolve_model(name, tokenizer_only=True))


def _context(model, tokenizer) -> int:
    limits = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [x for x in limits if isinstance(x, int) and 0 < x < 10**8]
    return min(limits) if limits else 2048


def load_served(paths: list[str], device: torch.device, dtype: torch.dtype = torch.float32,
                chat_template: str | None = None) -> dict[str, Served]:
    """name -> Served for each MODEL argument (its path as given is its name, as vLLM names models)."""
    if len(set(paths)) != len(paths):
        raise ModelError("the same model is named twice")
    bases: dict[str, Base] = {}

    def base_of(path: str) -> Base:
        key = str(Path(path).resolve())
        if key not in bases:
            bases[key] = Base(path, load_model(path, dtype=dtype, device=device).eval().requires_grad_(False))
        return bases[key]

    served = {}
    for i, name in enumerate(paths):
        base_path = _adapter_base(name)
        folder = str(refuse_pickled_adapter(resolve_model(name))) if base_path is not None else None
        base = base_of(base_path if base_path is not None else name)
        adapter = None
        if folder is not None:
            adapter = f"adapter{i}"
            if isinstance(base.model, PeftModel):
                base.model.load_adapter(folder, adapter_name=adapter)
            else:
                base.model = PeftModel.from_pretrained(base.model, folder, adapter_name=adapter).eval()
            base.model.requires_grad_(False)
        tokenizer = load_tokenizer_for(name) if base_path is not None else load_tokenizer(name)
        if chat_template is not None and not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = chat_template
        hf = base.model.get_base_model() if isinstance(base.model, PeftModel) else base.model
        served[name] = Served(name, base, adapter, tokenizer, eos_ids(tokenizer, hf), _context(hf, tokenizer))
    return served
