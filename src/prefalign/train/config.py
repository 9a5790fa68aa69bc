"""`prefalign train`: the typed config every offline run is validated into."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..config import StrictModel
from ..losses import METHODS


class LoraSettings(StrictModel):
    r: int = 8
    lora_alpha: float | None = None  # default 2 r
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None  # default: per architecture (models/load.py)


class TrainConfig(StrictModel):
    """One run of an offline method. Keys spelled as scripts that drive prefalign expect them."""

    method: str = "dpo"
    model: str = Field(..., description="local HF model folder or .gguf file")
    data: str = Field(..., description="preference data file or folder")
    eval_data: str | None = None
    output: str = Field(..., description="run folder")
    format: str = "auto"  # data shape (see `prefalign data`)

    max_steps: int = 100
    batch_size: int = 8  # pairs (or unpaired examples) per micro-batch
    grad_accum: int = 1
    learning_rate: float = 5e-6
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0

    beta: float = 0.1
    label_smoothing: float | None = None  # cdpo / robust flip rate; None: the method's default (0.1)
    gamma: float = 0.5  # simpo target margin
    rpo_alpha: float = 0.0  # NLL on chosen added to any paired loss (RPO)
    desirable_weight: float = 1.0  # kto
    undesirable_weight: float = 1.0  # kto

    lora: bool | LoraSettings = False
    reference: Literal["auto", "precompute", "adapter", "copy"] = "auto"
    kl_budget: float | None = None  # nats per token of kl/ref; warn (and stop) above it
    stop_on_kl_budget: bool = False

    max_length: int = 512
    max_prompt_length: int = 256
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    gradient_checkpointing: bool = False
    quantize_4bit: bool = False  # QLoRA: 4-bit base via bitsandbytes (CUDA only)
    trust_remote_code: bool = False
    device: str = "auto"
    logits_chunk_mb: float = 128.0
    share_prompt: bool | Literal["auto"] = "auto"  # one row per pair, prompt computed once (attention models)

    save_every: int = 0  # 0: only the final model
    keep_checkpoints: int = 2
    resume: bool = False  # continue from the newest checkpoint in `output`
    eval_every: int = 0
    log_every: int = 1
    max_bad_steps: int = 5  # consecutive NaN/Inf steps before the run stops

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.method not in METHODS:
            import difflib

            close = difflib.get_close_matches(self.method, list(METHODS), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"unknown method '{self.method}' (choose one of {', '.join(METHODS)}){hint}")
        if self.quantize_4bit and not self.lora:
            raise ValueError("quantize_4bit (QLoRA) trains adapters only: set lora: true")
        for name in ("max_steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        return self

    @property
    def lora_settings(self) -> dict | None:
        if self.lora is False:
            return None
        settings = LoraSettings() if self.lora is True else self.lora
        return {k: v for k, v in settings.model_dump().items() if v is not None}
