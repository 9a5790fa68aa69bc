"""Prompt-once rows against padded rows: the DPO step (forward + backward) of a state-space model.

    python benchmarks/ssm_prompt_once.py [--shape mamba-130m] [--layers N] [--pairs 2] [--prompt 256]
                                         [--answers 64 128] [--repeats 3] [--layouts padded-layers,prompt-once]
                                         [--out benchmarks/results/ssm-prompt-once-cpu-2core]

The model is the bench's shape (prefalign.bench.shapes, random init, fp32, this machine's device; --layers keeps
its first N layers, for a slice of it). The batch: --pairs pairs, each a prompt of --prompt random tokens and two
answers of a random length in --answers (seeded). The step is the trainer's own (train/offline.py make_step:
DPO, reference precomputed at the untrained policy's log-probs, so the loss is log 2) on each layout's batch,
forward and backward; the optimizer step is left out (the same for every layout), so the weights do not move
and every repeat computes the same loss. Layouts:
  padded         padded rows through transformers' forward: what `share_prompt: false` runs
  padded-layers  the same padded rows through the Mamba-1 layers prompt-once rows run (models/prompt_once.py,
                 with no prompt pass): the layout's own saving, apart from how the layers are computed
  prompt-once    prompt-once rows (`share_prompt: auto`)
They run in turn within each repeat (the order reversed on odd repeats), in one process, so a change in the
machine's load falls on all. Reported per layout: the median, min and max wall and CPU seconds, tokens/s (real
prompt + answer tokens, the same count for all), the positions the model computes, the bytes autograd keeps for
backward (distinct storages, weights left out: independent of load), and the peak RSS of one step in a fresh
process that builds the model and runs that layout alone (VmHWM reset after the model is built). The machine may
be shared: os.getloadavg() is recorded before and after. The summed log-probs of every layout are compared
with the first's before timing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from prefalign.bench.shapes import SHAPES, build
from prefalign.data.batches import Example, collate, collate_prompt_once
from prefalign.data.tokenize import Tokenized
from prefalign.models.logps import batch_logps
from prefalign.models.reference import PrecomputedReference
from prefalign.runtime.device import describe, pick_device, sync
from prefalign.runtime.precision import autocast_for
from prefalign.train.methods import METHODS
from prefalign.train.offline import choose_layout, forward_of, make_step

ROOT = Path(__file__).resolve().parent.parent
LAYOUTS = ("padded", "padded-layers", "prompt-once")


def examples(vocab: int, pairs: int, prompt: int, answers: tuple[int, int], seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(pairs):
        p = torch.randint(1, vocab, (prompt,), generator=g).tolist()
        seqs = []
        for _ in range(2):
            n = int(torch.randint(answers[0], answers[1] + 1, (1,), generator=g))
            seqs.append(Tokenized(p + torch.randint(1, vocab, (n,), generator=g).tolist(), prompt))
        out.append(Example(tuple(seqs)))
    return out


def batches_of(exs: list[Example], dev: torch.device) -> dict[str, dict]:
    idx = list(range(len(exs)))
    padded = collate(exs, idx, 0)
    # no prompt pass: prompt-once's route runs the padded rows through its own layers from a zero state
    empty = torch.zeros(len(exs), 0, dtype=torch.long)
    out = {"padded": padded, "padded-layers": dict(padded, prompt_ids=empty, prompt_mask=empty),
           "prompt-once": collate_prompt_once(exs, idx, 0)}
    return {name: {k: v.to(dev) for k, v in b.items()} for name, b in out.items()}


def setup(args):
    dev = pick_device("auto")
    torch.manual_seed(0)
    shape = dict(SHAPES[args.shape], **({"layers": args.layers} if args.layers else {}))
    model = build(shape, None, dev).train()
    batches = batches_of(examples(model.config.vocab_size, args.pairs, args.prompt, tuple(args.answers)), dev)
    cfg = METHODS["dpo"].config(model="-", data="-", output="-", precision="fp32", share_prompt=True,
                                max_length=args.prompt + args.answers[1])
    with torch.no_grad():  # the reference: this policy's own log-probs (precomputed, as the trainer's default)
        ref = batch_logps(model.eval(), batches["prompt-once"]).cpu().view(2, args.pairs).T
    model.train()
    step = make_step(forward_of(model, cfg), cfg, PrecomputedReference(ref), autocast_for("fp32", dev))
    return dev, model, cfg, batches, step, shape


def one_step(model, step, batch, dev) -> tuple[float, float, float, int]:
    """(wall s, CPU s, loss, bytes autograd keeps for backward) of one forward + backward. The bytes are
    those of the distinct storages saved, weights left out (every layout keeps the same weights)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    sync(dev)
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _, _ = step(batch)
    loss.backward()
    sync(dev)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    model.zero_grad(set_to_none=True)
    return wall, cpu, float(loss.detach()), sum(saved.values())


def _status(key: str) -> int:
    """A /proc/self/status size (VmRSS, VmHWM) in bytes."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def memory_of(args) -> None:
    """In a fresh process: one step of `args.memory_of` alone; its peak RSS above the RSS before it."""
    dev, model, _, batches, step, _ = setup(args)
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak, to the RSS now (Linux)
    one_step(model, step, batches[args.memory_of], dev)
    print(json.dumps({"rss_before_bytes": before, "peak_rss_bytes": _status("VmHWM"),
                      "step_peak_bytes": _status("VmHWM") - before}))


def peak_rss_child(args, layout: str) -> dict:
    cmd = [sys.executable, __file__, "--memory-of", layout, "--shape", args.shape, "--layers", str(args.layers),
           "--pairs", str(args.pairs), "--prompt", str(args.prompt), "--answers", *map(str, args.answers)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args) -> dict:
    load_start = os.getloadavg()
    layouts = args.layouts.split(",")
    dev, model, cfg, batches, step, shape = setup(args)
    assert choose_layout(cfg, model, METHODS["dpo"]) == "prompt_once"
    with torch.no_grad():
        logps = {k: batch_logps(model.eval(), batches[k]) for k in layouts}
    model.train()
    diffs = {k: float((logps[k] - logps[layouts[0]]).abs().max()) for k in layouts[1:]}
    rows = {k: {"wall": [], "cpu": [], "loss": []} for k in layouts}
    for r in range(args.warmup + args.repeats):
        for name in (layouts if r % 2 == 0 else layouts[::-1]):
            wall, cpu, loss, saved = one_step(model, step, batches[name], dev)
            if r >= args.warmup:
                rows[name]["wall"].append(wall), rows[name]["cpu"].append(cpu), rows[name]["loss"].append(loss)
                rows[name]["saved_bytes"] = saved
            print(f"repeat {r} {name:14s} {wall:8.2f} s wall {cpu:8.2f} s CPU  load {os.getloadavg()[0]:.1f}",
                  flush=True)
    load_end = os.getloadavg()
    tokens = int(batches["padded"]["attention_mask"].sum())
    out = {"command": "python benchmarks/ssm_prompt_once.py " + " ".join(sys.argv[1:]), "shape": args.shape,
           "shape_spec": shape, "device": describe(dev), "cpu": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "torch": torch.__version__, "pairs": args.pairs, "prompt": args.prompt,
           "answers": args.answers, "tokens": tokens, "load_start": load_start, "load_end": load_end,
           "logps_max_abs_diff_vs_first": diffs, "logps_first": logps[layouts[0]].tolist(), "layouts": {}}
    for name in layouts:
        r, b = rows[name], batches[name]
        positions = int(b["input_ids"].numel()) + (int(b["prompt_ids"].numel()) if "prompt_ids" in b else 0)
        med = statistics.median(r["wall"])
        out["layouts"][name] = {
            "wall_median": med, "wall_min": min(r["wall"]), "wall_max": max(r["wall"]), "wall": r["wall"],
            "cpu_median": statistics.median(r["cpu"]), "cpu_min": min(r["cpu"]), "cpu_max": max(r["cpu"]),
            "cpu": r["cpu"], "tokens_per_s": tokens / med, "positions": positions, "saved_bytes": r["saved_bytes"],
            "loss": r["loss"][0], **peak_rss_child(args, name)}
    return out


def markdown(res: dict) -> str:
    gb, lay = 2**30, res["layouts"]
    spec = res["shape_spec"]
    lines = [f"# Prompt-once rows vs padded rows: the DPO step of {res['shape']} ({spec['layers']} layers, "
             f"{res['device']}, {res['threads']} threads, torch {res['torch']})", "", f"    {res['command']}", "",
             f"{res['pairs']} pairs, prompt {res['prompt']} tokens, answers {res['answers'][0]}-{res['answers'][1]} "
             f"tokens ({res['tokens']} real tokens a step); forward + backward of the trainer's DPO step (reference "
             f"precomputed), no optimizer step; {len(next(iter(lay.values()))['wall'])} repeats after warm-up, the "
             f"layouts in turn in one process. Load average (1, 5, 15 min) before: "
             f"{', '.join(f'{x:.1f}' for x in res['load_start'])}; after: "
             f"{', '.join(f'{x:.1f}' for x in res['load_end'])}: the machine was shared with other work, which "
             "slows and spreads the wall times (CPU seconds less so).", "",
             "| layout | wall s median [min, max] | CPU s median [min, max] | tokens/s | positions | kept for "
             "backward | peak RSS of one step (own process) |", "|---|---|---|---|---|---|---|"]
    for name, r in lay.items():
        lines.append(f"| {name} | {r['wall_median']:.1f} [{r['wall_min']:.1f}, {r['wall_max']:.1f}] | "
                     f"{r['cpu_median']:.1f} [{r['cpu_min']:.1f}, {r['cpu_max']:.1f}] | {r['tokens_per_s']:.1f} | "
                     f"{r['positions']} | {r['saved_bytes'] / gb:.2f} GiB | {r['step_peak_bytes'] / gb:.2f} GiB |")
    lines.append("")
    once = lay.get("prompt-once")
    for name, r in lay.items():
        if once is None or name == "prompt-once":
            continue
        lines.append(f"prompt-once over {name}: ×{r['wall_median'] / once['wall_median']:.2f} the speed (wall "
                     f"medians; ×{r['cpu_median'] / once['cpu_median']:.2f} in CPU seconds), "
                     f"{once['positions'] / r['positions']:.2f}× the positions, "
                     f"{once['saved_bytes'] / r['saved_bytes']:.2f}× the bytes kept for backward, "
                     f"{once['step_peak_bytes'] / r['step_peak_bytes']:.2f}× the step's peak RSS.")
    first = next(iter(lay))
    lines += ["", f"Same work: summed log-probs of {first}: "
              f"{', '.join(f'{x:.2f}' for x in res['logps_first'])}; the other layouts' differ from them by at most "
              + ", ".join(f"{d:.1e} ({k})" for k, d in res["logps_max_abs_diff_vs_first"].items())
              + " (fp32 rounding); losses " + ", ".join(f"{r['loss']:.6f} ({k})" for k, r in lay.items()) + ".", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="mamba-130m", choices=[s for s in SHAPES if "mamba" in SHAPES[s]["arch"]])
    ap.add_argument("--layers", type=int, default=0, help="keep the shape's first N layers (0: all)")
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--answers", type=int, nargs=2, default=[64, 128])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--layouts", default="padded-layers,prompt-once")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/ssm-prompt-once-cpu-2core"))
    ap.add_argument("--memory-of", choices=LAYOUTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_of:
        return memory_of(args)
    if any(k not in LAYOUTS for k in args.layouts.split(",")):
        ap.error(f"--layouts: choose from {', '.join(LAYOUTS)}")
    if "padded-layers" in args.layouts and SHAPES[args.shape]["arch"] != "mamba":
        ap.error("--layouts: padded-layers runs Mamba-1 layers; Mamba-2 continues transformers' own forward")
    res = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(res, indent=2))
    Path(args.out + ".md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
