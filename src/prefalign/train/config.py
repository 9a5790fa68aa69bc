"""The typed configs of `prefalign train`: what every run has, what offline and RL runs add.

Each method's own config (its hyperparameters, with the paper's defaults) derives from one of these in
train/methods.py, where the method is registered. Every field carries a description: `prefalign train
--method NAME --help` and `prefalign config show NAME` print them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ..config import ConfigError, Runtime, Sampling, StrictModel, apply_overrides, read_mapping
from ..data.mixture import DataSource, as_entries, check_eval_sets, check_mixture
from ..models.hub import check_repo_id, default_repo_id


class LoraSettings(StrictModel):
    r: int = Field(8, ge=1, description="adapter rank")
    lora_alpha: float | None = Field(None, description="scaling numerator; default 2 r")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input")
    target_modules: list[str] | str | None = Field(
        None, description="module names to adapt; default: per architecture (models/load.py)")


class Guards(StrictModel):
    """Rules checked every `guard_every` steps (docs/guardrails.md); a rule left unset is not checked."""

    kl_max: float | None = Field(None, gt=0, description="most kl/policy_ref_token (nats per token, the KL monitor's "
                                                         "exact KL) a checkpoint may have")
    retention_drop_max: float | None = Field(
        None, ge=0, le=1, description="most a suite's score (share right, greedy) may fall below the reference's, "
                                      "absolute: 0.05 = 5 points; needs suites")
    perplexity_increase_max: float | None = Field(
        None, ge=0, description="most perplexity on `text` may rise over the reference's, relative: 0.1 = +10%; "
                                "needs text")
    min_heldout_accuracy: float | None = Field(
        None, ge=0, le=1, description="least held-out preference accuracy (eval_data's rewards/accuracy; reward "
                                      "models: reward_model/accuracy); needs eval_data")
    min_heldout_reward: float | None = Field(
        None, description="RL: least held-out reward (the mean raw score of `reward` on completions sampled for "
                          "eval_prompts with a fixed seed); needs eval_prompts")
    action: Literal["stop", "rollback", "continue"] = Field(
        "stop", description="when a rule breaks: stop (final/ is the model as it is), rollback (the run ends and "
                            "final/ is the last guard checkpoint that kept every rule), or continue (the run goes on; "
                            "that step is no candidate for select: frontier)")
    suites: list[str] = Field([], description="retention suites (shipped names or suite YAML files, as prefalign "
                                              "eval --suite), scored greedily at every guard step")
    suite_limit: int | None = Field(None, ge=1, description="the first N items of each suite only")
    text: str | None = Field(None, description="JSONL of held-out text for perplexity: {text} or {prompt, completion} "
                                               "rows (as prefalign eval --text), or pairs' {prompt, chosen}")


class RunConfig(Runtime):
    """What every training run has: a model, an output folder, the optimizer and the machinery.

    The base class of every method's config (`prefalign.TrainConfig` in the Python API): build one
    with `for_method` or `from_yaml`, which pick the method's own class (its hyperparameters, with the
    paper's defaults) from the registry in train/methods.py.
    """

    model: str = Field(..., description="local HF model folder, .gguf file, LoRA run's final/, or a Hub id "
                                        "org/name[@revision] (docs/hub.md)")
    output: str = Field(..., description="run folder")

    max_steps: int = Field(100, ge=1, description="optimizer steps (RL: rollout + update iterations)")
    max_seconds: float | None = Field(
        None, gt=0, description="wall-clock budget of the training loop, counted over resumes: the run stops (with a "
                                "checkpoint) after the step that reaches it; the schedule still follows max_steps")
    batch_size: int = Field(8, ge=1, description="pairs / examples per micro-batch (offline); prompts per rollout (RL)")
    learning_rate: float = Field(5e-6, ge=0, description="AdamW learning rate")
    lr_schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="decay after warm-up")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping (global norm)")

    lora: bool | LoraSettings = Field(False, description="train LoRA adapters (true, or their settings)")
    kl_budget: float | None = Field(
        None, description="nats per token of kl/policy_ref_token; warn (and stop) above it")
    stop_on_kl_budget: bool = Field(False, description="stop the run (with a checkpoint) over kl_budget")
    kl_every: int | None = Field(
        None, ge=0, description="KL monitor: steps between exact-KL measurements; unset: about 4 a run; 0: off")
    kl_prompts: int = Field(16, ge=1, description="KL monitor: prompts (from eval_data, else the training data)")
    kl_max_new_tokens: int = Field(32, ge=1, description="KL monitor: tokens sampled per prompt")

    max_prompt_length: int = Field(256, ge=1, description="prompt tokens kept (the end is kept)")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="weights as loaded; auto: bf16 for a LoRA base on a GPU with bf16, else fp32 (a trained "
                            "weight stays fp32: use precision for bf16 compute)")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flex_attention"] = Field(
        "auto", description="attention kernels; auto: transformers' default (sdpa); flex_attention: shared-prompt/"
                            "packed rows as block masks, no T x T mask (trains on a GPU only); flash_attention_2: CUDA "
                            "+ flash_attn, packed rows as varlen, no shared-prompt rows")
    gradient_checkpointing: bool | Literal["selective"] = Field(
        False, description="true: every layer recomputed in backward; selective: only its cheap ops")
    quantize_4bit: bool = Field(False, description="QLoRA: 4-bit base via bitsandbytes (CUDA only)")
    distributed: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp", description="several processes (torchrun, accelerate launch, --nproc): ddp replicates the model, "
                           "fsdp shards weights, gradients and optimizer state (FSDP2), deepspeed: ZeRO through "
                           "accelerate (pip install deepspeed)")
    fsdp_cpu_offload: bool = Field(False, description="fsdp: keep the shards and optimizer state in CPU memory")
    deepspeed_stage: Literal[2, 3] | None = Field(
        None, description="distributed: deepspeed: ZeRO stage 2 shards gradients and optimizer state, 3 the "
                          "weights too; default 2")
    trust_remote_code: bool = Field(False, description="run the model folder's own code (only if you trust it)")
    logits_chunk_mb: float = Field(128.0, gt=0, description="memory per chunk of output-head logits")
    # glibc's own threshold grows to 32 MB after the first large free; a step's activations then come
    # from the heap and its freed holes stay resident (SmolLM2 LoRA DPO: 4.4 GB live, 7.8 GB RSS; with
    # 1: 4.4 GB, but every fresh block is page-faulted in again: 1.5x the step time)
    malloc_mmap_threshold_mb: float = Field(
        0.0, ge=0, le=32, description="glibc (Linux): freed blocks of at least this many MB go back to the OS, a "
                                      "CPU memory/time trade; 0: glibc's default")

    guard_every: int = Field(0, ge=0, description="steps between guard checks (KL, retention, held-out accuracy: "
                                               "docs/guardrails.md), and at the last step; 0: none")
    guards: Guards = Field(default_factory=Guards, description="the rules of guard_every's checks")
    select: Literal["last", "frontier"] = Field(
        "last", description="final/: the last step's model, or frontier: the guard checkpoint with the best held-out "
                            "accuracy (RL: held-out reward) among those within every rule")
    save_every: int = Field(0, ge=0, description="steps between checkpoints; 0: only the final model")
    keep_checkpoints: int = Field(2, ge=1, description="newest checkpoints kept")
    # auto: sharded where FSDP2 shards (as accelerate's FSDP default, SHARDED_STATE_DICT): gathering a
    # full fine-tune's weights and AdamW state on rank 0 needs 3x the fp32 weights in one host's memory,
    # which is what FSDP avoids; elsewhere whole (DDP ranks hold whole tensors: nothing to shard)
    checkpoint_format: Literal["auto", "whole", "sharded"] = Field(
        "auto", description="checkpoints/step-N: whole tensors written by rank 0, or each rank's shards "
                            "(torch.distributed.checkpoint, safetensors); auto: sharded under fsdp with several "
                            "processes; either resumes on any process count")
    resume: bool = Field(False, description="continue from the newest checkpoint in `output`")
    log_every: int = Field(1, ge=1, description="steps between metrics.jsonl rows")
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio", "none"]] = Field(
        ["tensorboard"], description="experiment trackers given every metrics.jsonl row, the config and (prefalign "
                                     "report) the plots: tensorboard, wandb, mlflow, trackio (pip install "
                                     "'prefalign[NAME]'; settings from their own env vars: docs/trackers.md), or none")
    tracker_project: str | None = Field(
        None, description="the W&B / trackio project and MLflow experiment; default: WANDB_PROJECT or "
                          "MLFLOW_EXPERIMENT_NAME, else prefalign")
    max_bad_steps: int = Field(5, ge=1, description="consecutive NaN/Inf steps before the run stops")
    # docs/hub.md: checked (offline, token) before the run starts; the upload is the run's very last act
    push_to_hub: bool = Field(False, description="upload final/ to the Hugging Face Hub when the run ends "
                                                 "(needs the network and a token: hf auth login or HF_TOKEN)")
    hub_model_id: str | None = Field(
        None, description="push_to_hub: the model repo, org/name or name (in the token owner's namespace); "
                          "default: the output folder's name")
    hub_private: bool = Field(False, description="push_to_hub: create the repo private (an existing repo keeps "
                                                 "its visibility)")

    @field_validator("report_to", mode="before")
    @classmethod
    def _trackers(cls, value):
        # report_to=wandb or report_to=wandb,mlflow on the command line: one string
        return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_run(self):
        if len(set(self.report_to)) < len(self.report_to):
            raise ValueError(f"report_to names a tracker twice: {self.report_to}")
        if "none" in self.report_to and len(self.report_to) > 1:
            raise ValueError(f"report_to: none means no tracker; it cannot go with others: {self.report_to}")
        if self.quantize_4bit and not self.lora:
            raise ValueError("quantize_4bit (QLoRA) trains adapters only: set lora: true")
        if self.dtype in ("bf16", "fp16") and not self.lora:
            # pure low-precision weights would drop the small updates AdamW makes to them
            raise ValueError(f"dtype {self.dtype} is for a frozen LoRA base; a full fine-tune keeps fp32 weights "
                             "(use precision: bf16 for bf16 compute)")
        if self.deepspeed_stage is not None and self.distributed != "deepspeed":
            raise ValueError(f"deepspeed_stage is for distributed: deepspeed, not {self.distributed}")
        if self.checkpoint_format == "sharded" and self.distributed != "fsdp":
            # DeepSpeed's ZeRO partitions are not DTensors: its checkpoints are whole (train/deepspeed.py)
            raise ValueError(f"checkpoint_format: sharded writes FSDP2 shards; distributed: {self.distributed} "
                             "writes whole checkpoints: use whole (or auto)")
        if self.kl_budget is not None and self.kl_every == 0:
            raise ValueError("kl_budget is checked against the KL monitor: it needs kl_every > 0 (or unset)")
        check_guards(self)
        if not self.push_to_hub and (self.hub_model_id is not None or self.hub_private):
            raise ValueError("hub_model_id and hub_private are for push_to_hub: true")
        if self.push_to_hub:
            check_repo_id(self.hub_repo_id)
        return self

    @classmethod
    def for_method(cls, method: str = "dpo", /, **fields: Any) -> RunConfig:
        """The validated config of `method` (any name of `prefalign config list`) with `fields` set.

        `TrainConfig.for_method("dpo", model="m", data="pairs.jsonl", output="runs/x", beta=0.2)` is a
        `DPO` config. A key the method does not have, a misspelt key or a bad value raises a
        `ConfigError` naming the key (and the method that has it, or the closest valid key).
        """
        name = "TrainConfig" if cls is RunConfig else cls.__name__  # the name the API exports it under
        return cls._validated({**fields, "method": method}, f"{name}.for_method")

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Sequence[str] = (), **fields: Any) -> RunConfig:
        """The config in a YAML file (its `method` key picks the class; default dpo), then `fields`,
        then `overrides` as the command line writes them (`"lora.r=16"`); later wins."""
        data = apply_overrides({**read_mapping(path), **fields}, list(overrides))
        return cls._validated(data, str(path))

    @classmethod
    def _validated(cls, data: dict[str, Any], source: str) -> RunConfig:
        # the registry imports these classes, so the class reaches the registry when called, not at import
        from .methods import train_config

        cfg = train_config(data, source)
        if not isinstance(cfg, cls):
            raise ConfigError(f"{source}: method {cfg.method}'s config is {type(cfg).__name__}, not a {cls.__name__}")
        return cfg

    @property
    def trackers(self) -> list[str]:
        return [t for t in self.report_to if t != "none"]

    @property
    def hub_repo_id(self) -> str:
        """Where push_to_hub uploads: hub_model_id, else the output folder's name (the token owner's namespace)."""
        return self.hub_model_id or default_repo_id(self.output)

    @property
    def zero_stage(self) -> int:
        return self.deepspeed_stage or 2

    @property
    def lora_settings(self) -> dict | None:
        if self.lora is False:
            return None
        settings = LoraSettings() if self.lora is True else self.lora
        return {k: v for k, v in settings.model_dump().items() if v is not None}


def check_guards(cfg: RunConfig) -> None:
    """What guard_every, guards and select need of each other (docs/guardrails.md)."""
    g = cfg.guards
    if cfg.guard_every == 0 and (g != Guards() or cfg.select != "last"):
        raise ValueError("guards and select: frontier are checked every guard_every steps: set guard_every > 0")
    if cfg.guard_every and cfg.kl_every == 0:
        raise ValueError("guard_every measures the KL with the KL monitor: it needs kl_every > 0 (or unset)")
    if g.retention_drop_max is not None and not g.suites:
        raise ValueError("guards.retention_drop_max compares suite scores: name guards.suites")
    if g.perplexity_increase_max is not None and g.text is None:
        raise ValueError("guards.perplexity_increase_max needs guards.text (the held-out text)")
    pairs, prompts = getattr(cfg, "eval_data", None) is not None, getattr(cfg, "eval_prompts", None) is not None
    if g.min_heldout_accuracy is not None and not pairs:
        raise ValueError("guards.min_heldout_accuracy needs held-out preference pairs: eval_data (an offline method's)")
    if g.min_heldout_reward is not None and not prompts:
        raise ValueError("guards.min_heldout_reward needs held-out prompts: eval_prompts (an RL method's)")
    if cfg.select == "frontier" and not (pairs or prompts):
        raise ValueError("select: frontier ranks by a held-out figure: eval_data (offline methods: held-out accuracy) "
                         "or eval_prompts (RL: held-out reward)")


class OfflineConfig(RunConfig):
    """A run on a fixed dataset (the DPO family, SFT, reward models)."""

    data: str | list[DataSource] = Field(
        ..., description="training data file or folder, a Hub dataset id org/name[@revision][/file] (docs/hub.md), "
                         "or a list of sources {path, weight | fraction, split, format} mixed with the run's seed "
                         "(docs/data-mixtures.md)")
    eval_data: str | dict[str, DataSource] | None = Field(
        None, description="held-out data (as data), scored every eval_every steps (eval/...); or named sets "
                          "{name: path or {path, fraction, split, format}}, each logged as eval/<name>/...")
    format: str = Field("auto", description="data shape (see `prefalign data`)")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    eval_every: int = Field(0, ge=0, description="steps between eval_data passes; 0: none")
    max_length: int = Field(512, ge=2, description="prompt + answer tokens kept")
    share_prompt: bool | Literal["auto"] = Field(
        "auto", description="compute each pair's prompt once: one row per pair (models whose every layer honours "
                            "the mask) or, for Mamba, Mamba-2 and their hybrids, both answers continued from the "
                            "prompt's recurrent state (auto: Mamba-1 on CPU, where measured faster; true: wherever "
                            "exact); false: padded rows")
    packing: bool = Field(False, description="padding-free rows: sequences end to end, block-diagonal mask")

    @field_validator("data", mode="before")
    @classmethod
    def _entries(cls, value):
        return as_entries(value)

    @field_validator("eval_data", mode="before")
    @classmethod
    def _named_sets(cls, value):
        return {k: {"path": v} if isinstance(v, str) else v for k, v in value.items()} if isinstance(value, dict) \
            else value

    @model_validator(mode="after")
    def _check_sources(self):
        check_mixture(self.data, "data")
        check_eval_sets(self.eval_data)
        return self


class ReferenceConfig(OfflineConfig):
    """An offline method anchored to a frozen reference model."""

    reference: Literal["auto", "precompute", "adapter", "copy"] = Field(
        "auto", description="reference log-probs: precomputed once, the adapters switched off, or a frozen copy")


class RLConfig(RunConfig, Sampling):
    """PPO and the critic-free RLOO/GRPO on the same rollouts. One step = one rollout batch of
    `batch_size` prompts (x `samples_per_prompt`) and `ppo_epochs` passes of minibatch updates."""

    prompts: str | list[DataSource] = Field(
        ..., description="prompt file (or any preference file: its prompts), a Hub dataset id, or a list of sources "
                         "mixed as `data` is (docs/data-mixtures.md)")
    reward: str = Field(..., description="MODULE:FUNCTION, FILE.py:FUNCTION, or a reward-model folder or Hub id")
    eval_prompts: str | None = Field(
        None, description="held-out prompt file (as prompts): at guard steps the policy samples one completion per "
                          "prompt with a fixed seed and `reward` scores it (guard/heldout_reward, docs/guardrails.md)")
    format: str = Field("auto", description="data shape of `prompts`")
    samples_per_prompt: int = Field(1, ge=1, description="completions sampled per prompt (k)")

    kl_coef: float = Field(0.05, ge=0, description="weight of the KL penalty")
    kl_target: float | None = Field(
        None, description="adaptive controller (Ziegler et al. 2019) when set: nats per sequence")
    kl_horizon: int = Field(10_000, ge=1, description="the adaptive controller's horizon")
    # docs/rlhf.md, "Which KL": k1 in the reward, or k3 / the exact vocabulary KL in the loss with its
    # score-function part (losses/ppo.py)
    kl_penalty: Literal["reward_k1", "loss_k3", "loss_full"] = Field(
        "reward_k1", description="where the KL enters: k1 in the reward, or k3 / the exact KL in the loss")
    min_new_tokens: int = Field(
        0, ge=0, description="completions that end (EOS) before this many tokens lose early_eos_penalty")
    early_eos_penalty: float = Field(1.0, description="subtracted from the score of an early EOS")
    missing_eos_penalty: float | None = Field(None, description="subtracted from the score of completions without EOS")
    reward_norm: Literal["none", "batch", "running"] = Field("none", description="score normalisation")
    reward_clip: float | None = Field(None, gt=0, description="scores clipped to [-reward_clip, reward_clip]")

    ppo_epochs: int = Field(4, ge=1, description="passes over each rollout")
    num_minibatches: int = Field(1, ge=1, description="minibatches per pass")
    clip_range: float = Field(0.2, gt=0, description="PPO ratio clipping epsilon")
    reference: Literal["auto", "adapter", "copy"] = Field(
        "auto", description="reference: the adapters switched off (LoRA) or a frozen copy")

    @field_validator("prompts", mode="before")
    @classmethod
    def _entries(cls, value):
        return as_entries(value)

    @model_validator(mode="after")
    def _check_rl(self):
        check_mixture(self.prompts, "prompts")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0: RL samples from softmax(logits / temperature)")
        if self.top_k or self.top_p < 1.0:
            # the ratio, the log-probs and every KL penalty are of the untruncated softmax(logits / T);
            # samples from a truncated one would make all of them wrong
            raise ValueError("top_k/top_p truncate the sampling distribution, which the policy gradient and the KL "
                             "penalty do not score: use top_k: 0, top_p: 1.0 for RL")
        rows = self.batch_size * self.samples_per_prompt
        if rows % self.num_minibatches:
            raise ValueError(f"batch_size x samples_per_prompt ({rows}) must divide into num_minibatches "
                             f"({self.num_minibatches})")
        if self.reference == "adapter" and not self.lora:
            raise ValueError("reference: adapter needs lora: true")
        return self


class GroupConfig(RLConfig):
    """RLOO and GRPO compare the k samples of each prompt."""

    samples_per_prompt: int = Field(4, ge=1, description="completions sampled per prompt (k >= 2: compared)")

    @model_validator(mode="after")
    def _a_group(self):
        if self.samples_per_prompt < 2:
            raise ValueError(f"{getattr(self, 'method', 'this method')} compares samples of the same prompt: "
                             "samples_per_prompt must be >= 2")
        return self
