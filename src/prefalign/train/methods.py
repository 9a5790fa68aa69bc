"""The method registry: every training method, one entry each, and the only place methods are told apart.

An entry carries the method's config class (its own hyperparameters, with the paper's defaults), its
data unit, its loss (offline) or advantage estimator (RL), where the KL to the reference enters, whether
it needs a reference, and which trainer runs it. The CLI, recipes, tasks, the bench and both trainers
look methods up here.

A loss's keyword-only parameters are exactly its method's hyperparameters, spelled as the config's
fields (tests/test_methods.py checks both ways). Adding a DPO variant: one pure function in
losses/preference.py, a config class below when it has hyperparameters of its own, one line in
METHODS, and a test of the loss.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from ..config import ConfigError, apply_overrides, load_config, read_mapping, shown
from ..losses import ppo as ppo_losses
from ..losses import preference as pref
from . import citations as cite
from .config import GroupConfig, OfflineConfig, ReferenceConfig, RLConfig, RunConfig

# ---------------------------------------------------------------- per-method configs


class Rpo(OfflineConfig):
    rpo_alpha: float = Field(0.0, ge=0, description="RPO (Pang et al. 2024): weight of the chosen answer's NLL")


class DPO(ReferenceConfig, Rpo):
    """DPO (Rafailov et al. 2023); with label_smoothing > 0, conservative DPO (Mitchell 2023)."""

    method: Literal["dpo"] = "dpo"
    beta: float = Field(0.1, gt=0, description="beta: how far the policy may move from the reference")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="assumed label-flip rate eps (cDPO)")


# cdpo's and robust's eps: a number, or `auto`: estimated from the training data when the run starts
# (train/noise.py, docs/noise.md), the value used recorded in run.json
FlipRate = Annotated[float, Field(ge=0, lt=0.5)] | Literal["auto"]


class CDPO(DPO):
    """Conservative DPO (Mitchell 2023): DPO that assumes a share of the labels are flipped."""

    method: Literal["cdpo"] = "cdpo"
    label_smoothing: FlipRate = Field(0.1, description="assumed label-flip rate eps in [0, 0.5), or auto: estimated "
                                                       "from the training data's duplicates (docs/noise.md)")


class Robust(DPO):
    """Robust DPO (Chowdhury et al. 2024): unbiased under label-flip rate eps < 1/2."""

    method: Literal["robust"] = "robust"
    label_smoothing: FlipRate = Field(0.1, description="label-flip rate eps of the data in [0, 0.5), or auto: "
                                                       "estimated from the training data's conflicting duplicates "
                                                       "(docs/noise.md)")


class IPO(ReferenceConfig, Rpo):
    """IPO (Azar et al. 2023): squared loss towards a margin of 1/(2 tau), tau = beta."""

    method: Literal["ipo"] = "ipo"
    beta: float = Field(0.1, gt=0, description="tau: the regularisation (target margin 1/(2 tau))")


class Hinge(ReferenceConfig, Rpo):
    """SLiC calibration (Zhao et al. 2023): a hinge on the reference-normalised margin."""

    method: Literal["hinge"] = "hinge"
    beta: float = Field(0.1, gt=0, description="scale of the margin inside the hinge")


class SimPO(Rpo):
    """SimPO (Meng et al. 2024): reference-free, length-normalised, with a target margin."""

    method: Literal["simpo"] = "simpo"
    beta: float = Field(2.0, gt=0, description="scale of the length-normalised reward")
    simpo_gamma: float = Field(0.5, description="gamma: target reward margin")


class ORPO(Rpo):
    """ORPO (Hong et al. 2024): NLL plus lambda times the odds-ratio loss; reference-free."""

    method: Literal["orpo"] = "orpo"
    beta: float = Field(0.1, ge=0, description="lambda: weight of the odds-ratio term")


class KTO(ReferenceConfig):
    """KTO (Ethayarajh et al. 2024) on unpaired examples labelled desirable or undesirable."""

    method: Literal["kto"] = "kto"
    beta: float = Field(0.1, gt=0, description="beta: sharpness of the value function")
    desirable_weight: float = Field(1.0, gt=0, description="lambda_D")
    undesirable_weight: float = Field(1.0, gt=0, description="lambda_U")


class SFT(OfflineConfig):
    """Supervised fine-tuning on completions (token-mean NLL)."""

    method: Literal["sft"] = "sft"
    assistant_turns: Literal["last", "all"] = Field(
        "all", description="conversations: train every assistant turn (as TRL's assistant-only loss does), or only "
                           "the last; system, user and tool messages are never trained")


class Reward(OfflineConfig):
    """A Bradley-Terry reward model (Ouyang et al. 2022) on a scalar head."""

    method: Literal["reward"] = "reward"
    margin_scale: float = Field(0.0, ge=0, description="subtract this times each pair's known margin (Llama 2)")

    @model_validator(mode="after")
    def _no_reference(self):
        # a scalar head has no next-token distribution to compare with a reference, and QLoRA's loader
        # is the causal LM's
        if self.kl_budget is not None or self.kl_every:
            raise ValueError("reward models have no KL to a reference: kl_budget / kl_every do not apply")
        if self.quantize_4bit or self.dtype in ("bf16", "fp16"):
            # the new scalar head is trained in full and reads the trunk's states in its own dtype
            raise ValueError("a reward model loads in fp32 (dtype: auto or fp32; precision: bf16 for bf16 compute); "
                             "quantize_4bit is for causal LMs")
        return self


class PPO(RLConfig):
    """PPO with a critic and GAE (Schulman et al. 2017; Ouyang et al. 2022)."""

    method: Literal["ppo"] = "ppo"
    vf_coef: float = Field(0.1, ge=0, description="weight of the value loss")
    clip_range_value: float = Field(0.2, gt=0, description="value clipping epsilon")
    gae_gamma: float = Field(1.0, ge=0, le=1, description="GAE discount gamma")
    gae_lambda: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    critic: Literal["value_head", "model"] = Field(
        "value_head", description="a value head on the policy trunk, or a second (scalar) model")
    whiten_advantages: bool = Field(True, description="normalise advantages per rollout")


class RLOO(GroupConfig):
    """RLOO (Ahmadian et al. 2024): the k samples' leave-one-out mean is the baseline; no critic."""

    method: Literal["rloo"] = "rloo"
    whiten_advantages: bool = Field(True, description="normalise advantages per rollout")


class GRPO(GroupConfig):
    """GRPO (Shao et al. 2024): the group-normalised score is the advantage; the KL in the loss."""

    method: Literal["grpo"] = "grpo"
    kl_penalty: Literal["reward_k1", "loss_k3", "loss_full"] = Field(
        "loss_k3", description="where the KL enters: k3 or the exact KL, in the loss (reward_k1 is refused)")

    @model_validator(mode="after")
    def _kl_in_the_loss(self):
        if self.kl_penalty == "reward_k1":
            # a group whose scores are equal (common with 0/1 rewards) is normalised by the std of its
            # KL sums alone: the advantage no longer depends on kl_coef
            raise ValueError("grpo normalises each group by its std, which cancels kl_coef in a k1 reward: use "
                             "kl_penalty: loss_k3 or loss_full")
        return self


# ---------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Method:
    name: str
    config: type[RunConfig]
    trainer: Literal["offline", "rl"]
    # one example: "pairs" (chosen, rejected), "unpaired" (a labelled completion + the mismatched one
    # KTO's KL point needs), "completions" (SFT), "prompts" (RL samples its own completions)
    unit: Literal["pairs", "unpaired", "completions", "prompts"]
    reference: bool  # needs the frozen reference's log-probs
    kl: str  # where the KL to the reference enters
    paper: str
    loss: Callable | None = None  # offline: (tensors..., *, hyperparameters) -> (loss (B,), metrics)
    advantages: Callable | None = None  # RL: (scores, kl, values, mask, *, kl_coef, ...) -> (adv, returns)
    inputs: Literal["logps", "scores"] = "logps"  # summed completion log-probs, or a scalar head's scores
    citation: tuple[str, ...] = ()  # its paper(s) as BibTeX (train/citations.py), printed in model cards

    @property
    def paired(self) -> bool:
        return self.unit == "pairs"

    @property
    def hyperparameters(self) -> tuple[str, ...]:
        fn = self.loss or self.advantages
        return tuple(n for n, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY)

    @cached_property
    def tensors(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(the tensors the loss needs, those it may take) by name, from its signature."""
        params = [(n, p) for n, p in inspect.signature(self.loss).parameters.items() if p.kind is not p.KEYWORD_ONLY]
        return tuple(n for n, p in params if p.default is p.empty), tuple(n for n, _ in params)

    def compute(self, tensors: dict[str, Any], cfg: RunConfig):
        """The loss on the tensors its signature names, with the config's values of its hyperparameters."""
        needed, taken = self.tensors
        if missing := [n for n in needed if n not in tensors]:
            raise TypeError(f"{self.name}'s loss needs {missing}, which the trainer did not pass")
        return self.loss(**{k: v for k, v in tensors.items() if k in taken},
                         **{k: getattr(cfg, k) for k in self.hyperparameters})


IN_LOSS = "implicit: the loss is a function of the policy/reference log-ratio"
METHODS: dict[str, Method] = {m.name: m for m in [
    Method("dpo", DPO, "offline", "pairs", True, IN_LOSS, "Rafailov et al. 2023", loss=pref.dpo, citation=(cite.DPO,)),
    Method("cdpo", CDPO, "offline", "pairs", True, IN_LOSS, "Mitchell 2023", loss=pref.cdpo, citation=(cite.CDPO,)),
    Method("robust", Robust, "offline", "pairs", True, IN_LOSS, "Chowdhury et al. 2024", loss=pref.robust,
           citation=(cite.ROBUST,)),
    Method("ipo", IPO, "offline", "pairs", True, IN_LOSS, "Azar et al. 2023", loss=pref.ipo, citation=(cite.IPO,)),
    Method("hinge", Hinge, "offline", "pairs", True, IN_LOSS, "Zhao et al. 2023", loss=pref.hinge,
           citation=(cite.SLIC_HF,)),
    Method("simpo", SimPO, "offline", "pairs", False, "none (reference-free)", "Meng et al. 2024", loss=pref.simpo,
           citation=(cite.SIMPO,)),
    Method("orpo", ORPO, "offline", "pairs", False, "none (reference-free)", "Hong et al. 2024", loss=pref.orpo,
           citation=(cite.ORPO,)),
    Method("kto", KTO, "offline", "unpaired", True, IN_LOSS, "Ethayarajh et al. 2024", loss=pref.kto,
           citation=(cite.KTO,)),
    Method("sft", SFT, "offline", "completions", False, "none", "", loss=pref.sft),
    Method("reward", Reward, "offline", "pairs", False, "none", "Ouyang et al. 2022", loss=pref.bradley_terry,
           inputs="scores", citation=(cite.INSTRUCTGPT, cite.BRADLEY_TERRY)),
    Method("ppo", PPO, "rl", "prompts", True, "kl_penalty: k1 in the reward (default) or in the loss",
           "Schulman et al. 2017", advantages=ppo_losses.gae_estimator,
           citation=(cite.PPO, cite.INSTRUCTGPT)),
    Method("rloo", RLOO, "rl", "prompts", True, "kl_penalty: k1 in the reward (default) or in the loss",
           "Ahmadian et al. 2024", advantages=ppo_losses.rloo_estimator, citation=(cite.RLOO,)),
    Method("grpo", GRPO, "rl", "prompts", True, "kl_penalty: k3 (default) or the exact KL, in the loss",
           "Shao et al. 2024", advantages=ppo_losses.grpo_estimator, citation=(cite.GRPO,)),
]}
# terms a config switches on beyond its method's loss, cited when on: key -> (the methods where the key
# is such a term (None: any), their BibTeX). cdpo and robust own label_smoothing: for them it is the method.
TERMS: dict[str, tuple[tuple[str, ...] | None, tuple[str, ...]]] = {
    "rpo_alpha": (None, (cite.RPO, cite.RPO_LIU)),
    "label_smoothing": (("dpo",), (cite.CDPO,)),
    "kl_target": (None, (cite.ADAPTIVE_KL,)),
}
# keys that were renamed: the old name, in any method's config, says where it went
RENAMED = {
    "gamma": "'gamma' was renamed: simpo_gamma (simpo) or gae_gamma (ppo)",
    "lam": "'lam' was renamed: gae_lambda (ppo)",
    "kl_estimator": "kl_estimator was replaced by kl_penalty (reward_k1 | loss_k3 | loss_full): a detached k3 "
                    "reward does not have the gradient of the KL; see docs/rlhf.md, 'Which KL'",
}


def citations(config: dict[str, Any]) -> list[str]:
    """The BibTeX entries a run with this (resolved) config cites: its method's paper, then the papers of
    the terms it switched on (TERMS), each entry once."""
    spec = get_method(config.get("method", "dpo"))
    entries = list(spec.citation)
    for key, (methods, bib) in TERMS.items():
        if config.get(key) and (methods is None or spec.name in methods):
            entries += bib
    return list(dict.fromkeys(entries))


def get_method(name: str) -> Method:
    if not isinstance(name, str) or name not in METHODS:  # a list or mapping is no name (nor hashable)
        close = difflib.get_close_matches(name, METHODS, n=1) if isinstance(name, str) else []
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown method {shown(name)} (choose one of {', '.join(METHODS)}){hint}")
    return METHODS[name]


def own_keys(cls: type[RunConfig]) -> list[str]:
    """The keys a method's config adds to the shared ones (RunConfig, OfflineConfig + reference, RLConfig)."""
    base = RLConfig if issubclass(cls, RLConfig) else ReferenceConfig
    shared = base.model_fields

    def redefined(k: str) -> bool:
        mine, theirs = cls.model_fields[k], shared[k]
        return mine.default != theirs.default or mine.annotation != theirs.annotation

    return [k for k in cls.model_fields if k != "method" and (k not in shared or redefined(k))]


def _foreign_keys(name: str, data: dict[str, Any], source: str) -> None:
    """A top-level key the method's config does not have: say whose key it is, or what it became."""
    cls = METHODS[name].config
    problems = []
    for key in data:
        if key in cls.model_fields:
            continue
        owners = [m for m, spec in METHODS.items() if key in spec.config.model_fields]
        if key in RENAMED:
            problems.append(RENAMED[key])
        elif owners:
            problems.append(f"'{key}' is a key of {', '.join(owners)}, not of {name}")
        else:
            close = difflib.get_close_matches(str(key), list(cls.model_fields), n=1, cutoff=0.6)  # YAML's 1: too
            problems.append(f"unknown key '{key}'" + (f"; did you mean '{close[0]}'?" if close else ""))
    if problems:
        own = ", ".join(own_keys(cls)) or "none"
        raise ConfigError(f"{source}: method {name}: " + "; ".join(problems)
                          + f". {name}'s own keys: {own} (every key: prefalign config show {name})")


def train_config(data: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate a train config (a mapping with `method`, default dpo) into its method's config class."""
    name = data.get("method", "dpo")
    try:
        spec = get_method(name)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    _foreign_keys(name, data, source)
    return load_config(spec.config, base={**data, "method": name}, source=source)


def make_config(**fields: Any) -> RunConfig:
    """The Python API's way to a config: `make_config(method="simpo", model=..., data=..., output=...)`."""
    return train_config(fields, "make_config")


def load_train_config(path: str | Path | None = None, overrides: list[str] | None = None,
                      base: dict[str, Any] | None = None) -> RunConfig:
    """`base` <- YAML file <- key=value overrides (later wins), validated into the method's config."""
    data: dict[str, Any] = {**(base or {}), **(read_mapping(path) if path is not None else {})}
    return train_config(apply_overrides(data, overrides or []), str(path) if path is not None else "command line")
