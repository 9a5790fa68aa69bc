"""Noise-aware DPO on data with known label-flip rates: is eps recovered, and does `robust` with
`label_smoothing: auto` keep its held-out accuracy where plain DPO loses it as the noise grows?

    python benchmarks/noise_aware.py --rates 0.05,0.2,0.35 --seeds 0,1,2,3,4 \
        --out benchmarks/results/noise-aware-cpu-2core

The task is the test suite's learnable one (tests/conftest.py: after "I loved ..." praise is preferred,
after "I hated ..." the pan), on the suite's tiny Llama (hidden 32, its own corpus tokenizer). Per seed:
`--pairs` distinct pairs (96 by default), each labelled twice, each label flipped independently with
probability eps (so the training file has twice as many records and its duplicates see the noise; `auto`
refuses an interval wider than 0.15, which at 35% takes about 660 comparisons); 64 held-out pairs with other prompts and
clean labels. Every method trains with the same settings, fixed before this benchmark existed: the suite's
DPO settings (tests/test_train_methods.py: beta 0.5, learning rate 3e-3, constant, 60 steps of 8); nothing
here was tuned on the held-out pairs. Reported: held-out reward accuracy (the implicit reward ranks the
clean chosen answer first) per method, mean [95% t-interval over seeds], robust - dpo paired by seed, and
the estimate of eps with how often its 95% interval held the true rate.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the suite's task and tokenizer corpus

from conftest import corpus, held_out_pairs, learnable_pairs, write_jsonl  # noqa: E402
from prefalign.models.tiny import build_tokenizer, save_tiny  # noqa: E402
from prefalign.tasks.seeds import mean_ci  # noqa: E402
from prefalign.train.methods import make_config  # noqa: E402
from prefalign.train.run import train  # noqa: E402

METHODS = {"dpo": 0.0, "robust": "auto", "cdpo": "auto"}  # method -> label_smoothing
SETTINGS = dict(beta=0.5, learning_rate=3e-3, lr_schedule="constant", max_steps=60, batch_size=8, kl_every=0)


def noisy(rows: list[dict], eps: float, copies: int, seed: int) -> list[dict]:
    """Each pair `copies` times, each copy's label flipped independently with probability eps."""
    rng = random.Random(seed)
    out = [dict(r, chosen=r["rejected"], rejected=r["chosen"]) if rng.random() < eps else dict(r)
           for r in rows for _ in range(copies)]
    rng.shuffle(out)
    return out


def one(model: Path, work: Path, eps: float, seed: int, pairs: int = 96, steps: int | None = None) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    rows = learnable_pairs(pairs, seed=100 + seed)
    data = write_jsonl(work / "train.jsonl", noisy(rows, eps, 2, seed))
    held = write_jsonl(work / "held.jsonl", held_out_pairs(rows, n=64, seed=200 + seed))
    result: dict = {"rate": eps, "seed": seed}
    settings = {**SETTINGS, "max_steps": steps or SETTINGS["max_steps"]}
    for method, smoothing in METHODS.items():
        out = work / method
        t0 = time.perf_counter()
        cfg = make_config(method=method, model=str(model), data=str(data), eval_data=str(held), output=str(out),
                          eval_every=settings["max_steps"], seed=seed, label_smoothing=smoothing, **settings)
        train(cfg, log=lambda _: None, progress=False)
        last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
        run = json.loads((out / "run.json").read_text())
        result[method] = {"held_out_accuracy": last["eval/rewards/accuracy"], "seconds": time.perf_counter() - t0,
                          "label_noise": run.get("label_noise")}
    return result


def _fmt(values: list[float], lo: float = 0.0, hi: float = 1.0) -> str:
    """Mean [95% t-interval], the interval clipped to the range the figure can take ([0, 1] for an accuracy,
    [-1, 1] for a difference of two): the t-interval's symmetric half-width can run past it."""
    mean, ci = mean_ci(values)
    return f"{mean:.3f} [{max(lo, ci[0]):.3f}, {min(hi, ci[1]):.3f}]" if ci else f"{mean:.3f}"


def report(results: list[dict], rates: list[float], argv: list[str], wall: float) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [f"`python benchmarks/noise_aware.py {shlex.join(argv)}` (commit {commit or '?'}, {wall:.0f} s, "
             f"1-minute load average after: {os.getloadavg()[0]:.2f})", "",
             "Held-out reward accuracy, mean [95% t-interval over seeds]; robust - dpo paired by seed; "
             "eps estimated from the training file's duplicates (mean over seeds) and how many seeds' 95% "
             "intervals held the true rate.", "",
             "| flip rate | seeds | " + " | ".join(METHODS) + " | robust - dpo | eps estimate | interval held it |",
             "|---|---|" + "---|" * (len(METHODS) + 3)]
    for rate in rates:
        rs = [r for r in results if r["rate"] == rate]
        acc = {m: [r[m]["held_out_accuracy"] for r in rs] for m in METHODS}
        noise = [r["robust"]["label_noise"] for r in rs]
        held = sum(n["low"] <= rate <= n["high"] for n in noise)
        lines.append(f"| {rate} | {len(rs)} | " + " | ".join(_fmt(acc[m]) for m in METHODS)
                     + f" | {_fmt([a - b for a, b in zip(acc['robust'], acc['dpo'], strict=True)], -1.0)}"
                     + f" | {_fmt([n['flip_rate'] for n in noise], 0.0, 0.5)} | {held}/{len(rs)} |")
    lines += ["", "Per seed (held-out accuracy dpo / robust / cdpo; eps estimate [interval]):", ""]
    for r in results:
        n = r["robust"]["label_noise"]
        lines.append(f"- rate {r['rate']}, seed {r['seed']}: " + " / ".join(
            f"{r[m]['held_out_accuracy']:.3f}" for m in METHODS) + f"; eps {n['flip_rate']:.3f} [{n['low']:.3f}, "
            f"{n['high']:.3f}]")
    return "\n".join(lines) + "\n"


def rerender(out: Path) -> None:
    """OUT.md again from OUT.json's stored results: the header (command, commit, wall time) kept, a line
    saying it was re-rendered, the tables from report()."""
    stored = json.loads(out.with_suffix(".json").read_text())
    results = stored["results"]
    rates = sorted({r["rate"] for r in results})
    old = out.with_suffix(".md").read_text()
    head = old[:old.index("Held-out reward accuracy")].rstrip("\n")
    head = head.split("\n\nRe-rendered")[0]  # idempotent: one re-render note
    body = report(results, rates, [], 0.0).split("\n", 2)[2]
    out.with_suffix(".md").write_text(
        f"{head}\n\nRe-rendered from the stored per-seed values by `python benchmarks/noise_aware.py "
        f"--report-from {out}` (no training rerun): intervals clipped to the range each figure can take.\n\n{body}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rates", default="0.05,0.2,0.35")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("-o", "--output", default="runs/noise-aware")
    ap.add_argument("--pairs", type=int, default=96, help="distinct pairs per seed, each labelled twice (an "
                    "informative estimate at 35%% needs about 660: docs/noise.md)")
    ap.add_argument("--out", help="write OUT.md and OUT.json")
    ap.add_argument("--steps", type=int, help="max_steps of every run (default: the suite's 60)")
    ap.add_argument("--report-from", metavar="OUT", help="re-render OUT.md from the per-seed values stored in "
                    "OUT.json (no training), keeping OUT.md's header")
    a = ap.parse_args()
    if a.report_from:
        rerender(Path(a.report_from))
        return
    rates, seeds = [float(x) for x in a.rates.split(",")], [int(s) for s in a.seeds.split(",")]
    root = Path(a.output)
    model = save_tiny(root / "model", "llama", build_tokenizer(corpus(), vocab_size=400), hidden=32)
    t0 = time.perf_counter()
    results = []
    for rate in rates:
        for seed in seeds:
            results.append(one(model, root / f"rate{rate}-seed{seed}", rate, seed, a.pairs, a.steps))
            print(json.dumps({k: v for k, v in results[-1].items()}), flush=True)
    text = report(results, rates, sys.argv[1:], time.perf_counter() - t0)
    print(text)
    if a.out:
        Path(a.out + ".md").write_text(text)
        settings = {**SETTINGS, "max_steps": a.steps or SETTINGS["max_steps"]}  # what the runs did
        Path(a.out + ".json").write_text(json.dumps({"command": f"python benchmarks/noise_aware.py "
                                                     f"{shlex.join(sys.argv[1:])}", "settings": settings,
                                                     "results": results}, indent=2))


if __name__ == "__main__":
    main()
