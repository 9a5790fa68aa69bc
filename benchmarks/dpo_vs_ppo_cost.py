"""DPO vs PPO on the same base model, the same prompts and the same ground-truth reward: what each
costs (wall seconds, tokens/s, peak memory, model copies held) and what reward each reaches.

The task is the DPO paper's controlled sentiment generation (Rafailov et al. 2023, §6.1): prompts are
prefixes of IMDb reviews (the package's train and test prefixes, disjoint: tasks/sentiment.py), the
ground truth is VADER's compound sentiment of the continuation.
DPO's pipeline, as in the paper: sample 4 continuations per training prefix from the base model,
label best-vs-worst by the scorer, train DPO. PPO: the same prefixes, the scorer as its reward.
Both see `steps x batch` examples (pairs for DPO, prompts for PPO). Every stage (pairs, DPO, PPO,
eval) runs in its own process (prefalign.tasks.stages), so each peak RSS is that stage's alone; the
table gives "train" and "end to end" costs as docs/benchmarks.md, "How costs are counted", defines them.
Then each model (base, DPO, PPO) samples one continuation per held-out prefix with the same seed,
scored by the same scorer (95% bootstrap interval), with the exact KL to the base per sequence.

    python benchmarks/dpo_vs_ppo_cost.py --model models/smollm2-135m-instruct --lora   # docs/benchmarks.md's figures
    python benchmarks/dpo_vs_ppo_cost.py --model tiny                                  # a 1-minute smoke run
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMDB = ROOT.parent / "shared" / "data" / "imdb" / "imdb_test.jsonl.gz"
REWARD = f"{Path(__file__).resolve().parent / 'rewards.py'}:vader_positive"


def imdb_texts(n: int, words: int = 8) -> list[str]:
    """Review openings to train the tiny model's tokenizer on."""
    rows = []
    with gzip.open(IMDB, "rt", encoding="utf-8") as f:
        for line in f:
            rows.append(" ".join(re.sub(r"<br\s*/?>", " ", json.loads(line)["text"]).split()[:words]))
            if len(rows) >= n:
                break
    return rows


def build_tiny(out: Path) -> Path:
    from prefalign.models.tiny import build_tokenizer, save_tiny

    return save_tiny(out / "tiny-base", "llama", build_tokenizer(imdb_texts(2000), vocab_size=2000, chat=False),
                     hidden=64, layers=2)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="a local HF folder, or 'tiny' (random-init, built here)")
    ap.add_argument("--reward", default=REWARD)
    ap.add_argument("--train-prompts", type=int, default=64)
    ap.add_argument("--eval-prompts", type=int, default=64)
    ap.add_argument("--split", choices=("test", "validation"), default="test", help="held-out prefixes")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--samples", type=int, default=4, help="DPO: continuations sampled per prefix")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--dpo-lr", type=float, default=None)
    ap.add_argument("--ppo-lr", type=float, default=None)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--kl-coef", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/dpo_vs_ppo_cost")
    return ap.parse_args()


def main() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # before the stage processes' forkserver starts
    sys.path.insert(0, str(ROOT / "src"))
    from prefalign.tasks import sentiment as task
    from prefalign.tasks.stages import Log, chain, run_stage

    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = build_tiny(out) if args.model == "tiny" else Path(args.model)
    sizes = task.Sizes(train_prompts=args.train_prompts, eval_prompts=args.eval_prompts, samples=args.samples,
                       max_new_tokens=args.max_new_tokens, seed=args.seed)
    train_prompts, held_out = task.split_prefixes(out, sizes, args.split)
    lr_default = 1e-4 if args.lora else 1e-5
    # the KL monitor (kl_every) samples and scores completions during training: a cost of neither method,
    # off for both; the evaluation measures the exact KL of the final models
    common = dict(max_steps=args.steps, batch_size=args.batch, lora=args.lora, kl_every=0)
    log = Log()

    print("DPO: sample pairs from the base model, label by the scorer, train", file=sys.stderr)
    (pairs, pair_summary), c_pairs = run_stage(task.make_pairs, out, base, train_prompts, sizes, log, args.reward)
    dpo_run, c_dpo = run_stage(task.train, out / "dpo", base, "dpo", pairs, None, sizes, log, False,
                               learning_rate=args.dpo_lr or lr_default, beta=args.beta, **common)
    print("PPO: the same prefixes, the scorer as reward", file=sys.stderr)
    ppo_run, c_ppo = run_stage(task.train, out / "ppo", base, "ppo", None, train_prompts, sizes, log, False,
                               learning_rate=args.ppo_lr or lr_default, kl_coef=args.kl_coef, reward=args.reward,
                               **common)
    print(f"evaluate base, DPO and PPO on the {args.split} prefixes", file=sys.stderr)
    models = [(base, out / "eval" / "base")] + [(out / m / "final", out / "eval" / m) for m in ("dpo", "ppo")]
    evals, c_eval = run_stage(task.evaluate_all, models, base, held_out, sizes, log, False, args.reward)

    results = {"base": {}, "dpo": {"train": c_dpo, "end_to_end": chain(c_pairs, c_dpo), "run": dpo_run},
               "ppo": {"train": c_ppo, "end_to_end": chain(c_ppo), "run": ppo_run}}
    for name, e in zip(("base", "dpo", "ppo"), evals, strict=True):
        results[name].update({k: e[k] for k in ("reward_mean", "reward_ci95", "kl_per_sequence", "prompts",
                                                "mean_length")})
    stages = {"pairs": c_pairs, "dpo": c_dpo, "ppo": c_ppo, "eval": c_eval}
    (out / "results.json").write_text(json.dumps({"args": vars(args), "stages": stages, "pairs": pair_summary,
                                                  "results": results}, indent=2, default=str))
    print_table(args, base, results, pair_summary, c_pairs)


def print_table(args, base, results: dict, pair_summary: dict, c_pairs: dict) -> None:
    gib = 1024**3
    print(f"\nbase {base}; {args.train_prompts} train / {args.eval_prompts} {args.split} IMDb prefixes; "
          f"{args.steps} steps x {args.batch}; {'LoRA' if args.lora else 'full'}; reward {Path(args.reward).name}; "
          "costs: docs/benchmarks.md, 'How costs are counted'")
    print("| | train s | train peak RSS | end-to-end s | end-to-end peak RSS | train tokens/s | generation tokens/s | "
          "model copies | held-out reward [95% CI] | exact KL/seq |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    generation = {"dpo": pair_summary["sample"]["tokens_per_s"],
                  "ppo": results["ppo"]["run"]["final"].get("ppo/generation_tokens_per_s")}
    for name in ("base", "dpo", "ppo"):
        r = results[name]
        cost = "– | – | – | – | – | – | 1"
        if name != "base":
            t, e, run = r["train"], r["end_to_end"], r["run"]
            gen = generation[name]
            cost = (f"{t['seconds']:.1f} | {t['peak_rss_bytes'] / gib:.2f} GiB | {e['seconds']:.1f} | "
                    f"{e['peak_rss_bytes'] / gib:.2f} GiB | {run['tokens_per_s']:.0f} | "
                    f"{'–' if gen is None else f'{gen:.0f}'} | {run['model_copies']}")
        lo, hi = r["reward_ci95"]
        print(f"| {name} | {cost} | {r['reward_mean']:.3f} [{lo:.3f}, {hi:.3f}] | {r['kl_per_sequence']:.2f} |")
    print(f"DPO end to end = {c_pairs['seconds']:.1f} s pair sampling + labelling "
          f"({pair_summary['curate']['kept']} pairs) + {results['dpo']['train']['seconds']:.1f} s training; "
          f"results in {Path(args.out) / 'results.json'}")


if __name__ == "__main__":
    main()
