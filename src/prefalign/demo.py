"""`prefalign demo`: the most complete pipeline that exists, end to end on shipped data, no downloads."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from .data.curate import CurateConfig, ReadOptions, SplitConfig, compute_stats, curate, split

ASSETS = Path(__file__).parent / "assets"
HH_SLICE = ASSETS / "hh_rlhf_harmless_100.jsonl"


def run_demo(out: Path, console: Console | None = None) -> dict:
    console = console or Console(stderr=True)
    out.mkdir(parents=True, exist_ok=True)
    console.rule("1/3 data: check and describe the shipped HH-RLHF slice")
    stats = compute_stats(HH_SLICE, ReadOptions()).to_json()
    console.print(f"{stats['records']} records, {stats['valid']} valid, {stats['invalid']} invalid; "
                  f"chosen longer than rejected in {stats['chosen_longer_share']:.0%} of pairs")
    console.rule("2/3 data: curate (bad records quarantined, nothing lost)")
    res = curate(HH_SLICE, out / "curated.jsonl", out / "quarantine.jsonl", CurateConfig())
    console.print(f"kept {res.kept}, set aside {dict(res.set_aside)}, invalid rows {res.rows_invalid}")
    console.rule("3/3 data: split by prompt hash")
    counts = split(out / "curated.jsonl", out / "split", SplitConfig(eval_fraction=0.1))
    console.print(f"train {counts.get('train', 0)}, eval {counts.get('eval', 0)} -> {out / 'split'}")
    summary = {"stats": stats, "curate": res.to_json(), "split": counts}
    (out / "demo.json").write_text(json.dumps(summary, indent=2))
    console.print(f"[bold green]done[/]: {out / 'demo.json'}")
    return summary
