"""Where a prefalign LoRA DPO step's memory goes: the tensors autograd keeps for backward, by kind,
and the process RSS step after step (sampled every 2 ms), for one batch of the TRL benchmark.

    python benchmarks/dpo_memory.py [--model smollm2] [--gc false|true|selective] [--mmap-mb 0] [--steps 3]

Saved tensors are counted once per storage (a view of a kept tensor costs nothing) and the frozen
weights they point at are left out (they are the model's own). Run it once per setting: RSS high
water marks cannot be reset inside a process.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def kind_of(module_path: list[str]) -> str:
    names = [n for n in module_path if not n.isdigit()]
    for key in ("lm_head", "act_fn", "mlp", "self_attn", "input_layernorm", "post_attention_layernorm"):
        if key in names:
            lora = "lora_A" in names or "lora_B" in names
            return f"{key}{' (LoRA input)' if lora else ''}"
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--gc", default="false")
    ap.add_argument("--mmap-mb", type=float, default=0.0)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "prefalign-bench"))
    a = ap.parse_args()
    from dpo_vs_trl import converted, make_pairs

    from prefalign.data import load_records
    from prefalign.data.batches import collate_shared_prompt, tokenize_records
    from prefalign.models.load import add_lora, enable_checkpointing, load_model, load_tokenizer
    from prefalign.models.logps import batch_logps
    from prefalign.runtime.memory import set_malloc_mmap_threshold

    set_malloc_mmap_threshold(a.mmap_mb)
    page, phase, peak = os.sysconf("SC_PAGE_SIZE"), ["load"], collections.defaultdict(int)

    def poll() -> None:
        while True:
            with open("/proc/self/statm") as f:
                peak[phase[0]] = max(peak[phase[0]], int(f.read().split()[1]) * page)
            time.sleep(0.002)

    threading.Thread(target=poll, daemon=True).start()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    path = converted(a.model, work) if a.model in ("smollm2", "gemma3") else Path(a.model)
    pairs = work / f"pairs-{path.name}.jsonl"
    make_pairs(path, pairs)
    gc = {"false": False, "true": True}.get(a.gc, a.gc)
    tok, model = load_tokenizer(path), load_model(path)
    enable_checkpointing(model, gc)
    model = add_lora(model, {"r": 8})
    if gc:
        model.enable_input_require_grads()
    model.train()
    records, _ = load_records(pairs)
    data = tokenize_records(tok, records, max_length=100000, max_prompt_length=100000, unit="pairs")
    batch = collate_shared_prompt(data.examples, list(range(len(data))), tok.pad_token_id)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    where: list[str] = []
    for name, module in model.named_modules():
        module.register_forward_pre_hook(lambda m, *_, n=name: where.append(n))
        module.register_forward_hook(lambda *_: where.pop() and None)  # a hook's return would replace the output
    kept: dict[int, int] = {}
    by_kind: collections.Counter = collections.Counter()

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in kept and key not in weights:
            kept[key] = t.untyped_storage().nbytes()
            by_kind[kind_of(where[-1].split(".") if where else [])] += kept[key]
        return t

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for step in range(a.steps):
        phase[0] = f"step {step + 1}"
        t0 = time.perf_counter()
        if step == 0:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                logps = batch_logps(model, batch)
        else:
            logps = batch_logps(model, batch)
        loss = -torch.nn.functional.logsigmoid(0.1 * (logps[:8] - logps[8:])).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    time.sleep(0.05)
    b, t = batch["input_ids"].shape
    print(json.dumps({
        "model": a.model, "gradient_checkpointing": gc, "malloc_mmap_threshold_mb": a.mmap_mb,
        "positions": f"{b} rows x {t} = {b * t}, {len(batch['pred_rows'])} scored",
        "saved_for_backward_MB": {k: round(v / 2**20) for k, v in by_kind.most_common()} if not gc else
        "inside checkpointed layers: not seen by saved-tensor hooks",
        "saved_total_MB": round(sum(kept.values()) / 2**20),
        "peak_rss_GB": {k: round(v / 1e9, 2) for k, v in peak.items()},
        "step_seconds": [round(x, 2) for x in times]}, indent=1))


if __name__ == "__main__":
    main()
