"""`prefalign plan`: how much memory a training config needs, term by term, and which settings fit.

This module reads what the formulas in bench/plan.py need: the model's config.json (and its safetensors
headers, to cross-check the parameter count without loading a weight), the typed train config (the
same validation `prefalign train` runs), the number of examples (for the reference strategy), and it
measures the one constant that formulas cannot give, the process's runtime:

  CPU: the peak RSS of a fresh `prefalign train` process that trains a minuscule model (1 layer, 8 wide)
    with the config's tokenizer for 2 steps: the interpreter, torch, transformers, peft, TensorBoard,
    the tokenizer, the thread pools and the kernels a training step touches, without the planned
    model's weights or activations (the minuscule model's own are a few MB and are left in). It is
    measured on this machine each time (about 10 s), never fitted to the validation runs;
    `runtime_mb` skips it.
  GPU: the allocator's peak (what `run.json` reports) excludes the CUDA context, so the runtime is 0 in
    that peak; whether it fits adds the context, measured as the device's used memory after a fresh
    process initialised CUDA and ran one matmul (CUDA_CONTEXT_BYTES, stated as assumed, when planning
    for a GPU from a machine without one).

Row shapes are the worst case the config allows: every sequence at max_length with a prompt of
max_prompt_length (rows are padded to the batch's longest, so one long example gives this shape).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import torch

from ..data import ReadOptions, load_records
from ..errors import ConfigError, ModelError
from ..models.hub import adapter_base, resolve_model
from ..runtime.device import gpu_available, pick_device
from ..runtime.distributed import World
from ..train.config import OfflineConfig, RunConfig
from ..train.kl_monitor import auto_every
from ..train.methods import METHODS, train_config
from ..train.offline import check_world, choose_layout, choose_reference
from .plan import PROJECTIONS, Arch, Setup, estimate, param_count

LLAMA_FAMILY = frozenset({"llama", "mistral", "qwen2"})  # the layer bench/plan.py models
PYTHON_TOKEN_BYTES = 36  # a token id in a Python list: an 8-byte pointer and a 28-byte int object
CUDA_CONTEXT_BYTES = 2**30  # assumed when planning for a GPU from a machine without one
_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "U8": 1, "I8": 1, "BOOL": 1}


def model_config(path: str) -> tuple[dict[str, Any], Path]:
    """config.json of a model folder, or of an adapter folder's base: (config, the folder holding it)."""
    folder = resolve_model(path, tokenizer_only=True)  # a Hub id: its configs and tokenizer, no weights
    if folder.suffix == ".gguf":
        raise ConfigError(f"{path}: plan reads a HF folder's config.json; convert the GGUF first "
                          "(prefalign convert FILE -o DIR)")
    if (base := adapter_base(folder)) is not None:
        folder = resolve_model(base, tokenizer_only=True)
    if not (folder / "config.json").exists():
        raise ModelError(f"{folder}: no config.json (not a model folder, nor a Hub id org/name)")
    return json.loads((folder / "config.json").read_text()), folder


def arch_from_config(c: dict[str, Any]) -> Arch:
    """The Llama-family shape from config.json; other architectures are refused, not guessed."""
    kind = c.get("model_type", "?")
    if kind not in LLAMA_FAMILY:
        raise ConfigError(f"plan models Llama-family decoders ({', '.join(sorted(LLAMA_FAMILY))}); "
                          f"this model is {kind}")
    heads = c["num_attention_heads"]
    return Arch(vocab=c["vocab_size"], hidden=c["hidden_size"], layers=c["num_hidden_layers"], heads=heads,
                kv_heads=c.get("num_key_value_heads") or heads,
                head_dim=c.get("head_dim") or c["hidden_size"] // heads, intermediate=c["intermediate_size"],
                tied=bool(c.get("tie_word_embeddings", False)), qkv_bias=kind == "qwen2"
                or bool(c.get("attention_bias")), o_bias=bool(c.get("attention_bias")),
                mlp_bias=bool(c.get("mlp_bias")))


def safetensors_params(folder: Path) -> dict[str, int] | None:
    """Parameters and bytes stored in the folder's safetensors files, from their headers alone (an
    8-byte length, then JSON of every tensor's dtype and shape): the count the formulas must match."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    params = nbytes = 0
    for f in files:
        with open(f, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        for name, t in header.items():
            if name == "__metadata__":
                continue
            n = 1
            for d in t["shape"]:
                n *= d
            params += n
            nbytes += n * _DTYPE_BYTES.get(t["dtype"], 4)
    return {"params": params, "bytes": nbytes}


def count_examples(path: str, fmt: str) -> int | None:
    """Records in the data: the lines of a JSONL file (cheap, no parsing), else the parsed records; None
    when the file is not there yet (the reference is then planned as if the run visits fewer examples)."""
    p = Path(path)
    if not p.exists():
        return None
    if p.name.endswith((".jsonl", ".jsonl.gz")):
        with (gzip.open(p, "rt", encoding="utf-8") if p.suffix == ".gz" else open(p, encoding="utf-8")) as f:
            return sum(1 for line in f if line.strip())
    return len(load_records(p, ReadOptions(format=fmt))[0])


def parse_size(text: str) -> int:
    """'24GB' (10^9), '24GiB' (2^30), '512MB', '512MiB', or a bare number of GB; more than zero."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([KMGT]i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ConfigError(f"--device-memory {text!r}: give a size such as 24GB or 80GiB")
    unit = (m.group(2) or "GB").upper()
    scale = {"K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    size = int(float(m.group(1)) * (1024 if "I" in unit else 1000) ** scale)
    if size <= 0:  # 0 must not fall back to "this device's memory" silently
        raise ConfigError(f"--device-memory {text!r}: give a size above zero, or leave it out for this device's")
    return size


# where each projection sits in a Llama-family layer: PEFT matches a target_modules name against the
# module's full name ("model.layers.3.self_attn.q_proj"), equal to it or a dot-separated suffix of it
_PROJECTION_PATHS = {p: f"model.layers.0.{'self_attn' if p in PROJECTIONS[:4] else 'mlp'}.{p}" for p in PROJECTIONS}


def lora_projections(targets: list[str] | str | None) -> tuple[str, ...]:
    """The projections LoRA adapts, as PEFT resolves target_modules (a list: exact name or suffix after a
    dot; a string: a regex the full name must match; None: models/load.py's default, all seven). A name
    that adapts anything else (lm_head, embed_tokens) is not modelled and is refused, not dropped."""
    if targets is None or str(targets).lower() in ("all-linear", "['all-linear']"):
        return PROJECTIONS  # every Linear but the output head
    if isinstance(targets, str):
        found = tuple(p for p, full in _PROJECTION_PATHS.items() if re.fullmatch(targets, full))
        if not found:
            raise ConfigError(f"lora.target_modules {targets!r} matches none of a Llama layer's projections")
        return found
    found = []
    for t in targets:
        hit = [p for p, full in _PROJECTION_PATHS.items() if full == t or full.endswith("." + t)]
        if not hit:
            raise ConfigError(f"lora.target_modules: plan models adapters on a layer's projections "
                              f"({', '.join(PROJECTIONS)}), not {t!r}")
        found += [p for p in hit if p not in found]
    return tuple(p for p in PROJECTIONS if p in found)


def row_shape(cfg: OfflineConfig, layout: str, slots: int, batch: int) -> dict[str, int]:
    """The worst-case micro-batch: every sequence at max_length, its prompt at max_prompt_length (kept to
    leave one answer token), so each answer has C = max_length - P tokens, all scored.
      padded, packed: slots x B rows of max_length (packing cannot put two full-length sequences in one row);
      shared-prompt: B rows of P + 2C, the prompt once and both answers after it."""
    prompt = min(cfg.max_prompt_length, cfg.max_length - 1)
    answer = cfg.max_length - prompt
    if layout == "shared_prompt":
        rows, length = batch, prompt + 2 * answer
    else:
        rows, length = slots * batch, cfg.max_length
    return {"rows": rows, "row_len": length, "scored": slots * batch * answer, "prompt": prompt}


def _weights_and_compute(cfg: RunConfig, device_type: str) -> tuple[float, bool, int]:
    """(bytes per base weight, bf16 autocast on?, activation bytes), as runtime/precision.py decides
    them, for a GPU assumed to have bf16 (Ampere and later) when planning for one."""
    bf16_device = device_type in ("cuda", "xpu")
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = "bf16" if cfg.lora and bf16_device else "fp32"
    base = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0}[dtype]
    autocast = cfg.precision == "bf16" or (cfg.precision == "auto" and device_type == "cuda")
    return base, autocast, 2 if autocast or base == 2 else 4


# why each attention kernel but SDPA is refused: its saved tensors differ from bench/plan.py's layer
_UNMODELLED_ATTENTION = {
    "eager": "eager attention saves the B x heads x T x T probabilities (and their dropout input) in every layer",
    "flex_attention": "flex attention builds a block mask, not the dense T x T mask plan counts",
    "flash_attention_2": "flash attention computes padded rows without a mask and saves its own statistics",
}


def _refuse_unmodelled(cfg: OfflineConfig) -> None:
    """Settings whose saved tensors bench/plan.py does not count: refused with the reason, not guessed."""
    why = _UNMODELLED_ATTENTION.get(cfg.attn_implementation)
    if why:
        raise ConfigError(f"attn_implementation: {cfg.attn_implementation}: plan models SDPA (auto or sdpa); {why}")
    if cfg.lora_settings and cfg.lora_settings.get("lora_dropout", 0.0) > 0:
        raise ConfigError("lora.lora_dropout > 0: plan does not model it (each adapter then keeps a dropped copy "
                          "of its input and the dropout mask); plan with lora_dropout: 0")


def setup_for(cfg: OfflineConfig, arch: Arch, model_json: dict, *, device_type: str, gpus: int, strategy: str,
              runtime: int, examples: int | None) -> tuple[Setup, dict[str, Any]]:
    """The Setup of one config on one device, and the facts it was built from (layout, reference, shape)."""
    method = METHODS[cfg.method]
    if method.trainer != "offline":
        raise ConfigError(f"plan covers offline methods (DPO family, SFT, reward); {cfg.method} is an RL method")
    _refuse_unmodelled(cfg)
    # what choose_layout reads of a model; attention is SDPA, the only kernel modelled (_refuse_unmodelled)
    model = SimpleNamespace(config=SimpleNamespace(**{**model_json, "_attn_implementation": "sdpa"}))
    layout = choose_layout(cfg, model, method)
    # unknown data size: plan the on-the-fly reference, which holds at least as much as a precomputed one
    # World(0, N): the reference the trainer picks on N processes (under fsdp: precompute)
    reference = choose_reference(cfg, method, examples if examples is not None else 2**62, World(0, gpus))
    slots = 1 if method.unit == "completions" else 2
    batch = cfg.batch_size // gpus  # the global micro-batch, split evenly (check_world: it divides)
    shape = row_shape(cfg, layout, slots, batch)
    base, autocast, act = _weights_and_compute(cfg, device_type)
    lora = cfg.lora_settings
    watch = method.inputs == "logps" and auto_every(cfg.kl_every, cfg.max_steps, cfg.kl_budget) > 0
    # train/offline.py `_watch`: a full fine-tune without a reference copy holds one for the KL monitor, when asked
    monitor = watch and reference != "copy" and lora is None and (cfg.kl_every is not None or cfg.kl_budget is not None)
    setup = Setup(
        rows=shape["rows"], row_len=shape["row_len"], scored=shape["scored"] if method.inputs == "logps" else 0,
        # transformers (masking_utils._ignore_causal_mask_sdpa) passes SDPA no mask when no row is padded;
        # one shorter row makes it a dense (rows, 1, T, T) mask: the worst case, assumed here (see _notes)
        mask=True, lora_r=lora["r"] if lora else None,
        lora_targets=lora_projections(lora.get("target_modules")) if lora else PROJECTIONS,
        base_bytes=base, quantized=cfg.quantize_4bit, act_bytes=act, autocast=autocast,
        checkpointing=cfg.gradient_checkpointing, logits_chunk_mb=cfg.logits_chunk_mb, reference=reference,
        examples=examples or 0, slots=slots, grad_accum=cfg.grad_accum, monitor_copy=monitor,
        scores=method.inputs == "scores", foreach=device_type == "cuda", gpus=gpus, strategy=strategy,
        runtime=runtime,
        host_data=(examples or 0) * slots * cfg.max_length * PYTHON_TOKEN_BYTES if device_type == "cpu" else 0)
    return setup, {"layout": layout, "reference": reference, "examples": examples, "per_device_batch": batch,
                   **shape}


def describe(cfg: RunConfig, setup: Setup, device_type: str) -> str:
    """'full fp32 + gradient checkpointing', 'LoRA r=8 bf16', 'QLoRA NF4 + selective checkpointing'."""
    weights = {4.0: "fp32", 2.0: "bf16"}[setup.base_bytes]
    kind = "QLoRA NF4" if setup.quantized else f"LoRA r={setup.lora_r} {weights}" if setup.lora_r else f"full {weights}"
    if setup.autocast and setup.base_bytes == 4:
        kind += " + bf16 autocast"
    if setup.checkpointing:
        kind += " + " + ("selective checkpointing" if setup.checkpointing == "selective" else "gradient checkpointing")
    if setup.gpus > 1:
        kind += f", {setup.strategy.upper()} over {setup.gpus} {'processes' if device_type == 'cpu' else 'GPUs'}"
    return kind


_PROBE = """
import json, sys, tempfile
from pathlib import Path
from prefalign.models.load import load_tokenizer_for
from prefalign.models.tiny import save_tiny
from prefalign.train.methods import make_config
from prefalign.train.run import train
model, threads, mmap_mb, device = sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
with tempfile.TemporaryDirectory() as work:
    work = Path(work)
    tok = load_tokenizer_for(model)
    save_tiny(work / "m", "llama", tok, hidden=8, layers=1, heads=2)
    pair = {"prompt": "The film opened", "chosen": " with a fine scene.", "rejected": " badly."}
    (work / "d.jsonl").write_text((json.dumps(pair) + "\\n") * 2)
    cfg = make_config(method="dpo", model=str(work / "m"), data=str(work / "d.jsonl"), output=str(work / "run"),
                      max_steps=2, batch_size=1, kl_every=0, threads=threads, malloc_mmap_threshold_mb=mmap_mb,
                      device=device)
    train(cfg, log=lambda m: None, progress=False)
    print("RUNTIME", json.loads((work / "run" / "run.json").read_text())["peak_memory_bytes"])
"""


def measure_runtime(cfg: RunConfig, device_type: str) -> tuple[int, str]:
    """(bytes, how they were obtained): the module docstring says why each is what it is."""
    if device_type == "cuda":
        if not gpu_available():
            return CUDA_CONTEXT_BYTES, "assumed CUDA context (no GPU on this machine to measure)"
        code = ("import torch; x = torch.ones(256, 256, device='cuda'); (x @ x).sum().item(); "
                "free, total = torch.cuda.mem_get_info(); print('RUNTIME', total - free)")
        how = "device memory in use after a fresh process initialised CUDA and ran a matmul"
    else:
        code = _PROBE
        how = "peak RSS of a fresh 2-step training process on a 1-layer, 8-wide model with this tokenizer"
    mmap_mb = getattr(cfg, "malloc_mmap_threshold_mb", 0.0)
    # offline: model_config already fetched the tokenizer files a Hub id needs; the probe reads the cache
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # the probe trains on the device planned for: on a GPU machine planning for cpu, not on the GPU
    proc = subprocess.run([sys.executable, "-c", code, cfg.model, json.dumps(cfg.threads), str(mmap_mb), device_type],
                          capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RUNTIME ")), None)
    if line is None:
        raise ModelError(f"measuring the runtime failed: {proc.stderr.strip()[-2000:]}")
    return int(line.split()[1]), how


def alternatives(cfg: OfflineConfig, device_type: str) -> list[dict[str, Any]]:
    """The settings a user weighs against each other: full fine-tune and LoRA, each without and with
    gradient checkpointing, and QLoRA with checkpointing where it runs (CUDA)."""
    # a LoRA settings object as plain data: the overrides are part of the JSON result
    lora = cfg.lora.model_dump() if hasattr(cfg.lora, "model_dump") else cfg.lora or True
    full = {"lora": False, "quantize_4bit": False, "dtype": "auto" if cfg.dtype in ("bf16", "fp16") else cfg.dtype}
    out = [{**full, "gradient_checkpointing": False}, {**full, "gradient_checkpointing": True},
           {"lora": lora, "quantize_4bit": False, "gradient_checkpointing": False},
           {"lora": lora, "quantize_4bit": False, "gradient_checkpointing": True}]
    if device_type == "cuda":
        out.append({"lora": lora, "quantize_4bit": True, "gradient_checkpointing": True})
    return out


def _variant(cfg: OfflineConfig, update: dict[str, Any]) -> OfflineConfig:
    data = cfg.model_dump()
    data.update(update)
    return train_config(data, "plan")


def _device_memory(device_type: str) -> int:
    if device_type == "cuda":
        if not gpu_available():
            raise ConfigError("planning for a GPU on a machine without one: give --device-memory (e.g. 24GB)")
        return torch.cuda.get_device_properties(0).total_memory
    return psutil.virtual_memory().total


def _for_world(cfg: OfflineConfig, gpus: int, strategy: str | None) -> OfflineConfig:
    """The config as N processes run it: --strategy overrides `distributed`, and what training refuses on N
    processes (check_world: a batch_size that does not divide, ...) is refused here with the same error."""
    if gpus < 1 or strategy not in (None, "ddp", "fsdp"):
        raise ConfigError("--gpus must be >= 1 and --strategy ddp or fsdp")
    if strategy and strategy != cfg.distributed:
        cfg = _variant(cfg, {"distributed": strategy})
    if gpus > 1 and cfg.distributed == "deepspeed":
        # ZeRO holds an fp32 master partition beside the weights and reduces in buckets of its own size:
        # terms not in the model below, and never measured here against a run's peak
        raise ConfigError(f"plan does not model DeepSpeed ZeRO-{cfg.zero_stage}: plan with --strategy fsdp (ZeRO-3 "
                          "shards weights, gradients and AdamW state as FSDP2 does, without its fp32 master copy) "
                          "or ddp (ZeRO-2 keeps every weight on every GPU) for a bound")
    check_world(cfg, World(0, gpus))
    if gpus > 1 and cfg.distributed == "fsdp" and cfg.fsdp_cpu_offload:
        raise ConfigError("fsdp_cpu_offload: plan does not model it (the shards and optimizer state move to CPU "
                          "memory, gathered units and activations stay on the GPU); plan without it")
    return cfg


def _plan_rows(cfg: OfflineConfig, arch: Arch, model_json: dict, device_type: str, gpus: int, memory: int,
               runtime: int, examples: int | None) -> list[dict[str, Any]]:
    """One row per setting: the config as given, then each alternative N processes can run."""
    rows = []
    for update in [{}] + alternatives(cfg, device_type):
        variant = _variant(cfg, update) if update else cfg
        try:
            check_world(variant, World(0, gpus))
        except ConfigError:
            continue  # an alternative training would refuse on N processes (QLoRA under fsdp)
        setup, facts = setup_for(variant, arch, model_json, device_type=device_type, gpus=gpus,
                                 strategy=variant.distributed, runtime=runtime, examples=examples)
        b = estimate(arch, setup)
        if facts["layout"] == "padded":  # the mask's share: what the same run costs when no row is padded
            facts["peak_unpadded"] = estimate(arch, replace(setup, mask=False)).peak
        label = describe(variant, setup, device_type)
        if update and any(r["label"] == label for r in rows):
            continue  # an alternative that is the config as given
        # on CPU the N processes share one machine's RAM: N x the per-process peak must fit it
        machine = b.peak * (gpus if device_type == "cpu" else 1)
        rows.append({"label": label, "as_given": not update, "overrides": update, "fits": machine <= memory,
                     "needs": machine, "facts": facts, **b.to_json()})
    return rows


def plan(cfg: RunConfig, *, device: str | None = None, device_memory: int | None = None, gpus: int = 1,
         strategy: str | None = None, runtime: int | None = None) -> dict[str, Any]:
    """The Python API of `prefalign plan`: the config's breakdown, its alternatives, and what fits in
    `device_memory` (default: this device's memory, GPU total or CPU RAM). `strategy` defaults to the
    config's `distributed`. JSON-ready; bytes throughout."""
    if not isinstance(cfg, OfflineConfig):
        raise ConfigError(f"plan covers offline methods (DPO family, SFT, reward); {cfg.method} is an RL method")
    cfg = _for_world(cfg, gpus, strategy)
    device_type = device or pick_device(cfg.device).type
    if device_type not in ("cpu", "cuda"):
        raise ConfigError(f"plan models cpu and cuda devices, not {device_type}")
    model_json, folder = model_config(cfg.model)
    arch = arch_from_config(model_json)
    memory = device_memory or _device_memory(device_type)
    how = "given"
    if runtime is None:
        runtime, how = measure_runtime(cfg, device_type)
    rows = _plan_rows(cfg, arch, model_json, device_type, gpus, memory, runtime,
                      count_examples(cfg.data, cfg.format))
    stored = safetensors_params(folder)
    return {"model": str(folder), "method": cfg.method, "device": device_type, "gpus": gpus,
            "strategy": cfg.distributed if gpus > 1 else None, "device_memory": memory, "runtime_how": how,
            "arch": vars(arch), "stored": stored, "plans": rows,
            "notes": _notes(cfg, device_type, arch, stored) + _mask_note(rows[0])}


def _mask_note(given: dict[str, Any]) -> list[str]:
    """Padded rows' mask is the one term that depends on the data, not the config: say how much it is."""
    if "peak_unpadded" not in given["facts"]:
        return []
    share = given["peak"] - given["facts"]["peak_unpadded"]
    return [f"padded rows: {_size(share)} of the peak is the attention mask (and K/V repeated for it), which "
            "transformers passes only when some row of a micro-batch is padded; if every sequence reaches "
            f"max_length there is none and the peak is {_size(given['facts']['peak_unpadded'])}"]


def _notes(cfg: RunConfig, device_type: str, arch: Arch, stored: dict | None) -> list[str]:
    notes = []
    counted = param_count(arch)["total"]
    if stored and stored["params"] != counted:
        notes.append(f"the safetensors files hold {stored['params']:,} parameters, the architecture "
                     f"{counted:,}: the weights terms use the architecture's count")
    if device_type == "cpu" and not 0 < getattr(cfg, "malloc_mmap_threshold_mb", 0) <= 1:
        # the figure is the committed measurement's (benchmarks/results/plan-validation-cpu-2core.md)
        notes.append("CPU: glibc's default heap keeps freed activation blocks resident as holes, so the process's "
                     "RSS runs above these live-memory figures: in 3-step validation runs the estimates fell up to "
                     "35% below RSS, and RSS grows with more steps; malloc_mmap_threshold_mb: 0.0625 returns "
                     "them (benchmarks/results/plan-validation-cpu-2core.md measures both)")
    notes.append("not counted: the KL monitor's sampling and the precompute pass (each smaller than a step "
                 "at these settings), the allocator's own slack")
    return notes


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f} GB"


def _size(x: float) -> str:
    return _gb(x) if x >= 1e9 else f"{x / 1e6:.1f} MB"


def format_plan(result: dict[str, Any]) -> str:
    """The breakdown of the config as given, then one verdict line per setting."""
    given = next(r for r in result["plans"] if r["as_given"])
    f = given["facts"]
    lines = [f"{result['model']}: {given['total_params']:,} parameters, {given['trainable_params']:,} trained; "
             f"{result['method']}, {f['layout'].replace('_', '-')} rows ({f['rows']} x {f['row_len']} tokens, "
             f"{f['scored']} scored), reference {f['reference'] or 'none'}, on {result['device']}",
             f"as given: {given['label']}"]
    for name, value in given["terms"].items():
        if value:
            lines.append(f"  {name:<28} {_size(value):>10}")
    lines.append(f"  {'peak (' + given['peak_phase'] + ')':<28} {_size(given['peak']):>10}")
    lines.append(f"runtime: {result['runtime_how']}")
    memory = _gb(result["device_memory"]).replace(".00", "")
    for r in result["plans"]:
        verdict = "fits" if r["fits"] else "does not fit"
        each = f" ({result['gpus']} x {_gb(r['peak'])})" if r["needs"] != r["peak"] else ""
        lines.append(f"{'*' if r['as_given'] else ' '} {r['label']} needs ~{_gb(r['needs'])}{each}: {verdict} {memory}")
    return "\n".join(lines + [f"note: {n}" for n in result["notes"]])
