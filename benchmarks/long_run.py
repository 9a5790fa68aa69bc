"""A long DPO run under watch: is its memory flat, its metrics file whole, its checkpoints the last ones?

    python benchmarks/long_run.py [--steps 2000] [--save-every 50] [--eval-every 100] [--kl-every 100]
                                  [--model shipped|tiny] [--threads 1] [--warmup-step 100]
                                  [--out benchmarks/results/long-run-cpu-2core]

Runs `prefalign train --method dpo` (the CLI, as a user would: progress bar and TensorBoard on, the
defaults) on the shipped model (src/prefalign/assets/imdb-lm) or a tiny llama built here, with
reference=precompute, a checkpoint every --save-every steps (keep_checkpoints at its default), an
eval and a KL measurement every --eval-every/--kl-every steps, so that by --warmup-step every kind of
periodic work has run at least once. From outside, every 0.5 s: the process's RSS (/proc/PID/status
VmRSS) and the last step in metrics.jsonl; its peak from wait4. Then the checks: the metrics file parses
line by line, its steps are 0 (the baseline eval) and every step 1..N once, in order; checkpoints/ holds
exactly the last keep_checkpoints saves, each loads (the library's load_checkpoint, as resume does) and
the newest holds the final weights. tests/faults/test_long_run.py runs the same checks on a short run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "src" / "prefalign" / "assets" / "imdb-lm"
KEEP = 2  # RunConfig's keep_checkpoints default: the run below leaves it as it is
SUBJECTS = "the movie film plot story scene actor ending music".split()


def pairs(n: int, seed: int) -> list[dict]:
    """A learnable preference set: "loved" prompts prefer praise, "hated" ones the pan."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        loved = i % 2 == 0
        subject = " ".join(rng.choice(SUBJECTS) for _ in range(rng.randint(1, 4)))
        praise, pan = f" it was {rng.choice(['good', 'great', 'fine'])}.", f" it was {rng.choice(['bad', 'awful'])}."
        rows.append({"prompt": f"I {'loved' if loved else 'hated'} {subject}",
                     "chosen": praise if loved else pan, "rejected": pan if loved else praise})
    return rows


def write_data(folder: Path, n_train: int = 512, n_eval: int = 32) -> tuple[Path, Path]:
    train, held = folder / "train.jsonl", folder / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in pairs(n_train, 0)))
    held.write_text("".join(json.dumps(r) + "\n" for r in pairs(n_eval, 1)))
    return train, held


def tiny_llama(folder: Path) -> Path:
    from prefalign.models.tiny import build_tokenizer, save_tiny

    texts = [json.dumps(r) for r in pairs(400, 2)]
    return save_tiny(folder, "llama", build_tokenizer(texts, vocab_size=400), hidden=32)


def train_command(model: Path, train: Path, held: Path, out: Path, steps: int, save_every: int, eval_every: int,
                  kl_every: int, threads: int, batch: int = 8, extra: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "prefalign", "train", "--method", "dpo", "--model", str(model), "--data",
            str(train), "-o", str(out), f"eval_data={held}", f"max_steps={steps}", f"batch_size={batch}",
            "learning_rate=1e-5", f"save_every={save_every}", f"eval_every={eval_every}", f"kl_every={kl_every}",
            "kl_prompts=8", "kl_max_new_tokens=16", "reference=precompute", f"threads={threads}", *extra]


def vm_rss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class StepTail:
    """The last step metrics.jsonl has logged, read incrementally (complete lines only)."""

    def __init__(self, path: Path):
        self.path, self.offset, self.step, self.partial = path, 0, None, b""

    def read(self) -> int | None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return self.step
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        for line in lines:
            if line.strip():
                self.step = json.loads(line)["step"]
        return self.step


def watch(cmd: list[str], out: Path, interval: float = 0.5, env: dict | None = None) -> dict:
    """Run `cmd` (a training run writing into `out`), sampling (seconds, RSS bytes, last logged step)."""
    out.mkdir(parents=True, exist_ok=True)
    log = open(out.parent / f"{out.name}.log", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    tail, samples = StepTail(out / "metrics.jsonl"), []
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        rss = vm_rss(proc.pid)
        if rss:
            samples.append((round(time.perf_counter() - t0, 2), rss, tail.read()))
        time.sleep(interval)
    log.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"returncode": proc.returncode, "seconds": round(time.perf_counter() - t0, 1),
            "peak_rss": usage.ru_maxrss * 1024, "samples": samples,
            "log_tail": (out.parent / f"{out.name}.log").read_text()[-3000:]}


def rss_figures(samples: list[tuple[float, int, int | None]], warmup_step: int, steps: int) -> dict:
    """RSS once warm (the median of the samples in the 50 steps after `warmup_step`), at the end (the
    median of the last 50 steps' samples), the max while stepping, and the least-squares slope over the
    steps after warm-up, in bytes per 100 steps."""
    stepping = [(s, r) for _, r, s in samples if s is not None and warmup_step <= s < steps]
    warm = [r for s, r in stepping if s < warmup_step + 50]
    end = [r for s, r in stepping if s >= steps - 50]
    if not warm or not end:
        raise ValueError(f"too few samples between steps {warmup_step} and {steps}: {len(stepping)}")
    xs, ys = [s for s, _ in stepping], [r for _, r in stepping]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / max(sum((x - mx) ** 2 for x in xs), 1)
    return {"warm_rss": int(statistics.median(warm)), "end_rss": int(statistics.median(end)),
            "max_rss_after_warmup": max(ys), "slope_per_100_steps": round(slope * 100),
            "samples_after_warmup": len(stepping)}


def by_hundred(samples: list[tuple[float, int, int | None]]) -> dict[str, int]:
    """The median RSS of the samples in each 100 steps: the run's memory, step by step."""
    buckets: dict[int, list[int]] = {}
    for _, rss, step in samples:
        if step:
            buckets.setdefault((step - 1) // 100, []).append(rss)
    return {f"{100 * b + 1}-{100 * (b + 1)}": int(statistics.median(v)) for b, v in sorted(buckets.items())}


def check_metrics(path: Path, steps: int) -> dict:
    """Every line parses; the steps are 0 (the untrained baseline eval) then 1..steps, once each, in order."""
    lines = path.read_text().split("\n")
    assert lines[-1] == "", "the file ends in a complete line"
    rows = [json.loads(line) for line in lines[:-1]]  # raises on a torn or garbled line
    got = [r["step"] for r in rows]
    assert got == list(range(0, steps + 1)), f"steps {got[:5]}...{got[-5:]} (of {len(got)})"
    return {"rows": len(rows), "first_step": got[0], "last_step": got[-1], "eval_rows": sum("eval/loss" in r
            for r in rows), "kl_rows": sum("kl/policy_ref_token" in r for r in rows)}


def check_checkpoints(out: Path, model: Path, steps: int, save_every: int, keep: int = KEEP) -> dict:
    """checkpoints/ holds exactly the last `keep` saves (no .tmp left); each loads as resume loads it;
    the newest's trainable weights are final/'s."""
    import torch
    from safetensors.torch import load_file

    from prefalign.train.checkpoint import list_checkpoints, load_checkpoint
    from prefalign.train.loop import build_optimizer
    from prefalign.train.methods import load_train_config

    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    saved = list_checkpoints(out)
    expect = [s for s in range(save_every, steps + 1, save_every)][-keep:]
    assert saved == expect and len(names) == len(expect), (names, expect)
    from transformers import AutoModelForCausalLM

    cfg = load_train_config(out / "config.yaml")  # the run's own settings: the optimizer's groups as it built them
    loaded = {}
    for step in saved:
        policy = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
        _, optimizer, scheduler = build_optimizer(cfg, policy)
        info = load_checkpoint(out / "checkpoints" / f"step-{step}", policy, optimizer, scheduler)
        assert info["step"] == step, info
        loaded[step] = {k: v.clone() for k, v in policy.state_dict().items()}
    final = load_file(str(out / "final" / "model.safetensors"))
    newest = loaded[saved[-1]]
    assert all(torch.equal(final[k], newest[k]) for k in final), "the newest checkpoint is not final/"
    assert any(not torch.equal(loaded[saved[0]][k], newest[k]) for k in final), "two checkpoints, one state"
    return {"checkpoints": names, "loaded": saved, "newest_equals_final": True}


def machine() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    return {"cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version(), "torch": torch.__version__,
            "commit": commit}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--save-every", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--kl-every", type=int, default=100)
    ap.add_argument("--model", choices=["shipped", "tiny"], default="shipped")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup-step", type=int, default=100)
    ap.add_argument("--bound", type=float, default=0.05, help="asserted: end RSS <= warm RSS x (1 + BOUND)")
    ap.add_argument("--out", default=None, help="results prefix: writes PREFIX.md and PREFIX.json")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        train, held = write_data(tmp)
        model = SHIPPED if a.model == "shipped" else tiny_llama(tmp / "tiny")
        cmd = train_command(model, train, held, tmp / "run", a.steps, a.save_every, a.eval_every, a.kl_every,
                            a.threads)
        load_before = os.getloadavg()
        run = watch(cmd, tmp / "run")
        load_after = os.getloadavg()
        if run["returncode"]:
            raise SystemExit(f"the run failed ({run['returncode']}):\n{run['log_tail']}")
        res = {"command": "python benchmarks/long_run.py " + " ".join(sys.argv[1:]),
               "train_command": " ".join(["prefalign", *cmd[3:]]).replace(str(tmp), "$TMP"),
               "machine": machine(), "seconds": run["seconds"], "peak_rss": run["peak_rss"],
               "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in load_after],
               **rss_figures(run["samples"], a.warmup_step, a.steps),
               "metrics": check_metrics(tmp / "run" / "metrics.jsonl", a.steps),
               **check_checkpoints(tmp / "run", model, a.steps, a.save_every),
               "step_seconds_median": statistics.median(json.loads(line)["step_seconds"] for line in
                                                        (tmp / "run" / "metrics.jsonl").read_text().splitlines()[1:]),
               "bound": a.bound, "warmup_step": a.warmup_step, "rss_by_100_steps": by_hundred(run["samples"]),
               "samples": run["samples"]}
    growth = res["end_rss"] / res["warm_rss"] - 1
    res["growth"] = round(growth, 4)
    print(json.dumps({k: v for k, v in res.items() if k != "samples"}, indent=1))
    if a.out:
        write_results(Path(a.out), res)
    assert growth <= a.bound, f"RSS grew {growth:.1%} from step {a.warmup_step} to the end (bound {a.bound:.0%})"


def write_results(prefix: Path, res: dict) -> None:
    prefix.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    mb, m = 1e6, res["machine"]
    lines = [f"# A long DPO run: {res['metrics']['last_step']:,} steps under watch", "",
             f"Command: `{res['command']}`", "", f"The run it starts: `{res['train_command']}`", "",
             f"Machine: {m['cpus']} cores ({m['cpu']}), Python {m['python']}, torch {m['torch']}, commit "
             f"{m['commit']}. Load average (1, 5, 15 min) before {res['load_before']}, after {res['load_after']}: "
             "the 2 cores were shared with other work, so the seconds are not a quiet machine's.", "",
             f"- wall time {res['seconds']:.0f} s (start-up, reference precompute, final/ included); median step "
             f"{res['step_seconds_median'] * 1000:.0f} ms",
             f"- RSS once warm (steps {res['warmup_step']}-{res['warmup_step'] + 49}): {res['warm_rss'] / mb:.1f} MB; "
             "at the end: "
             f"{res['end_rss'] / mb:.1f} MB ({res['growth']:+.2%}); max after warm-up "
             f"{res['max_rss_after_warmup'] / mb:.1f} MB; peak of the whole process {res['peak_rss'] / mb:.1f} MB",
             f"- slope over the steps after warm-up: {res['slope_per_100_steps'] / 1e3:+.1f} kB per 100 steps "
             f"({res['samples_after_warmup']} samples)",
             f"- asserted: end RSS <= warm RSS x {1 + res['bound']:.2f}",
             f"- metrics.jsonl: {res['metrics']['rows']} rows, steps {res['metrics']['first_step']}.."
             f"{res['metrics']['last_step']} once each, in order, every line parses; {res['metrics']['eval_rows']} "
             f"eval rows, {res['metrics']['kl_rows']} KL rows",
             f"- checkpoints/: {', '.join(res['checkpoints'])} (the last keep_checkpoints={KEEP}); each loaded with "
             "load_checkpoint; the newest equals final/", "", "Median RSS in each 100 steps (MB):", "",
             "| steps | " + " | ".join(res["rss_by_100_steps"]) + " |",
             "|---" * (1 + len(res["rss_by_100_steps"])) + "|",
             "| RSS | " + " | ".join(f"{v / mb:.1f}" for v in res["rss_by_100_steps"].values()) + " |"]
    prefix.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
