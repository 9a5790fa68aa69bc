"""Benchmark workloads on model shapes (random init from config) or a local model folder.

Each workload times `steps` steps after `warmup` and reports the median and spread of the step time,
tokens/s (real, non-padding tokens, as training logs them), achieved model FLOP/s and MFU against the
machine's measured matmul peak (FLOPs counted in flops.py over the positions actually computed), and
peak memory (the allocator's peak on GPUs; this process's peak RSS on CPU, with the RSS before the
model was built reported beside it). `run_isolated` runs one workload per process, so every peak is
that workload's own. The PPO workload is the real trainer's iteration (rl.py).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

import torch

from ..data.batches import Example, collate, collate_prompt_once, collate_shared_prompt
from ..data.tokenize import Tokenized
from ..models.load import add_lora
from ..models.reference import AdapterReference, CopyReference, PrecomputedReference
from ..runtime.device import default_dtype, pick_device, sync
from ..runtime.memory import peak_memory_bytes, peak_rss_bytes
from ..runtime.precision import autocast_for
from ..train.methods import METHODS
from ..train.offline import choose_layout, forward_of, make_step
from .flops import head_params, matmul_params, step_flops
from .rl import ppo_workload
from .shapes import build

WORKLOADS = ("dpo", "sft", "reward", "ppo", "generate")


def synthetic_examples(vocab: int, n: int, seq: int, slots: int, seed: int = 0):
    """n examples of `slots` sequences: a shared prompt of seq/2 tokens and answers of seq/2."""

    g = torch.Generator().manual_seed(seed)
    half = seq // 2
    out = []
    for _ in range(n):
        prompt = torch.randint(1, vocab, (half,), generator=g).tolist()
        seqs = tuple(Tokenized(prompt + torch.randint(1, vocab, (seq - half,), generator=g).tolist(), half)
                     for _ in range(slots))
        out.append(Example(seqs))
    return out


def _time(step, steps: int, warmup: int, dev: torch.device) -> list[float]:
    times = []
    for i in range(warmup + steps):
        sync(dev)
        t0 = time.perf_counter()
        step()
        sync(dev)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def _summary(
    times: list[float], tokens: int, flops: float, peak_flops: float, dev: torch.device, base_rss: int
) -> dict:
    med = statistics.median(times)
    return {"step_seconds_median": med, "step_seconds_min": min(times), "step_seconds_max": max(times),
            "tokens_per_s": tokens / med, "flops_per_step": flops, "achieved_flops": flops / med,
            "mfu": flops / med / peak_flops, "peak_memory_bytes": peak_memory_bytes(dev),
            "baseline_memory_bytes": base_rss if dev.type == "cpu" else 0}


def _start(spec: dict) -> tuple[torch.device, int, str]:
    """(device, this process's RSS before the model, precision), peaks reset and the RNG seeded."""
    dev = pick_device(spec.get("device", "auto"))
    base_rss = peak_rss_bytes() if dev.type == "cpu" else 0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    torch.manual_seed(0)
    return dev, base_rss, "bf16" if default_dtype(dev) == torch.bfloat16 else "fp32"


def _training_step(model, step_fn, batch: dict):
    """One optimizer step of the method's own step function on a fixed batch (AdamW, as training)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)

    def step():
        loss, _, _ = step_fn(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def run_workload(spec: dict) -> dict:
    """One workload, in this process. spec: workload, shape | model, batch, seq, steps, warmup,
    device, peak_flops, and per workload: strategy (dpo: precompute|adapter|copy), new_tokens."""
    dev, base_rss, precision = _start(spec)
    name, b, seq = spec["workload"], spec["batch"], spec["seq"]
    steps, warmup = spec.get("steps", 5), spec.get("warmup", 2)
    chunk_mb, autocast = spec.get("logits_chunk_mb", 128.0), autocast_for(precision, dev)
    method = METHODS.get(name)  # dpo, sft, reward: a training step of that method; ppo: the trainer; generate
    if method is not None and method.trainer == "rl":  # the trainer builds its own models from a folder
        return {"workload": name, "shape": spec.get("model") or spec.get("shape"), "batch": b, "seq": seq,
                "precision": precision, "baseline_memory_bytes": base_rss if dev.type == "cpu" else 0,
                **ppo_workload(spec, precision, spec["peak_flops"], lambda: peak_memory_bytes(dev))}
    strategy = spec.get("strategy", "precompute")
    scalar = method is not None and method.inputs == "scores"
    referenced = method is not None and method.reference  # the workload times its reference strategy
    model = build(spec.get("shape", "tiny"), spec.get("model"), dev, scalar=scalar)
    vocab = model.config.vocab_size
    lora = referenced and strategy == "adapter"
    copies, reference, ref_tokens = 1, None, 0
    if referenced and strategy == "copy":
        reference, copies = CopyReference(model, autocast, chunk_mb), 2
    if lora:
        model = add_lora(model)
        reference = AdapterReference(model, autocast, chunk_mb)
    n = matmul_params(model)
    out: dict = {"workload": name, "shape": spec.get("model") or spec.get("shape"), "params_matmul": n,
                 "params_total": sum(p.numel() for p in model.parameters()), "batch": b, "seq": seq,
                 "precision": precision, "model_copies": copies}
    if method is None:  # generate
        return {**out, **_generate(model, spec, dev, autocast)}

    slots = 2 if method.paired else 1
    examples = synthetic_examples(vocab, b, seq, slots)
    # the method's own config at its defaults: the step and the layout are the trainer's own (train/offline.py)
    cfg = METHODS[name].config(model="-", data="-", output="-", precision=precision, logits_chunk_mb=chunk_mb,
                               max_length=max(seq, 2))
    layout = choose_layout(cfg, model, method)
    collate_fn = {"shared_prompt": collate_shared_prompt, "prompt_once": collate_prompt_once}.get(layout, collate)
    batch = collate_fn(examples, list(range(b)), pad_id=0)
    batch = {k: v.to(dev) for k, v in batch.items()}
    if referenced and strategy == "precompute":
        reference = PrecomputedReference(torch.randn(b, 2) - 50)
    # what the model really computes (shared-prompt and prompt-once rows: fewer positions than padded rows)
    positions = int(batch["input_ids"].numel()) + (int(batch["prompt_ids"].numel()) if "prompt_ids" in batch else 0)
    if reference is not None and strategy != "precompute":
        ref_tokens = positions  # the reference forward computes the same positions
    step = _training_step(model, make_step(forward_of(model, cfg), cfg, reference, autocast), batch)
    real = int(batch["tokens"]) if "tokens" in batch else int(batch["attention_mask"].sum())
    scored = int(batch["lengths"].sum())  # the head runs here only
    head, train = head_params(model), "lora" if lora else "full"
    flops = (step_flops(n - head, positions, train=train, reference_tokens=ref_tokens)
             + step_flops(head, scored, train=train, reference_tokens=scored if ref_tokens else 0))
    times = _time(step, steps, warmup, dev)
    out.update(_summary(times, real, flops, spec["peak_flops"], dev, base_rss))
    out.update({"strategy": strategy if referenced else None, "layout": layout, "positions_per_step": positions,
                "scored_per_step": scored})
    return out


def _is_mamba(model) -> bool:
    return getattr(model.config, "model_type", "") == "mamba"


def _generate(model, spec: dict, dev: torch.device, autocast) -> dict:
    """Prefill and decode tokens/s at several batch sizes, with the KV cache (greedy, fixed length)."""
    model.eval()
    vocab, prompt, new = model.config.vocab_size, spec["seq"], spec.get("new_tokens", 32)
    res = {}
    for bs in spec.get("batch_sizes", [1, 8]):
        ids = torch.randint(1, vocab, (bs, prompt), device=dev)
        with torch.no_grad(), autocast():
            def prefill(ids=ids):
                return model(input_ids=ids, use_cache=True)

            pre = _time(prefill, spec.get("steps", 5), spec.get("warmup", 2), dev)
            out = prefill()
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            sync(dev)
            t0 = time.perf_counter()
            for i in range(new):
                kw = {"cache_position": torch.tensor([prompt + i], device=dev)} if _is_mamba(model) else {}
                o = model(input_ids=nxt, past_key_values=past, use_cache=True, **kw)
                past, nxt = o.past_key_values, o.logits[:, -1:].argmax(-1)
            sync(dev)
            decode = time.perf_counter() - t0
        res[f"batch_{bs}"] = {"prefill_tokens_per_s": bs * prompt / statistics.median(pre),
                              "decode_tokens_per_s": bs * new / decode}
    n = matmul_params(model)
    top = res[f"batch_{spec.get('batch_sizes', [1, 8])[-1]}"]
    return {"by_batch": res, "tokens_per_s": top["decode_tokens_per_s"], "step_seconds_median": None,
            "mfu": 2 * n * top["prefill_tokens_per_s"] / spec["peak_flops"], "mfu_of": "prefill",
            "peak_memory_bytes": peak_memory_bytes(dev)}


def run_isolated(spec: dict) -> dict:
    """Run one workload in a fresh Python process (its own peak memory) and return its result."""
    # the user's environment as it is: a Hub id in the spec resolves as in any command (docs/hub.md)
    proc = subprocess.run([sys.executable, "-m", "prefalign.bench.workloads", json.dumps(spec)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"workload {spec['workload']} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(run_workload(json.loads(sys.argv[1]))))
