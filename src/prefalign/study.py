"""`prefalign study sentiment`: the DPO paper's Figure 2 experiment on the shipped model, on a CPU.

DPO at several betas, IPO at several taus, PPO at several KL coefficients with VADER as reward, and
"PPO (learned reward)": PPO against a reward model trained (Bradley-Terry) on the very pairs DPO
uses. Every run is evaluated on the same held-out prefixes for VADER reward and exact KL to the base;
the report plots the reward/KL frontier and tabulates the wall clock of each run. A benchmark, not a
test: 5 min 20 s on 2 cores with the defaults (14 models).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .config import StrictModel
from .tasks import sentiment as task


class StudyConfig(StrictModel):
    output: str
    train_prompts: int = 384
    eval_prompts: int = 192
    samples: int = 8
    max_new_tokens: int = 32
    seed: int = 0
    dpo_betas: list[float] = [0.05, 0.1, 0.2, 0.5, 1.0]
    ipo_betas: list[float] = [0.1, 0.5, 1.0]
    ppo_kl_coefs: list[float] = [0.01, 0.03, 0.1, 0.3]
    learned_reward_kl_coef: float | None = 0.03  # None: skip PPO (learned reward)
    dpo: dict[str, Any] = {"learning_rate": 1e-3, "max_steps": 96, "batch_size": 8}
    ipo: dict[str, Any] = {"learning_rate": 1e-3, "max_steps": 96, "batch_size": 8}
    ppo: dict[str, Any] = {"learning_rate": 5e-4, "max_steps": 32, "batch_size": 16, "ppo_epochs": 4,
                           "num_minibatches": 2}
    reward_model: dict[str, Any] = {"learning_rate": 1e-3, "max_steps": 96, "batch_size": 8}


def runs_of(cfg: StudyConfig) -> list[tuple[str, str, dict[str, Any]]]:
    """(run name, method, settings) in the order they run."""
    out = [(f"dpo-beta{b}", "dpo", {**cfg.dpo, "beta": b}) for b in cfg.dpo_betas]
    out += [(f"ipo-beta{b}", "ipo", {**cfg.ipo, "beta": b}) for b in cfg.ipo_betas]
    out += [(f"ppo-kl{k}", "ppo", {**cfg.ppo, "kl_coef": k}) for k in cfg.ppo_kl_coefs]
    return out


def run_study(cfg: StudyConfig, log=print, progress: bool = True) -> dict:
    out = Path(cfg.output)
    sizes = task.Sizes(train_prompts=cfg.train_prompts, eval_prompts=cfg.eval_prompts, samples=cfg.samples,
                       max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    base = task.BASE_MODEL
    t0 = time.perf_counter()
    train_prompts, held_out = task.split_prefixes(out, sizes)
    pairs, pair_summary = task.make_pairs(out, base, train_prompts, sizes, log)
    pair_seconds = time.perf_counter() - t0
    rows = [_row("base", "base", {}, None, task.evaluate(base, out / "base" / "eval", base, held_out, sizes, log, progress))]
    plan = runs_of(cfg)
    if cfg.learned_reward_kl_coef is not None:
        rm = task.train(out / "reward-model", base, "reward", pairs, None, sizes, log, progress, **cfg.reward_model)
        log(f"reward model: train reward/accuracy {rm['final'].get('reward/accuracy', float('nan')):.2f}")
        merged = out / "reward-model" / "final"
        plan.append(("ppo-learned-reward", "ppo", {**cfg.ppo, "kl_coef": cfg.learned_reward_kl_coef,
                                                   "reward": str(merged)}))
    for i, (name, method, settings) in enumerate(plan, 1):
        log(f"study run {i}/{len(plan)}: {name}")
        run = task.train(out / name, base, method, pairs if method != "ppo" else None,
                         train_prompts if method == "ppo" else None, sizes, log, progress, **settings)
        ev = task.evaluate(out / name / "final", out / name / "eval", base, held_out, sizes, log, progress)
        rows.append(_row(name, method, settings, run, ev))
    from .report.build import build_report

    build_report([out / r["run"] for r in rows], out / "report", log)
    summary = {"rows": rows, "pairs": pair_summary, "pair_generation_seconds": pair_seconds,
               "seconds": time.perf_counter() - t0, "config": cfg.model_dump()}
    (out / "study.json").write_text(json.dumps(summary, indent=2))
    (out / "study.md").write_text(markdown(summary))
    log(f"study: {len(rows)} models in {summary['seconds']:.0f} s; {out / 'study.md'}, {out / 'report' / 'report.html'}")
    return summary


def _row(name: str, method: str, settings: dict, run: dict | None, ev: dict) -> dict:
    return {"run": name, "method": "ppo (learned reward)" if "reward" in settings else method,
            "setting": settings.get("beta", settings.get("kl_coef")), "reward_mean": ev["reward_mean"],
            "reward_ci95": ev["reward_ci95"], "kl_per_sequence": ev["kl_per_sequence"],
            "kl_per_token": ev["kl_per_token"], "win_rate_vs_base": ev.get("win_rate"),
            "mean_length": ev["mean_length"], "wall_seconds": run["wall_seconds"] if run else None,
            "tokens_per_s": run["tokens_per_s"] if run else None,
            "peak_memory_bytes": run["peak_memory_bytes"] if run else None}


def markdown(summary: dict) -> str:
    lines = ["| run | method | beta / kl_coef | held-out reward [95% CI] | KL/seq | win-rate vs base | length | "
             "train s |", "|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        lo, hi = r["reward_ci95"]
        win = "-" if r["run"] == "base" else f"{r['win_rate_vs_base']:.2f}"
        secs = "-" if r["wall_seconds"] is None else f"{r['wall_seconds']:.0f}"
        lines.append(f"| {r['run']} | {r['method']} | {r['setting'] if r['setting'] is not None else '-'} | "
                     f"{r['reward_mean']:.3f} [{lo:.3f}, {hi:.3f}] | {r['kl_per_sequence']:.2f} | {win} | "
                     f"{r['mean_length']:.1f} | {secs} |")
    lines.append(f"\nPairs: {summary['pairs']['curate']['kept']} (sampling + labelling "
                 f"{summary['pair_generation_seconds']:.0f} s); whole study {summary['seconds']:.0f} s.")
    return "\n".join(lines) + "\n"
