"""prefalign's DPO against TRL's DPOTrainer, the same work side by side in one run.

    python benchmarks/dpo_vs_trl.py [--model tiny-llama|smollm2|DIR] [--steps 10] [--configs ...]

TRL is not a dependency of prefalign: it lives in its own environment (`benchmarks/.venv-trl`,
made on first use with the machine's torch). Each trainer runs in its own subprocess, so its peak
RSS is its own; runs alternate prefalign/TRL. Both see the same model folder, the same 8 pairs
(every step is the whole set, so the data order cannot differ), AdamW at a constant learning rate,
clipping 1.0, beta 0.1, dropout off. Tokens counted for both: the real (non-padding) prompt +
completion tokens of the chosen and rejected sequences. Checks that they do the same work: the
per-sequence log-probs at step 0 agree to 1e-4 and the first steps' losses agree to 1e-3.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
TRL_VENV = ROOT / "benchmarks" / ".venv-trl"

COMMON = r"""
import json, resource, statistics, sys, time
import torch
cfg = json.loads(sys.argv[1])
torch.manual_seed(0)
torch.set_num_threads(cfg["threads"])
pairs = [json.loads(x) for x in open(cfg["data"])]
def finish(step_times, losses, logps, tokens):
    times = step_times[1:] or step_times  # the first step warms caches and allocators
    print("RESULT " + json.dumps({"step_seconds_median": statistics.median(times), "losses": losses,
          "step0_logps": logps, "tokens_per_step": tokens,
          "tokens_per_s": tokens / statistics.median(times),
          "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

PREFALIGN_RUNNER = COMMON + r"""
from prefalign.train.config import TrainConfig
from prefalign.train.offline import run_offline
from prefalign.models.logprobs import sequence_logps
tc = TrainConfig(method="dpo", model=cfg["model"], data=cfg["data"], output=cfg["out"], max_steps=cfg["steps"],
                 batch_size=8, learning_rate=cfg["lr"], lr_schedule="constant", beta=0.1, max_length=100000,
                 max_prompt_length=100000, precision=cfg["precision"], lora=cfg["lora"], reference="auto")
run_offline(tc, log=lambda m: None, progress=False)
rows = [json.loads(x) for x in open(cfg["out"] + "/metrics.jsonl")]
step_times = [r["step_seconds"] for r in rows if "step_seconds" in r]
tokens = rows[0]["tokens_per_s"] * rows[0]["step_seconds"]
# step-0 per-sequence log-probs: a fresh model, the same batch the trainer builds
from prefalign.models.load import load_model, load_tokenizer
from prefalign.data import load_records
from prefalign.train.batches import tokenize_records, collate
tok = load_tokenizer(cfg["model"]); model = load_model(cfg["model"])
recs, _ = load_records(cfg["data"])
data = tokenize_records(tok, recs, max_length=100000, max_prompt_length=100000, data="pairs")
b = collate(data.examples, list(range(len(data))), tok.pad_token_id)
with torch.no_grad():
    lp = sequence_logps(model, b["input_ids"], b["attention_mask"], b["loss_mask"]).tolist()
finish(step_times, [r["loss"] for r in rows], lp, round(tokens))
"""

TRL_RUNNER = COMMON + r"""
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DPOConfig, DPOTrainer
model = AutoModelForCausalLM.from_pretrained(cfg["model"])
tok = AutoTokenizer.from_pretrained(cfg["model"])
peft_config = None
if cfg["lora"]:
    from peft import LoraConfig
    peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
kw = {} if cfg["trl_defaults"] else {"bf16": cfg["precision"] == "bf16", "gradient_checkpointing": False}
args = DPOConfig(output_dir=cfg["out"], per_device_train_batch_size=8, max_steps=cfg["steps"],
                 learning_rate=cfg["lr"], lr_scheduler_type="constant", warmup_steps=0, beta=0.1, logging_steps=1,
                 report_to=[], save_strategy="no", seed=0, use_cpu=True, max_length=None, disable_dropout=True,
                 precompute_ref_log_probs=cfg["precompute"], dataloader_num_workers=0, **kw)
times = []
class Timer(TrainerCallback):
    def on_step_begin(self, *a, **k): self.t = time.perf_counter()
    def on_step_end(self, *a, **k): times.append(time.perf_counter() - self.t)
trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs), processing_class=tok,
                     peft_config=peft_config, callbacks=[Timer()])
ds = trainer.train_dataset
batch = trainer.data_collator([ds[i] for i in range(len(ds))])
tokens = int(batch["attention_mask"].sum())
with torch.no_grad():
    c, r = trainer.compute_ref_log_probs(trainer.model, batch)
trainer.train()
losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
finish(times, losses, c.tolist() + r.tolist(), tokens)
"""


def ensure_trl_env() -> Path:
    python = TRL_VENV / "bin" / "python"
    if python.exists():
        return python
    subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    # the same torch as ours, never a CUDA download on a CPU machine
    import torch

    if subprocess.run(pip + ["--no-index", "--no-deps", f"torch=={torch.__version__.split('+')[0]}"]).returncode:
        raise SystemExit("cannot install torch into the TRL environment from the local wheel cache")
    subprocess.run(pip + [f"torch=={torch.__version__.split('+')[0]}", "trl", "peft"], check=True)
    return python


def build_tiny_llama(root: Path, vocab: int = 32000) -> Path:
    """~23M-parameter Llama (hidden 384, 6 layers) with a 32k BPE trained on IMDb reviews."""
    from prefalign.models.tiny import build_tokenizer, save_tiny

    out = root / "tiny-llama"
    if (out / "model.safetensors").exists():
        return out
    texts = []
    with gzip.open(SHARED / "imdb" / "imdb_unsup.jsonl.gz", "rt") as f:
        for i, line in enumerate(f):
            if i >= 20000:
                break
            texts.append(json.loads(line)["text"].replace("<br />", " "))
    texts += [json.loads(x)["chosen"] for x in gzip.open(SHARED / "hh-rlhf" / "harmless-base-dev.jsonl.gz", "rt")]
    tok = build_tokenizer(texts, vocab_size=vocab, chat=False)
    save_tiny(out, "llama", tok, hidden=384, layers=6, heads=6, tie_word_embeddings=False)
    return out


def make_pairs(model_dir: Path, path: Path, n: int = 8, max_tokens: int = 256) -> None:
    """8 real HH-RLHF pairs whose prompt + answer fit in max_tokens and whose tokens at the seam are
    the same whether prompt and answer are tokenized together or apart (so both trainers agree)."""
    from prefalign.data import load_records
    from prefalign.models.load import load_tokenizer

    tok = load_tokenizer(model_dir)
    records, _ = load_records(SHARED / "hh-rlhf" / "harmless-base-dev.jsonl.gz")
    chosen = []
    for r in records:
        ok = True
        for answer in (r.chosen, r.rejected):
            joint = tok(r.prompt + answer)["input_ids"]
            apart = tok(r.prompt)["input_ids"] + tok(answer, add_special_tokens=False)["input_ids"]
            ok &= joint == apart and 160 <= len(joint) + 1 <= max_tokens
        if ok:
            chosen.append({"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected})
        if len(chosen) == n:
            break
    path.write_text("".join(json.dumps(p) + "\n" for p in chosen))


def run(python: str, runner: str, cfg: dict) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([python, "-c", runner, json.dumps(cfg)], capture_output=True, text=True, env=env)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"runner failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[7:])


CONFIGS = {  # name -> (trainer, settings)
    "trl-default": ("trl", dict(trl_defaults=True, precision="bf16", precompute=False)),
    "trl-fp32": ("trl", dict(trl_defaults=False, precision="fp32", precompute=False)),
    "trl-fp32-precompute": ("trl", dict(trl_defaults=False, precision="fp32", precompute=True)),
    "trl-bf16-precompute": ("trl", dict(trl_defaults=False, precision="bf16", precompute=True)),
    "prefalign-fp32": ("prefalign", dict(precision="fp32")),
    "prefalign-bf16": ("prefalign", dict(precision="bf16")),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-llama", help="tiny-llama, smollm2 (a converted folder), or a folder")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lora", choices=["both", "yes", "no"], default="both")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "prefalign-bench"))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    model = build_tiny_llama(work) if a.model == "tiny-llama" else Path(a.model)
    data = work / f"pairs-{model.name}.jsonl"
    make_pairs(model, data)
    trl_python = str(ensure_trl_env())
    lora_modes = {"both": [False, True], "yes": [True], "no": [False]}[a.lora]
    print(f"model {model}, {a.steps} steps of 8 pairs, {a.threads} threads")
    for lora in lora_modes:
        results = {}
        names = [n for n in a.configs.split(",") if n in CONFIGS]
        # alternate prefalign and TRL runs so that slow drift of the machine hits both alike
        order = sorted(names, key=lambda n: (names.index(n) % 2, n.startswith("trl")))
        for name in order:
            trainer, settings = CONFIGS[name]
            cfg = {"model": str(model), "data": str(data), "out": str(work / f"run-{name}-{lora}"), "steps": a.steps,
                   "lr": 1e-4 if lora else 1e-5, "lora": lora, "threads": a.threads, **settings}
            results[name] = run(sys.executable if trainer == "prefalign" else trl_python,
                                PREFALIGN_RUNNER if trainer == "prefalign" else TRL_RUNNER, cfg)
        report(results, "LoRA" if lora else "full fine-tune")


def report(results: dict, title: str) -> None:
    print(f"\n## {title}\n")
    print("| config | tokens/step | s/step (median) | tokens/s | peak RSS | loss[0..3] |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['tokens_per_step']} | {r['step_seconds_median']:.3f} | {r['tokens_per_s']:.0f} | "
              f"{r['peak_rss_bytes'] / 1e9:.2f} GB | {', '.join(f'{x:.4f}' for x in r['losses'][:4])} |")
    ours = {n: r for n, r in results.items() if n.startswith("prefalign")}
    theirs = {n: r for n, r in results.items() if n.startswith("trl")}
    for o, ro in ours.items():
        for t, rt in theirs.items():
            if ("bf16" in o) != ("bf16" in t or t == "trl-default"):
                continue
            dl = max(abs(x - y) for x, y in zip(ro["step0_logps"], rt["step0_logps"], strict=True))
            n = min(len(ro["losses"]), len(rt["losses"]), 10)
            dloss = max(abs(x - y) for x, y in zip(ro["losses"][:n], rt["losses"][:n], strict=True))
            print(f"- {o} vs {t}: tokens/s x{ro['tokens_per_s'] / rt['tokens_per_s']:.2f}, peak RSS "
                  f"x{ro['peak_rss_bytes'] / rt['peak_rss_bytes']:.2f}; step-0 log-probs max |diff| {dl:.2e}, "
                  f"first {n} losses max |diff| {dloss:.2e}")
    print(f"- medians over steps 2..N; {statistics.mean(r['tokens_per_step'] for r in results.values()):.0f} "
          "real tokens per step on average")


if __name__ == "__main__":
    main()
