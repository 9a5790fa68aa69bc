"""`prefalign demo`: the most complete pipeline that exists, end to end on shipped data, no downloads."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from .data import load_records
from .data.curate import CurateConfig, ReadOptions, SplitConfig, compute_stats, curate, split
from .data.records import text_of

ASSETS = Path(__file__).parent / "assets"
HH_SLICE = ASSETS / "hh_rlhf_harmless_100.jsonl"


def run_demo(out: Path, console: Console | None = None) -> dict:
    console = console or Console(stderr=True)
    out.mkdir(parents=True, exist_ok=True)
    console.rule("1/4 data: check and describe the shipped HH-RLHF slice")
    stats = compute_stats(HH_SLICE, ReadOptions()).to_json()
    console.print(f"{stats['records']} records, {stats['valid']} valid, {stats['invalid']} invalid; "
                  f"chosen longer than rejected in {stats['chosen_longer_share']:.0%} of pairs")
    console.rule("2/4 data: curate (bad records quarantined, nothing lost)")
    res = curate(HH_SLICE, out / "curated.jsonl", out / "quarantine.jsonl", CurateConfig())
    console.print(f"kept {res.kept}, set aside {dict(res.set_aside)}, invalid rows {res.rows_invalid}")
    console.rule("3/4 data: split by prompt hash")
    counts = split(out / "curated.jsonl", out / "split", SplitConfig(eval_fraction=0.1))
    console.print(f"train {counts.get('train', 0)}, eval {counts.get('eval', 0)} -> {out / 'split'}")
    console.rule("4/4 DPO on a tiny model built here (tokenizer trained on the pairs, random-init Llama)")
    summary = {"stats": stats, "curate": res.to_json(), "split": counts, "dpo": _tiny_dpo(out, console)}
    (out / "demo.json").write_text(json.dumps(summary, indent=2))
    console.print(f"[bold green]done[/]: {out / 'demo.json'}")
    return summary


def _tiny_dpo(out: Path, console: Console) -> dict:
    from .models.tiny import build_tokenizer, save_tiny
    from .train.config import TrainConfig
    from .train.offline import run_offline

    records, _ = load_records(out / "split" / "train.jsonl")
    texts = [text_of(r.prompt) + text_of(r.chosen) + text_of(r.rejected) for r in records]
    tokenizer = build_tokenizer(texts, vocab_size=2000, chat=False)
    model_dir = save_tiny(out / "tiny-model", "llama", tokenizer, hidden=64, layers=2)
    cfg = TrainConfig(method="dpo", model=str(model_dir), data=str(out / "split" / "train.jsonl"),
                      eval_data=str(out / "split" / "eval.jsonl"), output=str(out / "dpo"), max_steps=40,
                      batch_size=8, learning_rate=1e-3, beta=0.1, max_length=256, max_prompt_length=160,
                      eval_every=40, lr_schedule="constant")
    result = run_offline(cfg, log=lambda m: console.print(m, highlight=False, markup=False))
    rows = [json.loads(x) for x in (out / "dpo" / "metrics.jsonl").read_text().splitlines()]
    before, after = rows[0], rows[-1]
    console.print(f"held-out DPO loss {before['eval/loss']:.4f} -> {after['eval/loss']:.4f}; implicit-reward "
                  f"accuracy {after['eval/rewards/accuracy']:.2f}; train {result.last.get('tokens_per_s', 0):.0f} "
                  f"tokens/s, {result.wall_seconds:.1f} s")
    return {"eval_before": before, "eval_after": {k: v for k, v in after.items() if k.startswith("eval/")},
            "wall_seconds": result.wall_seconds}
