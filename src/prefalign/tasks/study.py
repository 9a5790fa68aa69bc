"""`prefalign study sentiment`: the DPO paper's Figure 2 experiment on the shipped model, on a CPU.

DPO at several betas, IPO at several taus, PPO at several KL coefficients with VADER as reward, and
"PPO (learned reward)": PPO against a reward model trained (Bradley-Terry) on the very pairs DPO
uses, and "DPO (iterative)": online DPO, the on-policy counterpart to PPO (Xu et al. 2023, Yuan et
al. 2024, as `prefalign iterate`): round r samples pairs from round r-1's model and trains DPO from
it, anchored to it; round 1 is the `iterative_beta` DPO run itself. Every setting runs with each of
`seeds` (pairs, training and evaluation sampling all follow the seed); every run is evaluated on
the same held-out prefixes for VADER reward and exact KL to the base. study.md gives each
setting's mean and 95% t-interval over seeds, flags runs whose completions collapsed in length,
and states how the frontiers compare, derived from the data (tasks/seeds.py). A benchmark, not a test.

`split: validation` (the default) evaluates on the validation prefixes: that is where settings are
chosen. `split: test` evaluates the chosen settings on the test prefixes: the figures to report.
Each stage (pairs, reward model, each training run, the evaluations of a seed) runs in its own
process (tasks/stages.py); costs are "train" and "end to end" (docs/benchmarks.md, "How costs are counted").
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from pydantic import model_validator

from ..config import ConfigError, StrictModel
from ..report.build import build_report
from ..train.methods import METHODS
from . import sentiment as task
from .stages import chain, portable, run_stage
from .study_table import aggregate, flag_collapse, frontier_statements, markdown, plot_frontier


class StudyConfig(StrictModel):
    output: str
    split: Literal["validation", "test"] = "validation"
    train_prompts: int = 384
    eval_prompts: int = 192
    samples: int = 8
    max_new_tokens: int = 32
    seeds: list[int] = [0, 1, 2]
    collapse_fraction: float = 0.5  # flag a run whose mean completion length is below this x the base's
    dpo_betas: list[float] = [0.05, 0.1, 0.2, 0.5, 1.0]
    ipo_betas: list[float] = [0.1, 0.5, 1.0]
    ppo_kl_coefs: list[float] = [0.01, 0.03, 0.1, 0.3]
    learned_reward_kl_coef: float | None = 0.03  # None: skip PPO (learned reward)
    # PPO (learned reward) once per value: 0 unguarded; N > 0 also penalises an EOS before N tokens
    # (min_new_tokens), against the reward model's pull toward short answers seen on validation
    learned_reward_min_new_tokens: list[int] = [0, 16]
    iterative_rounds: int = 3  # DPO (iterative): rounds in all, round 1 included; 1 or less: skip it
    iterative_beta: float = 0.1  # must be one of dpo_betas: its run is round 1
    dpo: dict[str, Any] = {"learning_rate": 1e-3, "max_steps": 96, "batch_size": 8}
    ipo: dict[str, Any] = {"learning_rate": 1e-3, "max_steps": 96, "batch_size": 8}
    ppo: dict[str, Any] = {"learning_rate": 5e-4, "max_steps": 32, "batch_size": 16, "ppo_epochs": 4,
                           "num_minibatches": 2}
    reward_model: dict[str, Any] = {"learning_rate": 1e-3, "max_steps": 96, "batch_size": 8}

    @model_validator(mode="after")
    def _check_runs(self):
        # every run's settings validated into its method's config now, not hours into the study
        if self.iterative_rounds > 1 and self.iterative_beta not in self.dpo_betas:
            raise ValueError(f"iterative_beta {self.iterative_beta} is not in dpo_betas {self.dpo_betas}: "
                             "its DPO run is the iterative arm's first round")
        stand_in = Path(self.output)
        runs = runs_of(self) + [("reward-model", "reward", self.reward_model)]
        if self.learned_reward_kl_coef is not None:
            runs += [(name, "ppo", settings) for name, settings in learned_reward_runs(self, stand_in)]
        for seed in self.seeds:
            sizes = sizes_of(self, seed)
            for name, method, settings in runs:
                try:
                    task.train_settings(stand_in / name, stand_in, method, stand_in, stand_in, sizes, **settings)
                except ConfigError as e:
                    raise ValueError(f"run {name}: {e}") from None
        return self


def sizes_of(cfg: StudyConfig, seed: int) -> task.Sizes:
    return task.Sizes(train_prompts=cfg.train_prompts, eval_prompts=cfg.eval_prompts, samples=cfg.samples,
                      max_new_tokens=cfg.max_new_tokens, seed=seed)


def learned_reward_runs(cfg: StudyConfig, out: Path) -> list[tuple[str, dict[str, Any]]]:
    """PPO against the seed's reward model (out/reward-model/final), once per min_new_tokens value."""
    runs = []
    for n in cfg.learned_reward_min_new_tokens:
        guard = {"min_new_tokens": n} if n else {}
        runs.append((f"ppo-learned-reward{f'-min{n}' if n else ''}",
                     {**cfg.ppo, "kl_coef": cfg.learned_reward_kl_coef, "reward": str(out / "reward-model" / "final"),
                      **guard}))
    return runs


def runs_of(cfg: StudyConfig) -> list[tuple[str, str, dict[str, Any]]]:
    """(run name, method, settings) in the order they run; PPO (learned reward) is added per seed."""
    out = [(f"dpo-beta{b}", "dpo", {**cfg.dpo, "beta": b}) for b in cfg.dpo_betas]
    out += [(f"ipo-beta{b}", "ipo", {**cfg.ipo, "beta": b}) for b in cfg.ipo_betas]
    out += [(f"ppo-kl{k}", "ppo", {**cfg.ppo, "kl_coef": k}) for k in cfg.ppo_kl_coefs]
    return out


def run_study(cfg: StudyConfig, log=print, progress: bool = True) -> dict:
    out = Path(cfg.output)
    t0 = time.perf_counter()
    rows: list[dict] = []
    for i, seed in enumerate(cfg.seeds, 1):
        log(f"study: seed {seed} ({i}/{len(cfg.seeds)}), evaluated on the {cfg.split} prefixes")
        rows += _one_seed(cfg, seed, out / f"seed{seed}", log, progress)
    flag_collapse(rows, cfg.collapse_fraction)
    settings = aggregate(rows)
    summary = {"split": cfg.split, "seeds": cfg.seeds, "settings": settings, "runs": rows,
               "frontier": frontier_statements(rows), "seconds": time.perf_counter() - t0,
               "config": cfg.model_dump()}

    # each run once (dpo-iterative-round1 is the iterative_beta DPO run itself)
    first_seed = dict.fromkeys(Path(r["path"]) for r in rows if r["seed"] == cfg.seeds[0])
    build_report(list(first_seed), out / "report", log)
    plot_frontier(settings, out / "frontier.png", cfg.split)
    (out / "study.json").write_text(json.dumps(summary, indent=2))
    (out / "study.md").write_text(markdown(summary))
    for s in summary["frontier"].values():
        log(s["statement"])
    log(f"study: {len(rows)} models ({len(settings)} settings x {len(cfg.seeds)} seeds) in {summary['seconds']:.0f} s; "
        f"{out / 'study.md'}, {out / 'frontier.png'}")
    return summary


def _one_seed(cfg: StudyConfig, seed: int, out: Path, log, progress: bool) -> list[dict]:
    """Pairs, reward model, every training run and the evaluations of one seed, each stage in its own process."""
    sizes = sizes_of(cfg, seed)
    base, child_log = task.BASE_MODEL, portable(log)
    train_prompts, held_out = task.split_prefixes(out, sizes, cfg.split)
    (pairs, _), cost_pairs = run_stage(task.make_pairs, out, base, train_prompts, sizes, child_log)
    plan = [(name, method, settings, None) for name, method, settings in runs_of(cfg)]
    if cfg.learned_reward_kl_coef is not None:
        rm, cost_rm = run_stage(task.train, out / "reward-model", base, "reward", pairs, None, sizes, child_log,
                                progress, **cfg.reward_model)
        log(f"reward model: train reward_model/accuracy {rm['final'].get('reward_model/accuracy', float('nan')):.2f}")
        plan += [(name, "ppo", settings, cost_rm) for name, settings in learned_reward_runs(cfg, out)]
    trained = []
    plan_size = len(plan) + max(cfg.iterative_rounds - 1, 0)
    for i, (name, method, settings, cost_rm) in enumerate(plan, 1):
        log(f"seed {seed}, run {i}/{plan_size}: {name}")
        rl = METHODS[method].trainer == "rl"
        run, cost = run_stage(task.train, out / name, base, method, None if rl else pairs,
                              train_prompts if rl else None, sizes, child_log, progress, **settings)
        # end to end: what this setting alone would have needed (docs/benchmarks.md, "How costs are counted")
        before = [] if rl and cost_rm is None else [cost_pairs] + ([cost_rm] if cost_rm else [])
        trained.append((name, method, settings, run, cost, chain(*before, cost)))
    trained += _iterative(cfg, out, trained, train_prompts, sizes, child_log, progress, len(plan), plan_size, log)
    models = [(base, out / "base" / "eval")] + [(out / t[0] / "final", out / t[0] / "eval") for t in trained]
    evals, _ = run_stage(task.evaluate_all, models, base, held_out, sizes, child_log, progress)
    rows = [_row("base", "base", {}, None, None, None, evals[0], seed, out / "base")]
    rows += [_row(*t, ev, seed, out / t[0]) for t, ev in zip(trained, evals[1:], strict=True)]
    if any(r["method"] == "dpo (iterative)" for r in rows):  # round 1 is the DPO run: the curve starts there
        first = next(r for r in rows if r["run"] == f"dpo-beta{cfg.iterative_beta}")
        at = next(i for i, r in enumerate(rows) if r["method"] == "dpo (iterative)")
        rows.insert(at, {**first, "run": "dpo-iterative-round1", "method": "dpo (iterative)", "setting": 1})
    return rows


def _iterative(cfg: StudyConfig, out: Path, trained: list, train_prompts: Path, sizes, child_log, progress: bool,
               done: int, plan_size: int, log) -> list:
    """Rounds 2.. of DPO (iterative): pairs sampled from the previous round's model (a fresh sampling
    seed per round), labelled by VADER, DPO from that model. End to end: every round's pairs and training."""
    first = next((t for t in trained if t[1] == "dpo" and t[2]["beta"] == cfg.iterative_beta), None)
    if cfg.iterative_rounds < 2 or first is None:
        return []
    settings = {**cfg.dpo, "beta": cfg.iterative_beta}
    prev, e2e, rounds = out / first[0] / "final", first[5], []
    for r in range(2, cfg.iterative_rounds + 1):
        name = f"dpo-iterative-round{r}"
        log(f"seed {sizes.seed}, run {done + r - 1}/{plan_size}: {name} (pairs from {prev.parent.name})")
        (pairs, _), c_pairs = run_stage(task.make_pairs, out / name, prev, train_prompts,
                                        replace(sizes, seed=sizes.seed + 1000 * r), child_log)
        run, cost = run_stage(task.train, out / name, prev, "dpo", pairs, None, sizes, child_log, progress, **settings)
        e2e = chain(e2e, c_pairs, cost)
        rounds.append((name, "dpo (iterative)", {**settings, "round": r}, run, cost, e2e))
        prev = out / name / "final"
    return rounds


def _row(name: str, method: str, settings: dict, run: dict | None, train: dict | None, end_to_end: dict | None,
         ev: dict, seed: int, path: Path) -> dict:
    if "reward" in settings:
        method = "ppo (learned reward" + (f", min {settings['min_new_tokens']} tokens)" if "min_new_tokens" in settings
                                          else ")")
    return {
        "run": name,
        "method": method,
        "seed": seed,
        "setting": settings.get("round", settings.get("beta", settings.get("kl_coef"))),
        "path": str(path),
        "reward_mean": ev["reward_mean"],
        "reward_ci95": ev["reward_ci95"],
        "kl_per_sequence": ev["kl_per_sequence"],
        "kl_per_token": ev["kl_per_token"],
        "win_rate_vs_base": ev.get("win_rate"),
        "mean_length": ev["mean_length"],
        "tokens_per_s": run["tokens_per_s"] if run else None,
        "train": train,
        "end_to_end": end_to_end,
    }
