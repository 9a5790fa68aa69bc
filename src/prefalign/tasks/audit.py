"""`prefalign audit CONFIG.yaml -o OUT`: should this team move from PPO to DPO, on its own data and hardware?

Arms, each stage in its own process (tasks/stages.py): DPO (offline, on the user's pairs, or on pairs
made by sampling `samples` continuations per train prompt from the model and letting the reward pick
best and worst), and the RLHF arm: a reward-model stage when there is data but no reward, then PPO
(value head) and RLOO (critic-free). Every setting of `sweep` trains with `sweep.seed` and is
evaluated on the validation prompts; `choose` (tasks/audit_verdict.py) picks each arm's settings
there; the chosen settings then train afresh with every test seed and are evaluated on the test
prompts, which played no part in choosing. The sweep trains with its own seed (`sweep.seed`, not a
test seed) and none of its runs is reused: the setting it picks scored highest on validation partly
by its run's luck, and reusing that run would carry the luck into the test. Per stage: wall clock,
CPU seconds, device-hours, peak memory, model copies, tokens sampled and trained, energy
(runtime/energy.py: measured, or "not measurable on this machine" with the reason) and money from
the price table. Everything lands in OUT/audit.json; OUT/audit.md and OUT/audit.html read it
(tasks/audit_report.py). Keys: docs/audit.md.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import Field, model_validator

from ..config import ConfigError, StrictModel
from ..data import read_prompts
from ..data.records import text_of
from ..eval.evaluate import EvalConfig
from ..eval.evaluate import evaluate as run_eval
from ..runtime.device import gpu_available
from ..runtime.energy import EnergyMeter, load_average
from . import sentiment as task
from .audit_figures import DPO_FAMILY, end_to_end, holds, quality, summarise
from .audit_report import write_reports
from .audit_verdict import choose
from .stages import portable, run_stage

PRICES = task.ASSETS / "prices.yaml"
ARMS = ("dpo", "ppo", "rloo")  # the default arms; dpo_iterative is optional
SETTING = {"dpo": "beta", "dpo_iterative": "beta", "ppo": "kl_coef", "rloo": "kl_coef"}
TRAINS = {"dpo_iterative": "dpo"}  # an audit arm -> the method its runs train, where the names differ
DEFAULT_STAGE = {"learning_rate": 1e-3, "max_steps": 48, "batch_size": 8}  # sft and reward_model unless `train` says


class Sweep(StrictModel):
    seed: int = Field(1000, description="seed of the sweep's runs (its pairs too); never a test seed")
    dpo_beta: list[float] = Field([0.1, 0.5], min_length=1, description="DPO's beta values tried on validation")
    ppo_kl_coef: list[float] = Field([0.03, 0.1], min_length=1, description="PPO's kl_coef values tried")
    rloo_kl_coef: list[float] = Field([0.03, 0.1], min_length=1, description="RLOO's kl_coef values tried")
    dpo_iterative_beta: list[float] = Field([0.1], min_length=1, description="iterative DPO's beta values tried")


class Budget(StrictModel):
    steps: int | None = Field(None, ge=1, description="max_steps of every training run (overrides `train`)")
    wall_seconds: float | None = Field(None, gt=0, description="max_seconds of every training run: each stops at "
                                                               "this wall time or its max_steps, whichever is first")


class AuditConfig(StrictModel):
    """`prefalign audit`: DPO against PPO and RLOO on your prompts, reward, model and hardware."""

    output: str = Field(..., description="folder for audit.json, audit.md, audit.html and every run")
    model: str = Field(..., description="the base model (a folder): every arm starts from it, every KL is to it")
    prompts: str = Field(..., description="JSONL of {prompt}: train prompts (and the held-out ones when "
                                          "validation_prompts / test_prompts are not given)")
    validation_prompts: str | None = Field(None, description="held-out prompts where settings are chosen")
    test_prompts: str | None = Field(None, description="held-out prompts the reported figures come from")
    eval_prompts: int = Field(64, ge=2, description="held-out prompts per split")
    train_prompts: int | None = Field(None, ge=1, description="train prompts used at most (default: all)")
    data: str | None = Field(None, description="preference pairs: DPO trains on them offline (no pair making); "
                                               "without `reward`, a reward model is trained on them for PPO/RLOO")
    sft_data: str | None = Field(None, description="demonstrations (or pairs: their chosen answers): an SFT stage "
                                                   "trains `model` on them first, per seed; every arm then starts "
                                                   "from the SFT model and every KL is to it")
    reward: str | None = Field(None, description="MODULE:FUNCTION, FILE.py:FUNCTION or a reward-model folder: "
                                                 "labels the pairs made from samples and is PPO/RLOO's reward")
    judge: str | None = Field(None, description="what scores held-out completions (default: `reward`)")
    retention_text: str | None = Field(None, description="JSONL of {text}: perplexity (retention); default: the "
                                                         "test prompts")
    suites: list[str] = Field([], description="retention suites (eval/suites), scored on every evaluated model")
    samples: int = Field(4, ge=2, description="continuations sampled per prompt to make pairs")
    max_new_tokens: int = Field(32, ge=1, description="tokens sampled per completion (pairs, rollouts, eval)")
    seeds: list[int] = Field([0, 1, 2], min_length=2, description="seeds of the test runs, each trained afresh")
    arms: list[Literal["dpo", "dpo_iterative", "ppo", "rloo"]] = Field(
        list(ARMS), description="arms to run: dpo and at least one of ppo, rloo; dpo_iterative (online DPO: each "
                                "round samples pairs from the last round's model, the reward labels them) is optional")
    iterative_rounds: int = Field(2, ge=2, description="dpo_iterative: rounds, the first on the same pairs as dpo")
    sweep: Sweep = Field(default_factory=Sweep)
    matched_kl: float | None = Field(None, gt=0, description="KL per sequence for the matched comparison (default: "
                                                             "the smallest at which every arm has a setting)")
    budget: Budget = Field(default_factory=Budget)
    train: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"dpo": {"learning_rate": 1e-3, "max_steps": 48, "batch_size": 8},
                                 "ppo": {"learning_rate": 5e-4, "max_steps": 16, "batch_size": 16},
                                 "rloo": {"learning_rate": 5e-4, "max_steps": 16, "batch_size": 8,
                                          "samples_per_prompt": 2},
                                 "reward_model": {"learning_rate": 1e-3, "max_steps": 48, "batch_size": 8}},
        description="each arm's training settings (dpo, ppo, rloo, reward_model, sft), as `prefalign train` takes "
                    "them")
    lora: dict[str, Any] | None = Field({"r": 16, "lora_alpha": 32}, description="LoRA of every run (null: full)")
    device: str = Field("cpu", description="torch device of every stage (cpu, cuda, ...)")
    hardware: str = Field("auto", description="price-table key (auto: from the device's name; cpu: core-hours)")
    prices: str | dict[str, dict[str, Any]] | None = Field(None, description="price table: a YAML path or inline "
                                                                              "(default: the shipped prices.yaml)")

    @model_validator(mode="after")
    def _check(self):
        if "dpo" not in self.arms or not {"ppo", "rloo"} & set(self.arms):
            raise ValueError(f"arms {self.arms}: the audit compares dpo with ppo and/or rloo")
        if self.reward is None and self.data is None:
            raise ValueError("give `reward` (to make pairs and for PPO/RLOO) or `data` (pairs), or both")
        if self.judge is None and self.reward is None:
            raise ValueError("held-out completions need a judge: give `judge` (or `reward`)")
        if self.sweep.seed in self.seeds:
            raise ValueError(f"sweep.seed {self.sweep.seed} is one of the test seeds {self.seeds}: the test "
                             "runs must be fresh trainings, not the runs that won the sweep")
        unknown = set(self.train) - {*SETTING, "reward_model", "sft"}
        if unknown:
            raise ValueError(f"train: unknown arm(s) {sorted(unknown)} (dpo, dpo_iterative, ppo, rloo, "
                             "reward_model, sft)")
        stand_in = Path(self.output)
        for arm in self.arms:
            for value in getattr(self.sweep, f"{arm}_{SETTING[arm]}"):
                try:  # every run's settings validated now, not an hour into the audit
                    task.train_settings(stand_in, Path(self.model), TRAINS.get(arm, arm), stand_in, stand_in,
                                        sizes(self, self.seeds[0]), **run_settings(self, arm, value, "x"))
                except ConfigError as e:
                    raise ValueError(f"{arm} ({SETTING[arm]} {value}): {e}") from None
        if self.sft_data:
            try:
                task.train_settings(stand_in, Path(self.model), "sft", stand_in, None, sizes(self, self.seeds[0]),
                                    **stage_settings(self, "sft"))
            except ConfigError as e:
                raise ValueError(f"sft: {e}") from None
        return self


def sizes(cfg: AuditConfig, seed: int) -> task.Sizes:
    return task.Sizes(train_prompts=0, eval_prompts=cfg.eval_prompts, samples=cfg.samples,
                      max_new_tokens=cfg.max_new_tokens, seed=seed, lora=cfg.lora)


def run_settings(cfg: AuditConfig, arm: str, value: float, reward: str | None) -> dict[str, Any]:
    own = cfg.train.get(arm, cfg.train.get("dpo", {}) if arm == "dpo_iterative" else {})  # rounds: dpo's
    s = {**own, SETTING[arm]: value, "device": cfg.device, "kl_every": 0, **budget(cfg)}
    if arm not in DPO_FAMILY:
        s["reward"] = reward
    return s


# ---------------------------------------------------------------- hardware, prices
def budget(cfg: AuditConfig) -> dict[str, Any]:
    """The budget's overrides of a training run's settings."""
    return {k: v for k, v in (("max_steps", cfg.budget.steps), ("max_seconds", cfg.budget.wall_seconds)) if v}


def same_training(cfg: AuditConfig, beta: float) -> bool:
    """Whether iterative DPO's round 1 at `beta` is the DPO arm's run at `beta` (the same settings, base,
    pairs and seed), so that it is reused rather than trained twice."""
    return "dpo" in cfg.arms and run_settings(cfg, "dpo", beta, None) == run_settings(cfg, "dpo_iterative", beta, None)


def stage_settings(cfg: AuditConfig, kind: str) -> dict[str, Any]:
    """The settings of a stage every arm shares or that only feeds one (sft, reward_model)."""
    return {**DEFAULT_STAGE, **cfg.train.get(kind, {}), "device": cfg.device, **budget(cfg)}


def load_prices(prices: str | dict | None) -> dict[str, dict]:
    if isinstance(prices, dict):
        return prices
    path = Path(prices) if prices else PRICES
    try:
        table = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"prices: {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"prices: {path}: not YAML ({e})") from None
    if not isinstance(table, dict):
        raise ConfigError(f"prices: {path}: a mapping of hardware name -> {{usd_per_hour, unit, source, date}}, "
                          f"not {type(table).__name__}")
    for key, row in table.items():
        if not isinstance(row, dict) or not isinstance(row.get("usd_per_hour"), int | float):
            raise ConfigError(f"{path}: price {key!r} needs usd_per_hour (a number), unit, source, date")
    return table


def hardware(cfg: AuditConfig) -> dict:
    """What one device-hour is here, and its price (None, with the reason, when the table has none)."""
    table = load_prices(cfg.prices)
    if cfg.device.startswith("cuda"):
        if not gpu_available():  # pricing GPU work as CPU core-hours would be silently wrong
            raise ConfigError(f"device {cfg.device!r}: no CUDA GPU is available here (torch.cuda.is_available() "
                              "is False); use device: cpu, or run where the GPU is")
        name, devices, unit = torch.cuda.get_device_name(), 1, "gpu-hour"
    elif cfg.device != "cpu":
        raise ConfigError(f"device {cfg.device!r}: the audit prices cpu or cuda devices only")
    else:
        name, unit = "cpu", "cpu-core-hour"
        # the cores a stage is given: torch's threads (OMP_NUM_THREADS), at most the cores it may use.
        # On a loaded machine it gets less than that; `cpu_seconds` (user + system) is what it got.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        devices = min(torch.get_num_threads(), cores)
    key = cfg.hardware
    if key == "auto":
        key = "cpu" if name == "cpu" else next((k for k in table if re.search(rf"\b{re.escape(k)}\b", name)), None)
    row = table.get(key) if key else None
    return {"device": cfg.device, "device_name": name, "devices": devices, "unit": unit, "price_key": key,
            "usd_per_device_hour": row["usd_per_hour"] if row else None, "price": row,
            "price_missing": None if row else f"no price for {name!r} in the price table"}


# ---------------------------------------------------------------- the stages
def evaluate_models(models: list[tuple[str, Path]], base: str, prompts: Path, text: Path, cfg: AuditConfig,
                    seed: int, log, progress: bool) -> list[dict]:
    """Held-out reward, win-rate vs the base, exact KL to the base and perplexity, per (model, out)."""
    results = []
    for model, out in models:
        ec = EvalConfig(model=str(model), reference=base, prompts=str(prompts), text=str(text),
                        judge=cfg.judge or cfg.reward, output=str(out), max_new_tokens=cfg.max_new_tokens,
                        seed=seed + 1, device=cfg.device, max_prompts=None, suites=cfg.suites)
        results.append(run_eval(ec, log=log, progress=progress))
    return results


def _write_prompts(cfg: AuditConfig, out: Path) -> dict[str, Path]:
    train = read_prompts("prompts", cfg.prompts)
    n = cfg.eval_prompts
    test = read_prompts("test_prompts", cfg.test_prompts)[:n] if cfg.test_prompts else train[:n]
    if not cfg.test_prompts:
        train = train[n:]
    val = read_prompts("validation_prompts", cfg.validation_prompts)[:n] if cfg.validation_prompts else train[:n]
    if not cfg.validation_prompts:
        train = train[n:]
    train = train[:cfg.train_prompts] if cfg.train_prompts else train
    sets = {"train": train, "validation": val, "test": test}
    for name, texts in sets.items():
        if len(texts) < (1 if name == "train" else 2):
            field = {"validation": "validation_prompts", "test": "test_prompts"}.get(name, "prompts")
            given = getattr(cfg, field) or cfg.prompts  # a held-out set not given is carved from `prompts`
            raise ConfigError(f"{field}: {given}: too few prompts for the {name} set ({len(texts)})")
    task.check_disjoint({k: [text_of(t) for t in v] for k, v in sets.items()})  # seen in training: flattering
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / f"{k}_prompts.jsonl" for k in sets}
    for k, texts in sets.items():
        paths[k].write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts), encoding="utf-8")
    paths["text"] = Path(cfg.retention_text) if cfg.retention_text else out / "retention_text.jsonl"
    if not cfg.retention_text:
        paths["text"].write_text("".join(json.dumps({"text": t}) + "\n" for t in test), encoding="utf-8")
    return paths


@dataclass
class Inputs:
    base: Path  # what every arm of the seed starts from and every KL is to: the SFT model, else `model`
    pairs: Path | None
    reward: str
    sft_stage: dict | None
    pair_stage: dict | None
    rm_stage: dict | None


class Audit:
    def __init__(self, cfg: AuditConfig, log, progress: bool):
        self.cfg, self.log, self.progress = cfg, log, progress
        self.child_log = portable(log)
        self.out = Path(cfg.output)
        self.hw = hardware(cfg)
        self.stages: list[dict] = []
        self.trained: dict[tuple[str, float, int], tuple[Path, list[dict]]] = {}  # (arm, setting, seed) -> run

    def stage(self, name: str, arm: str | None, seed: int, fn, *args, **kwargs):
        meter = EnergyMeter().start()
        result, cost = run_stage(fn, *args, **kwargs)
        energy = meter.stop()
        hours = cost["seconds"] * self.hw["devices"] / 3600
        price = self.hw["usd_per_device_hour"]
        row = {"stage": name, "arm": arm, "seed": seed, "seconds": cost["seconds"], "cpu_seconds": cost["cpu_seconds"],
               "device_hours": hours, "peak_rss_bytes": cost["peak_rss_bytes"],
               "baseline_rss_bytes": cost["baseline_rss_bytes"], "peak_cuda_bytes": cost["peak_cuda_bytes"],
               "peak_memory_bytes": cost["peak_cuda_bytes"] or cost["peak_rss_bytes"],
               "usd": hours * price if price is not None else None,
               "energy_joules": energy["joules"], "energy": energy["status"], "model_copies": None,
               "model_holds": None, "tokens_sampled": None, "tokens_trained": None, "steps": None, "stopped": None}
        if isinstance(result, dict) and "model_copies" in result:  # a training run's run.json
            row["model_copies"], row["tokens_trained"] = result.get("model_copies"), result.get("tokens")
            row["steps"], row["stopped"] = result.get("steps"), result.get("stopped")
            row["model_holds"] = holds(result)
        elif isinstance(result, tuple) and isinstance(result[1], dict) and "sample" in result[1]:
            row["tokens_sampled"] = result[1]["sample"].get("new_tokens")  # pair making: the tokens it sampled
        self.stages.append(row)
        joules = energy["status"] if energy["joules"] is None else f"{energy['joules']:.0f} J"
        self.log(f"audit: {name} (seed {seed}) {cost['seconds']:.0f} s, peak {row['peak_memory_bytes'] / 2**20:.0f} "
                 f"MiB, energy {joules}")
        return result, row

    def inputs(self, seed: int, prompts: dict[str, Path]) -> Inputs:
        """What one seed's arms start from: the SFT model (or `model`), the pairs, the RL reward, and the stages
        that made them."""
        cfg, d = self.cfg, self.out / f"seed{seed}"
        base, sft_stage = Path(cfg.model), None
        if cfg.sft_data:  # every arm starts from it: the reference of both families (DPO paper, section 4)
            _, sft_stage = self.stage("sft", "shared", seed, task.train, d / "sft", base, "sft", Path(cfg.sft_data),
                                      None, sizes(cfg, seed), self.child_log, self.progress,
                                      **stage_settings(cfg, "sft"))
            base = d / "sft" / "final"
        pairs, pair_stage = (Path(cfg.data), None) if cfg.data else (None, None)
        if pairs is None:
            (pairs, _), pair_stage = self.stage("pairs", "dpo", seed, task.make_pairs, d / "pairs", base,
                                                prompts["train"], sizes(cfg, seed), self.child_log, cfg.reward,
                                                cfg.device)
        reward, rm_stage = cfg.reward, None
        if reward is None:
            _, rm_stage = self.stage("reward-model", "rlhf", seed, task.train, d / "reward-model", base,
                                     "reward", pairs, None, sizes(cfg, seed), self.child_log, self.progress,
                                     **stage_settings(cfg, "reward_model"))
            reward = str(d / "reward-model" / "final")
        return Inputs(base, pairs, reward, sft_stage, pair_stage, rm_stage)

    def train_arm(self, arm: str, value: float, seed: int, inputs: Inputs, prompts) -> tuple[Path, list[dict]]:
        """One arm's training at one setting: its run folder and its stages (several for dpo_iterative)."""
        name = f"{arm}-{SETTING[arm]}{value}"
        if arm == "dpo_iterative":
            return self._iterative(name, value, seed, inputs, prompts)
        rl, run = arm not in DPO_FAMILY, self.out / f"seed{seed}" / name
        _, row = self.stage(f"train {arm} {SETTING[arm]}={value}", arm, seed, task.train, run, inputs.base,
                            arm, None if rl else inputs.pairs, prompts["train"] if rl else None,
                            sizes(self.cfg, seed), self.child_log, self.progress,
                            **run_settings(self.cfg, arm, value, inputs.reward))
        self.trained[(arm, value, seed)] = (run, [row])
        return run, [row]

    def _iterative(self, name: str, value: float, seed: int, inputs: Inputs, prompts) -> tuple[Path, list[dict]]:
        """Online DPO (Xu et al. 2023; Yuan et al. 2024; `prefalign iterate`): round 1 trains on the DPO arm's
        pairs; round r samples pairs from round r-1's model (its own sampling seed), the reward labels them,
        and DPO trains from that model, anchored to it. Every KL is still measured to `inputs.base`. Round 1 is
        the DPO arm's run when that trained the same setting with the same settings (the same training: it is
        reused, and its cost counted in both arms)."""
        cfg, d, rows = self.cfg, self.out / f"seed{seed}" / name, []
        prev, pairs = inputs.base, inputs.pairs
        same = same_training(cfg, value)
        for r in range(1, cfg.iterative_rounds + 1):
            what = f"dpo_iterative beta={value} round {r}"
            if r == 1 and same and ("dpo", value, seed) in self.trained:
                run, done = self.trained[("dpo", value, seed)]
                rows, prev = list(done), run / "final"
                continue
            if r > 1:
                (pairs, _), row = self.stage(f"pairs {what}", "dpo_iterative", seed, task.make_pairs,
                                             d / f"round{r}-pairs", prev, prompts["train"],
                                             sizes(cfg, seed + 1000 * r), self.child_log, inputs.reward, cfg.device)
                rows.append(row)
            _, row = self.stage(f"train {what}", "dpo_iterative", seed, task.train, d / f"round{r}", prev, "dpo",
                                pairs, None, sizes(cfg, seed), self.child_log, self.progress,
                                **run_settings(cfg, "dpo_iterative", value, None))
            rows.append(row)
            prev = d / f"round{r}" / "final"
        return prev.parent, rows

    def evaluate(self, seed: int, split: str, runs: list[tuple[str, Path]], base: Path, prompts) -> list[dict]:
        """Every run's final/ and `base` (what the arms started from: every KL and win-rate is against it)."""
        base = str(base)
        d = self.out / f"seed{seed}" / f"eval-{split}"
        models = [(base, d / "base")] + [(str(run / "final"), d / name) for name, run in runs]
        evals, _ = self.stage(f"evaluate {split}", None, seed, evaluate_models, models, base, prompts[split],
                              prompts["text"], self.cfg, seed, self.child_log, self.progress)
        return evals


def needs(arm: str, got: Inputs) -> list[dict | None]:
    """The stages an arm's training needed before it (its share of the seed's inputs): DPO its pairs; iterative
    DPO its first pairs and the reward model that labels later rounds' when there is one; PPO/RLOO the reward model
    and the pairs it was trained on, when it was trained."""
    if arm == "dpo":
        return [got.pair_stage]
    if arm == "dpo_iterative":
        return [got.pair_stage, got.rm_stage]
    return [got.pair_stage, got.rm_stage] if got.rm_stage else []


def run_audit(cfg: AuditConfig, log=print, progress: bool = True) -> dict:
    t0, load0 = time.perf_counter(), load_average()
    a = Audit(cfg, log, progress)
    prompts = _write_prompts(cfg, a.out / "prompts")
    first = cfg.sweep.seed
    log(f"audit: sweep on the validation prompts (seed {first}); arms {', '.join(cfg.arms)}")
    inputs = {first: a.inputs(first, prompts)}
    sweep_runs = [(arm, v, *a.train_arm(arm, v, first, inputs[first], prompts))
                  for arm in cfg.arms for v in getattr(cfg.sweep, f"{arm}_{SETTING[arm]}")]
    evals = a.evaluate(first, "validation", [(f"{arm}-{SETTING[arm]}{v}", run) for arm, v, run, _ in sweep_runs],
                       inputs[first].base,
                       prompts)
    sweep = [{"arm": arm, "setting_name": SETTING[arm], "setting": v, "seed": first, **quality(ev)}
             for (arm, v, _, _), ev in zip(sweep_runs, evals[1:], strict=True)]
    # K comes from the default arms only: running the optional iterative arm must not move DPO/PPO/RLOO's choices
    chosen = choose([r for r in sweep if r["arm"] != "dpo_iterative"], cfg.matched_kl)
    if "dpo_iterative" in cfg.arms:
        chosen["arms"].update(choose([r for r in sweep if r["arm"] == "dpo_iterative"], chosen["matched_kl"])["arms"])
    log(f"audit: chosen on validation (matched KL <= {chosen['matched_kl']:.2f}): " + "; ".join(
        f"{arm}: best {c['best']}, matched {c['matched']}" for arm, c in chosen["arms"].items()))

    test, base_test = [], []
    for seed in cfg.seeds:
        log(f"audit: test runs, seed {seed}")
        if seed not in inputs:
            inputs[seed] = a.inputs(seed, prompts)
        got, plan = inputs[seed], []
        for arm, c in chosen["arms"].items():
            for value in dict.fromkeys(v for v in (c["best"], c["matched"]) if v is not None):
                run, rows = a.train_arm(arm, value, seed, got, prompts)
                plan.append((arm, value, run, end_to_end([got.sft_stage, *needs(arm, got), *rows])))
        evs = a.evaluate(seed, "test", [(f"{arm}-{SETTING[arm]}{v}", run) for arm, v, run, _ in plan], got.base,
                         prompts)
        base_test.append({"seed": seed, **quality(evs[0])})
        for (arm, value, _, e2e), ev in zip(plan, evs[1:], strict=True):
            c = chosen["arms"][arm]
            test.append({"arm": arm, "setting_name": SETTING[arm], "setting": value, "seed": seed,
                         "best": value == c["best"], "matched": value == c["matched"], **quality(ev), **e2e})
    summary = summarise(cfg, a.hw, a.stages, sweep, chosen, test, base_test)
    summary.update({"seconds": time.perf_counter() - t0, "load_average_start": load0,
                    "load_average_end": load_average()})
    write_reports(summary, a.out)
    log("\n".join(summary["verdict"]["sentences"]))
    log(f"audit: {summary['seconds']:.0f} s; {a.out / 'audit.md'}, {a.out / 'audit.html'}, {a.out / 'audit.json'}")
    return summary


# ---------------------------------------------------------------- --demo: the shipped model and task
# The sentiment task (tasks/sentiment.py): IMDb prefixes, VADER as the reward and the judge. DEMO is
# small: 6 minutes measured on 2 CPU cores (benchmarks/results/audit-demo-cpu-2core); QUICK is
# the test suite's shrunk audit: every stage a few steps on a few prompts, so it checks the plumbing,
# not a verdict (one setting per arm: the test seeds train afresh, and a second DPO setting would cost
# the suite time).
DEMO = {"eval_prompts": 64, "train_prompts": 128, "samples": 6, "max_new_tokens": 20, "seeds": [0, 1, 2],
        "sweep": {"dpo_beta": [0.1, 0.5], "ppo_kl_coef": [0.03, 0.1], "rloo_kl_coef": [0.03, 0.1]},
        "train": {"dpo": {"learning_rate": 2e-3, "max_steps": 32, "batch_size": 8},
                  "ppo": {"learning_rate": 1e-3, "max_steps": 12, "batch_size": 16},
                  "rloo": {"learning_rate": 1e-3, "max_steps": 12, "batch_size": 8, "samples_per_prompt": 2}}}
QUICK = {"eval_prompts": 4, "train_prompts": 8, "samples": 2, "max_new_tokens": 4, "seeds": [0, 1],
         "arms": ["dpo", "ppo"], "sweep": {"dpo_beta": [0.1], "ppo_kl_coef": [0.1]},
         "train": {"dpo": {"learning_rate": 2e-3, "max_steps": 2, "batch_size": 4},
                   "ppo": {"learning_rate": 1e-3, "max_steps": 1, "batch_size": 4, "ppo_epochs": 1}}}


def demo_config(output: str, quick: bool = False, **overrides: Any) -> dict[str, Any]:
    """The demo's config (a dict, so that a YAML file or key=value overrides can still change it):
    the shipped model, its train prefixes, and the package's validation and test prefixes."""
    sizes_ = dict(QUICK if quick else DEMO)
    n = sizes_["eval_prompts"]
    prompts = Path(output) / "prompts" / "shipped"
    train, test = task.split_prefixes(prompts / "test", task.Sizes(train_prompts=sizes_["train_prompts"],
                                                                    eval_prompts=n), "test")
    _, val = task.split_prefixes(prompts / "validation", task.Sizes(train_prompts=sizes_["train_prompts"],
                                                                     eval_prompts=n), "validation")
    return {"output": output, "model": str(task.BASE_MODEL), "prompts": str(train), "validation_prompts": str(val),
            "test_prompts": str(test), "reward": task.REWARD, **sizes_, **overrides}
