"""DPO vs PPO on the same base model, the same prompts and the same ground-truth reward: what each
costs (wall seconds, tokens/s, peak memory, model copies held) and what reward each reaches.

The task is the DPO paper's controlled sentiment generation (Rafailov et al. 2023, §6.1): prompts are
prefixes of IMDb reviews, the ground truth is VADER's compound sentiment of the continuation.
DPO's pipeline, as in the paper: sample 4 continuations per training prefix from the base model,
label best-vs-worst by the scorer, train DPO. PPO: the same prefixes, the scorer as its reward.
Both see `steps x batch` examples (pairs for DPO, prompts for PPO). Every stage runs in its own
process, so each peak RSS is that stage's alone. Then `prefalign eval` samples one continuation
per held-out prefix from every model (base, DPO, PPO) with the same seed, scores it with the same
scorer (95% bootstrap interval) and computes the exact KL to the base per sequence.

    python benchmarks/dpo_vs_ppo_cost.py --model models/smollm2-135m-instruct --lora   # the README figures
    python benchmarks/dpo_vs_ppo_cost.py --model tiny                                  # a 1-minute smoke run
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMDB = ROOT.parent / "shared" / "data" / "imdb" / "imdb_test.jsonl.gz"
REWARD = f"{Path(__file__).resolve().parent / 'rewards.py'}:vader_positive"


def peak_rss(argv: list[str]) -> tuple[dict, int]:
    """Run argv, return (stage result, peak RSS bytes of that process alone)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out_chunks = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(argv[:4])} failed:\n{out_chunks[1][-3000:]}")
    return {"seconds": seconds, "stdout": out_chunks[0], "stderr": out_chunks[1]}, usage.ru_maxrss * 1024


def imdb_prefixes(n: int, skip: int = 0, words: int = 8) -> list[dict]:
    rows = []
    with gzip.open(IMDB, "rt", encoding="utf-8") as f:
        for line in f:
            text = re.sub(r"<br\s*/?>", " ", json.loads(line)["text"])
            rows.append({"prompt": " ".join(text.split()[:words])})
            if len(rows) >= n + skip:
                break
    return rows[skip:]


def build_tiny(out: Path) -> Path:
    sys.path.insert(0, str(ROOT / "src"))
    from prefalign.models.tiny import build_tokenizer, save_tiny

    texts = [r["prompt"] for r in imdb_prefixes(2000)]
    return save_tiny(out / "tiny-base", "llama", build_tokenizer(texts, vocab_size=2000, chat=False), hidden=64, layers=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="a local HF folder, or 'tiny' (random-init, built here)")
    ap.add_argument("--reward", default=REWARD)
    ap.add_argument("--train-prompts", type=int, default=64)
    ap.add_argument("--eval-prompts", type=int, default=64)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--samples", type=int, default=4, help="DPO: continuations sampled per prefix")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--dpo-lr", type=float, default=None)
    ap.add_argument("--ppo-lr", type=float, default=None)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--kl-coef", type=float, default=0.05)
    ap.add_argument("--out", default="runs/dpo_vs_ppo_cost")
    args = ap.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = str(build_tiny(out)) if args.model == "tiny" else args.model
    (out / "train_prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in imdb_prefixes(args.train_prompts)))
    (out / "eval_prompts.jsonl").write_text("".join(
        json.dumps(r) + "\n" for r in imdb_prefixes(args.eval_prompts, skip=args.train_prompts)))
    lr_default = 1e-4 if args.lora else 1e-5
    common = [f"max_steps={args.steps}", f"batch_size={args.batch}", "lr_schedule=constant", "device=cpu",
              f"lora={'true' if args.lora else 'false'}"]
    cli = [sys.executable, "-m", "prefalign"]
    results: dict[str, dict] = {}

    print("DPO: sample pairs from the base model, label by the scorer, train", file=sys.stderr)
    s, rss = peak_rss(cli + ["sample", f"model={base}", f"prompts={out / 'train_prompts.jsonl'}",
                             f"output={out / 'samples.jsonl'}", f"n={args.samples}",
                             f"max_new_tokens={args.max_new_tokens}", "device=cpu"])
    sample_summary = json.loads(s["stdout"].strip().splitlines()[-1])
    lab, rss_l = peak_rss(cli + ["label", str(out / "samples.jsonl"), "--judge", args.reward,
                                 "-o", str(out / "pairs.jsonl")])
    label_summary = json.loads(lab["stdout"].strip().splitlines()[-1])
    d, rss_d = peak_rss(cli + ["train", "--method", "dpo", "--model", base, "--data", str(out / "pairs.jsonl"),
                               "-o", str(out / "dpo"), f"learning_rate={args.dpo_lr or lr_default}",
                               f"beta={args.beta}", *common, "--no-progress"])
    dpo_run = json.loads((out / "dpo" / "run.json").read_text())
    results["dpo"] = {"data_seconds": s["seconds"] + lab["seconds"], "train_seconds": d["seconds"],
                      "wall_seconds": s["seconds"] + lab["seconds"] + d["seconds"],
                      "train_tokens_per_s": dpo_run["tokens_per_s"],
                      "generation_tokens_per_s": sample_summary["tokens_per_s"],
                      "peak_rss_bytes": max(rss, rss_l, rss_d), "train_peak_rss_bytes": rss_d,
                      "model_copies": dpo_run["model_copies"], "reference": dpo_run["reference"],
                      "pairs": label_summary["written"]}

    print("PPO: the same prefixes, the scorer as reward", file=sys.stderr)
    p, rss_p = peak_rss(cli + ["train", "--method", "ppo", "--model", base,
                               "--prompts", str(out / "train_prompts.jsonl"), "--reward", args.reward,
                               "-o", str(out / "ppo"), f"learning_rate={args.ppo_lr or lr_default}",
                               f"kl_coef={args.kl_coef}", f"max_new_tokens={args.max_new_tokens}", *common,
                               "--no-progress"])
    ppo_run = json.loads((out / "ppo" / "run.json").read_text())
    results["ppo"] = {"wall_seconds": p["seconds"], "train_tokens_per_s": ppo_run["tokens_per_s"],
                      "generation_tokens_per_s": ppo_run["final"].get("ppo/generation_tokens_per_s"),
                      "peak_rss_bytes": rss_p, "model_copies": ppo_run["model_copies"],
                      "reference": ppo_run["reference"]}

    print("evaluate base, DPO and PPO on the held-out prefixes (prefalign eval)", file=sys.stderr)
    for name, model in (("base", base), ("dpo", str(out / "dpo" / "final")), ("ppo", str(out / "ppo" / "final"))):
        peak_rss(cli + ["eval", "--model", model, "--reference", base, "--prompts", str(out / "eval_prompts.jsonl"),
                        "--judge", args.reward, "-o", str(out / "eval" / name), f"max_new_tokens={args.max_new_tokens}",
                        "seed=1234", "device=cpu", "--no-progress"])
        e = json.loads((out / "eval" / name / "eval.json").read_text())
        results.setdefault(name, {}).update({k: e[k] for k in ("reward_mean", "reward_ci95", "kl_per_sequence",
                                                               "prompts")})
    (out / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    gb = 1024**3
    print(f"\nbase {base}; {args.train_prompts} train / {args.eval_prompts} held-out IMDb prefixes; "
          f"{args.steps} steps x {args.batch}; {'LoRA' if args.lora else 'full'}; reward {Path(args.reward).name}")
    print("| | wall s | train tokens/s | generation tokens/s | peak RSS | model copies | held-out reward [95% CI] | exact KL/seq |")
    print("|---|---|---|---|---|---|---|---|")
    for name in ("base", "dpo", "ppo"):
        r = results[name]
        cost = (f"{r['wall_seconds']:.1f} | {r['train_tokens_per_s']:.0f} | {r['generation_tokens_per_s']:.0f} | "
                f"{r['peak_rss_bytes'] / gb:.2f} GB | {r['model_copies']}") if name != "base" else "– | – | – | – | 1"
        lo, hi = r["reward_ci95"]
        print(f"| {name} | {cost} | {r['reward_mean']:.3f} [{lo:.3f}, {hi:.3f}] | {r['kl_per_sequence']:.2f} |")
    d = results["dpo"]
    print(f"DPO wall = {d['data_seconds']:.1f} s pair generation + labelling + {d['train_seconds']:.1f} s training "
          f"({d['pairs']} pairs); results in {out / 'results.json'}")


if __name__ == "__main__":
    main()
