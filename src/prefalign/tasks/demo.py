"""`prefalign demo`: align the model prefalign ships with DPO and with PPO, evaluate both, report.

The task is the DPO paper's controlled sentiment generation on IMDb review prefixes, with VADER as
the ground truth (tasks/sentiment.py). Everything it needs ships with the package: the base model
(assets/imdb-lm, trained by scripts/build_base_model.py) and the prefixes. Nothing is downloaded.
A few minutes on 2 CPU cores; `quick` shrinks every stage for the test suite.

Each stage (pairs, DPO, PPO, eval) runs in its own process (tasks/stages.py), so the table's peak
memory is each stage's own; costs are given as "train" and "end to end" (docs/benchmarks.md, "How costs are
counted"). Settings were chosen on the validation prefixes (`split="validation"`); the figures the
demo reports by default are on the test prefixes, which played no part in choosing them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..report.build import build_report
from . import sentiment as task
from .stages import chain, run_stage

# What the demo trains: each stage moves the reward in a few minutes. First picked on what were then
# the held-out prefixes; re-checked on the validation prefixes with PPO's k1 reward penalty (seed 0:
# base 0.11 [0.03, 0.19], DPO 0.50 at KL 16, PPO 0.35 at KL 4). 4 samples per prefix give pairs too
# noisy for DPO to move in this budget.
DPO = dict(beta=0.1, learning_rate=1e-3, max_steps=96, batch_size=8)
PPO = dict(kl_coef=0.05, learning_rate=5e-4, max_steps=32, batch_size=16, ppo_epochs=4, num_minibatches=2)
FULL = dict(train_prompts=256, eval_prompts=128, samples=8)
# The test suite's demo: about a minute on 2 cores, yet both methods must lift the reward clear of
# the base's 95% interval. Chosen on the validation prefixes, seeds 0-3: the smallest margin over the
# base's upper bound was DPO +0.08, PPO +0.09. (Tried and dropped: 128 prefixes each way, DPO within
# +0.04; PPO 24 rollouts x 16 at lr 7e-4, below the base's bound on seed 0: 16 prompts a step were too
# noisy to learn from in this budget. kl_coef is below the full demo's for margin.)
QUICK = dict(train_prompts=192, eval_prompts=192, samples=8, max_new_tokens=24)
QUICK_DPO = dict(learning_rate=2e-3, max_steps=40, batch_size=8)
QUICK_PPO = dict(kl_coef=0.03, learning_rate=1e-3, max_steps=12, batch_size=32)


def run_demo(out: Path, console: Console | None = None, quick: bool = False, progress: bool = True,
             split: task.Split = "test", seed: int = 0) -> dict:
    console = console or Console(stderr=True)
    t_start = time.perf_counter()
    sizes = task.Sizes(**(QUICK if quick else FULL), seed=seed)
    dpo = {**DPO, **QUICK_DPO} if quick else dict(DPO)
    ppo = {**PPO, **QUICK_PPO} if quick else dict(PPO)
    base, log = task.BASE_MODEL, _log
    out.mkdir(parents=True, exist_ok=True)
    started: dict[str, float] = {}

    def stage(n: int, title: str) -> None:
        console.rule(f"{n}/6 {title}")
        started[title] = time.perf_counter() - t_start

    stage(1, f"sample {sizes.samples} continuations per IMDb prefix from the shipped model ({base.name})")
    train_prompts, held_out = task.split_prefixes(out, sizes, split)
    (pairs, pair_summary), cost_pairs = run_stage(task.make_pairs, out, base, train_prompts, sizes, log)
    stage(2, "DPO (LoRA) on the VADER-labelled pairs")
    dpo_run, cost_dpo = run_stage(task.train, out / "dpo", base, "dpo", pairs, None, sizes, log, progress, **dpo)
    stage(3, "PPO (LoRA, value head) with VADER as the reward")
    ppo_run, cost_ppo = run_stage(task.train, out / "ppo", base, "ppo", None, train_prompts, sizes, log, progress,
                                  **ppo)
    stage(4, f"evaluate base, DPO and PPO on the {split} prefixes: VADER reward, win-rate vs base, exact KL")
    models = [(base, out / "base" / "eval")] + [(out / m / "final", out / m / "eval") for m in ("dpo", "ppo")]
    evals, cost_eval = run_stage(task.evaluate_all, models, base, held_out, sizes, log, progress)
    stage(5, "report: reward vs KL, cost table")

    build_report([out / "base", out / "dpo", out / "ppo"], out / "report", log)
    stage(6, "summary")
    costs = {"dpo": {"train": cost_dpo, "end_to_end": chain(cost_pairs, cost_dpo)},
             "ppo": {"train": cost_ppo, "end_to_end": chain(cost_ppo)}}
    runs = {"dpo": dpo_run, "ppo": ppo_run}
    rows = [
        _row(name, e, runs.get(name), costs.get(name)) for name, e in zip(("base", "dpo", "ppo"), evals, strict=True)
    ]
    # a pipe gets 80 columns, too few for the table: print it at least 120 wide
    Console(file=console.file, width=max(console.width, 120)).print(_table(rows, split))
    summary = {"split": split, "seed": seed, "quick": quick, "rows": rows, "pairs": pair_summary,
               "stages": {"pairs": cost_pairs, "dpo": cost_dpo, "ppo": cost_ppo, "eval": cost_eval},
               "settings": {"dpo": dpo, "ppo": ppo, "sizes": {k: v for k, v in vars(sizes).items()}},
               "seconds": time.perf_counter() - t_start, "stage_started": started,
               "report": str(out / "report" / "report.html")}
    (out / "demo.json").write_text(json.dumps(summary, indent=2))
    console.print(f"[bold green]done[/] in {summary['seconds']:.0f} s. Report: {out / 'report' / 'report.html'} "
                  f"(and report.md); everything in {out}")
    return summary


def _log(message: str) -> None:
    """The stages' log: a module-level function, so that the stage processes can receive it."""
    Console(stderr=True).print(message, highlight=False, markup=False)


def _row(name: str, e: dict, run: dict | None, cost: dict | None) -> dict:
    return {"model": name, "reward_mean": e["reward_mean"], "reward_ci95": e["reward_ci95"],
            "kl_per_sequence": e["kl_per_sequence"], "win_rate_vs_base": e.get("win_rate"),
            "mean_length": e["mean_length"], "tokens_per_s": run["tokens_per_s"] if run else None,
            "train": cost["train"] if cost else None, "end_to_end": cost["end_to_end"] if cost else None}


def _table(rows: list[dict], split: str):
    table = Table(title=f"{split} IMDb prefixes: VADER reward of the continuation (higher is more positive); "
                        "KL: exact, to the base; MiB: peak RSS; e2e: end to end "
                        "(docs/benchmarks.md, 'How costs are counted')")
    for col in ("model", "reward [95% CI]", "KL/seq", "win vs base", "train s", "train MiB", "e2e s", "e2e MiB",
                "train tok/s"):
        table.add_column(col, no_wrap=col.startswith("reward"))
    for r in rows:
        lo, hi = r["reward_ci95"]
        cost = ["-"] * 5
        if r["train"] is not None:
            cost = [f"{r['train']['seconds']:.0f}", f"{r['train']['peak_rss_bytes'] / 2**20:.0f}",
                    f"{r['end_to_end']['seconds']:.0f}", f"{r['end_to_end']['peak_rss_bytes'] / 2**20:.0f}",
                    f"{r['tokens_per_s']:.0f}"]
        table.add_row(r["model"], f"{r['reward_mean']:.3f} [{lo:.3f}, {hi:.3f}]", f"{r['kl_per_sequence']:.2f}",
                      "-" if r["model"] == "base" else f"{r['win_rate_vs_base']:.2f}", *cost)
    return table
