"""`prefalign train`: the typed config every offline run is validated into."""

from __future__ import annotations

import difflib
from typing import Literal

from pydantic import Field, model_validator

from ..config import StrictModel
from ..losses import METHODS

RL_METHODS = ("ppo", "rloo", "grpo")


class LoraSettings(StrictModel):
    r: int = 8
    lora_alpha: float | None = None  # default 2 r
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None  # default: per architecture (models/load.py)


class RunConfig(StrictModel):
    """What every training run has: a model, an output folder, the optimizer and the machinery."""

    model: str = Field(..., description="local HF model folder, .gguf file or LoRA run's final/")
    output: str = Field(..., description="run folder")

    max_steps: int = 100
    batch_size: int = 8  # pairs / examples per micro-batch (offline); prompts per rollout (RL)
    grad_accum: int = 1
    learning_rate: float = 5e-6
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0

    lora: bool | LoraSettings = False
    kl_budget: float | None = None  # nats per token of kl/policy_ref_token; warn (and stop) above it
    stop_on_kl_budget: bool = False
    # the KL monitor (train/kl_monitor.py): exact KL to the reference on sampled completions
    kl_every: int | None = None  # steps between measurements; None: about 4 a run; 0: off
    kl_prompts: int = 16  # prompts from eval_data (else the first of the training data)
    kl_max_new_tokens: int = 32

    max_length: int = 512
    max_prompt_length: int = 256
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # true: every layer recomputed in backward; selective: only its cheap ops (models/load.py)
    gradient_checkpointing: bool | Literal["selective"] = False
    quantize_4bit: bool = False  # QLoRA: 4-bit base via bitsandbytes (CUDA only)
    trust_remote_code: bool = False
    device: str = "auto"
    logits_chunk_mb: float = 128.0
    # glibc (Linux), a CPU memory/time trade: blocks of at least this many MB are mmapped and handed
    # back to the OS when freed. glibc's own threshold grows to 32 MB after the first large free;
    # a step's activations then come from the heap and its freed holes stay resident (SmolLM2 LoRA
    # DPO, 1 thread: 4.4 GB live, 7.8 GB RSS; with 1: 4.4 GB RSS, but every fresh block is page-
    # faulted in again: 1.5x the step time on a busy 2-core machine). 0: glibc's default.
    malloc_mmap_threshold_mb: float = Field(0.0, ge=0, le=32)

    save_every: int = 0  # 0: only the final model
    keep_checkpoints: int = 2
    resume: bool = False  # continue from the newest checkpoint in `output`
    eval_every: int = 0
    log_every: int = 1
    max_bad_steps: int = 5  # consecutive NaN/Inf steps before the run stops

    def _check_common(self) -> None:
        if self.quantize_4bit and not self.lora:
            raise ValueError("quantize_4bit (QLoRA) trains adapters only: set lora: true")
        for name in ("max_steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.kl_budget is not None and self.kl_every == 0:
            raise ValueError("kl_budget is checked against the KL monitor: it needs kl_every > 0 (or unset)")

    @property
    def lora_settings(self) -> dict | None:
        if self.lora is False:
            return None
        settings = LoraSettings() if self.lora is True else self.lora
        return {k: v for k, v in settings.model_dump().items() if v is not None}


class TrainConfig(RunConfig):
    """One run of an offline method. Keys spelled as scripts that drive prefalign expect them."""

    method: str = "dpo"
    data: str = Field(..., description="preference data file or folder")
    eval_data: str | None = None
    format: str = "auto"  # data shape (see `prefalign data`)

    beta: float = 0.1
    label_smoothing: float | None = None  # cdpo / robust flip rate; None: the method's default (0.1)
    gamma: float = 0.5  # simpo target margin
    rpo_alpha: float = 0.0  # NLL on chosen added to any paired loss (RPO)
    desirable_weight: float = 1.0  # kto
    undesirable_weight: float = 1.0  # kto
    margin_scale: float = 0.0  # reward: subtract this times each pair's known margin (Llama 2)

    reference: Literal["auto", "precompute", "adapter", "copy"] = "auto"
    share_prompt: bool | Literal["auto"] = "auto"  # one row per pair, prompt computed once (attention models)
    packing: bool = False  # padding-free rows: sequences end to end, block-diagonal mask (attention models)

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.method not in METHODS:
            close = difflib.get_close_matches(self.method, [*METHODS, *RL_METHODS], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"unknown method '{self.method}' (choose one of {', '.join([*METHODS, *RL_METHODS])})"
                             f"{hint}")
        self._check_common()
        return self


class RLConfig(RunConfig):
    """PPO and the critic-free RLOO/GRPO on the same rollouts. One step = one rollout batch of
    `batch_size` prompts (x `samples_per_prompt`) and `ppo_epochs` passes of minibatch updates."""

    method: Literal["ppo", "rloo", "grpo"] = "ppo"
    prompts: str = Field(..., description="prompt file (or any preference file: its prompts)")
    reward: str = Field(..., description="MODULE:FUNCTION, FILE.py:FUNCTION or a reward-model folder")
    format: str = "auto"

    # sampling
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    samples_per_prompt: int = 1  # k; rloo and grpo need k >= 2 (default 4 for them)

    # the KL-regularised reward
    kl_coef: float = 0.05
    kl_target: float | None = None  # adaptive controller (Ziegler et al. 2019) when set: nats per sequence
    kl_horizon: int = 10_000
    # where the KL enters the objective (losses/ppo.py, README "Which KL"): k1 in the reward, or k3 /
    # the exact vocabulary KL in the loss with its score-function part; default reward_k1 (ppo, rloo)
    # and loss_k3 (grpo, whose advantage is the group-normalised score alone)
    kl_penalty: Literal["reward_k1", "loss_k3", "loss_full"] = "reward_k1"
    min_new_tokens: int = 0  # completions that end (EOS) before this many tokens lose early_eos_penalty
    early_eos_penalty: float = 1.0  # sampling is left untouched, so log-probs and KL stay those sampled
    missing_eos_penalty: float | None = None  # subtracted from the score of completions without EOS
    reward_norm: Literal["none", "batch", "running"] = "none"
    reward_clip: float | None = None

    # the update
    ppo_epochs: int = 4
    num_minibatches: int = 1
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    critic: Literal["value_head", "model"] = "value_head"  # a head on the policy trunk, or a second model
    reference: Literal["auto", "adapter", "copy"] = "auto"

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data):
        if isinstance(data, dict) and "kl_estimator" in data:
            raise ValueError("kl_estimator was replaced by kl_penalty (reward_k1 | loss_k3 | loss_full): a detached "
                             "k3 reward does not have the gradient of the KL; see README 'Which KL'")
        return data

    @model_validator(mode="after")
    def _check(self) -> RLConfig:
        self._check_common()
        if self.method == "grpo" and "kl_penalty" not in self.model_fields_set:
            object.__setattr__(self, "kl_penalty", "loss_k3")
        if self.method == "grpo" and self.kl_penalty == "reward_k1":
            # a group whose scores are equal (common with 0/1 rewards) is normalised by the std of its
            # KL sums alone: the advantage no longer depends on kl_coef
            raise ValueError("grpo normalises each group by its std, which cancels kl_coef in a k1 reward: use "
                             "kl_penalty: loss_k3 or loss_full")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0: RL samples from softmax(logits / temperature)")
        if self.top_k or self.top_p < 1.0:
            # the ratio, the log-probs and every KL penalty are of the untruncated softmax(logits / T);
            # samples from a truncated one would make all of them wrong
            raise ValueError("top_k/top_p truncate the sampling distribution, which the policy gradient and the KL "
                             "penalty do not score: use top_k: 0, top_p: 1.0 for RL")
        if self.method in ("rloo", "grpo") and "samples_per_prompt" not in self.model_fields_set:
            object.__setattr__(self, "samples_per_prompt", 4)
        if self.method in ("rloo", "grpo") and self.samples_per_prompt < 2:
            raise ValueError(f"{self.method} compares samples of the same prompt: samples_per_prompt must be >= 2")
        rows = self.batch_size * self.samples_per_prompt
        if rows % self.num_minibatches:
            raise ValueError(f"batch_size x samples_per_prompt ({rows}) must divide into num_minibatches "
                             f"({self.num_minibatches})")
        if self.reference == "adapter" and not self.lora:
            raise ValueError("reference: adapter needs lora: true")
        return self
