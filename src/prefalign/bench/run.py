"""`prefalign bench`: run the workloads, each in its own process, and write one results JSON.

Keys scripts read: machine `peak_flops` (the median of the measured matmul repeats, with
`peak_flops_min`/`peak_flops_max`; every MFU in the file is against it); per workload `tokens_per_s`,
`step_seconds_median`, `mfu`,
`peak_memory_bytes`; `logprob-memory`'s `vocab_memory_ratio` (the DPO step's peak at vocab 128k over
its peak at 8k, same hidden size and length, with the embedding/head growth of weights, gradients
and AdamW state excluded and reported as `embedding_growth_bytes`); `dpo_vs_ppo`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ..errors import ConfigError
from ..runtime.device import default_dtype, detect, pick_device
from ..runtime.plotting import pyplot
from .peak import matmul_peak
from .workloads import WORKLOADS, run_isolated

LOGPROB_SHAPE = dict(arch="llama", hidden=256, layers=2, heads=4, kv_heads=4, intermediate=512)
CHUNK_MB = 32.0  # logits held per chunk; below the 8k-vocabulary batch's logits, so both runs are chunk-bounded


def bench(shape: str | None, model: str | None, workloads: list[str], out: str | Path, *, batch: int = 4,
          seq: int = 256, steps: int = 5, warmup: int = 2, device: str = "auto", logprob_memory: bool = True,
          log=print) -> dict:
    dev = pick_device(device)
    dtype = default_dtype(dev)
    # other work on a shared machine slows every figure: its load (1, 5, 15 min) is kept beside them
    load = os.getloadavg()
    # one peak per results file: every workload's MFU is quoted against this median
    m = matmul_peak(dev, dtype)
    peak = m["median"]
    machine = {**detect(dev), "dtype": str(dtype).removeprefix("torch."), "load_average_start": load,
               "peak_flops": peak, "peak_flops_min": m["min"], "peak_flops_max": m["max"],
               "peak_flops_samples": m["samples"], "peak_matmul_n": m["n"], "peak_repeats": m["repeats"]}
    log(f"{machine['name']} ({machine['vendor']}): measured {dtype} matmul peak {peak / 1e9:.1f} GFLOP/s "
        f"(median of {m['repeats']} {m['n']}² matmuls; min {m['min'] / 1e9:.1f}, max {m['max'] / 1e9:.1f})")
    common = {"shape": shape, "model": model, "batch": batch, "seq": seq, "steps": steps, "warmup": warmup,
              "device": device, "peak_flops": peak}
    results: dict = {"machine": machine, "command": " ".join(["prefalign", "bench", *sys.argv[2:]]), "settings": {
        k: v for k, v in common.items() if k != "peak_flops"}, "workloads": {}}
    for w in workloads:
        if w not in WORKLOADS:
            raise ConfigError(f"unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")
        variants = [("dpo-precompute", "precompute"), ("dpo-adapter", "adapter"), ("dpo-copy", "copy")] if w == "dpo" \
            else [(w, None)]
        for name, strategy in variants:
            spec = {**common, "workload": w, **({"strategy": strategy} if strategy else {})}
            r = run_isolated(spec)
            results["workloads"][name] = r
            log(f"{name:15s} {r['tokens_per_s']:10.0f} tokens/s  step {_s(r.get('step_seconds_median'))}  "
                f"MFU {r['mfu']:.1%}  peak {r['peak_memory_bytes'] / 2**20:.0f} MiB")
    if "dpo" in workloads and "ppo" in workloads:
        d, p = results["workloads"]["dpo-precompute"], results["workloads"]["ppo"]
        results["dpo_vs_ppo"] = {
            "examples": batch, "dpo_seconds": d["step_seconds_median"], "ppo_seconds": p["step_seconds_median"],
            "ppo_rollout_seconds": p["rollout_seconds_median"], "ppo_update_seconds": p["update_seconds_median"],
            "dpo_peak_memory_bytes": d["peak_memory_bytes"], "ppo_peak_memory_bytes": p["peak_memory_bytes"],
            "dpo_model_copies": d["model_copies"], "ppo_model_copies": p["model_copies"],
            "ppo_epochs": p["ppo_epochs"], "ppo_num_minibatches": p["num_minibatches"],
            "dpo_flops_per_step": d["flops_per_step"], "ppo_flops_per_step": p["flops_per_step"],
            "time_ratio_ppo_over_dpo": p["step_seconds_median"] / d["step_seconds_median"]}
    if logprob_memory:
        results["logprob-memory"] = logprob_memory_workload(common, log)
    results["machine"]["load_average_end"] = os.getloadavg()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=2))
    log(f"results -> {out}")
    return results


def _s(x) -> str:
    return "-" if x is None else f"{x * 1000:.1f} ms"


def logprob_memory_workload(common: dict, log=print, vocabs: tuple[int, int] = (8192, 131072)) -> dict:
    """The DPO step (full fine-tune, reference precomputed) at two vocabulary sizes, all else equal.
    The batch's full-vocabulary log-softmax would grow 16x; ours computes logits in chunks."""
    rows = {}
    for v in vocabs:
        spec = {**common, "workload": "dpo", "strategy": "precompute", "model": None, "logits_chunk_mb": CHUNK_MB,
                "shape": {**LOGPROB_SHAPE, "vocab": v}}
        rows[v] = run_isolated(spec)
    small, large = rows[vocabs[0]], rows[vocabs[1]]
    # The tied embedding/head's parameter-shaped fp32 buffers: the weight, its gradient, the transient
    # gradient autograd sums into it (head and lookup both contribute), AdamW's two moments. They grow
    # with the parameter whatever the batch; the logits are what must not grow.
    buffers = 5
    growth = (vocabs[1] - vocabs[0]) * LOGPROB_SHAPE["hidden"] * 4 * buffers
    base_s, base_l = small.get("baseline_memory_bytes", 0), large.get("baseline_memory_bytes", 0)
    used_s, used_l = small["peak_memory_bytes"] - base_s, large["peak_memory_bytes"] - base_l
    out = {"vocab_small": vocabs[0], "vocab_large": vocabs[1], "peak_small_bytes": used_s, "peak_large_bytes": used_l,
           "embedding_growth_bytes": growth, "embedding_buffers_counted": buffers,
           "vocab_memory_ratio": (used_l - growth) / used_s, "logits_chunk_mb": CHUNK_MB,
           "batch": common["batch"], "seq": common["seq"], "hidden": LOGPROB_SHAPE["hidden"],
           "naive_full_logits_bytes_large": 2 * common["batch"] * common["seq"] * vocabs[1] * 4,
           "note": "peaks above the process's memory before the model was built (CPU RSS) or allocator peaks (GPU)"}
    log(f"logprob-memory: peak {used_s / 2**20:.0f} MiB at vocab {vocabs[0]}, {used_l / 2**20:.0f} MiB at {vocabs[1]} "
        f"({growth / 2**20:.0f} MiB of it embedding/head growth): ratio {out['vocab_memory_ratio']:.2f}")
    return out


def compare(files: list[str | Path], out: str | Path) -> str:
    """A markdown table and a bar chart of tokens/s per workload across result files, ratios vs the first."""
    plt = pyplot()

    runs = []
    for f in files:
        try:
            runs.append(json.loads(Path(f).read_text()))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{f}: not a bench results file (not valid JSON: {e})") from None
    labels = [f"{Path(f).stem} ({r['machine'].get('name', '?')})" for f, r in zip(files, runs, strict=True)]
    names = [w for w in runs[0]["workloads"] if all(w in r["workloads"] for r in runs)]
    lines = ["| workload | " + " | ".join(labels) + " |", "|---|" + "---|" * len(runs)]
    for w in names:
        first = runs[0]["workloads"][w]["tokens_per_s"]
        cells = []
        for r in runs:
            x = r["workloads"][w]
            cells.append(f"{x['tokens_per_s']:.0f} tok/s (x{x['tokens_per_s'] / first:.2f}), MFU {x['mfu']:.1%}, "
                         f"{x['peak_memory_bytes'] / 2**20:.0f} MiB")
        lines.append(f"| {w} | " + " | ".join(cells) + " |")
    lines.append("| peak FLOP/s (median [min, max]) | " + " | ".join(
        f"{r['machine']['peak_flops'] / 1e12:.3g} T [{r['machine'].get('peak_flops_min', float('nan')) / 1e12:.3g}, "
        f"{r['machine'].get('peak_flops_max', float('nan')) / 1e12:.3g}]" for r in runs) + " |")
    table = "\n".join(lines) + "\n"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(table)
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(names) * len(runs)), 4))
    width = 0.8 / len(runs)
    for i, (label, r) in enumerate(zip(labels, runs, strict=True)):
        ax.bar([j + i * width for j in range(len(names))], [r["workloads"][w]["tokens_per_s"] for w in names], width,
               label=label)
    ax.set_xticks([j + width * (len(runs) - 1) / 2 for j in range(len(names))], names, rotation=20)
    ax.set_ylabel("tokens/s")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=100)
    plt.close(fig)
    return table

