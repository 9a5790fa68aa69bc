"""Any offline preference method on the one loop: a loss from `losses/` plus what it needs."""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from ..config import dump_config
from ..data import ReadOptions, load_records
from ..data.batches import TokenizedData, collate, collate_packed, collate_shared_prompt, tokenize_records
from ..losses.preference import METHODS, Method, with_nll
from ..models.arch import block_mask_problem
from ..models.load import add_lora, enable_checkpointing, is_peft, load_model, load_tokenizer_for, save_model
from ..models.logprobs import batch_logps
from ..models.reference import AdapterReference, CopyReference, fingerprint, precompute
from ..models.scalar import load_scalar_model, sequence_scores
from ..runtime.determinism import disable_dropout
from ..runtime.device import pick_device
from ..runtime.memory import set_malloc_mmap_threshold
from ..runtime.precision import autocast_for
from .config import RunConfig, TrainConfig
from .kl_monitor import auto_every, build_monitor
from .loop import LoopResult, train_loop


def choose_reference(cfg: TrainConfig, method: Method, n_examples: int) -> str | None:
    if not method.needs_reference:
        return None
    if cfg.reference != "auto":
        return cfg.reference
    visits = cfg.max_steps * cfg.batch_size * cfg.grad_accum
    # Precomputing costs one reference forward per example; on the fly costs one per visit.
    if visits >= n_examples:
        return "precompute"
    return "adapter" if cfg.lora else "copy"


def _load_data(path: str, cfg: TrainConfig, tokenizer, method: Method, out: Path, name: str,
               log: Callable[[str], None]) -> TokenizedData:
    records, problems = load_records(path, ReadOptions(format=cfg.format))
    data = tokenize_records(tokenizer, records, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                            data=method.data)
    problems += data.problems
    if problems:
        bad = out / f"{name}_problems.jsonl"
        bad.write_text("".join(json.dumps(p.to_json(), ensure_ascii=False) + "\n" for p in problems))
        log(f"{path}: {len(problems)} bad records set aside (first: {problems[0]}); all listed in {bad}")
    if not data.examples:
        raise ValueError(f"{path}: no usable records")
    log(f"{path}: {len(data)} examples, {data.truncated} truncated to max_length={cfg.max_length}")
    data.problems = problems
    return data


def choose_layout(cfg: TrainConfig, model, method: Method) -> str:
    """"packed" (padding-free rows, asked for), "shared_prompt" (one row per pair) or "padded".
    Both row layouts need log-prob inputs and a model whose every layer honours the 4D mask: not
    Mamba, nor hybrids with Mamba layers (Jamba, Bamba, ...), whatever attention heads they have."""
    problem = block_mask_problem(model, cfg.max_length)
    if cfg.packing:
        if problem or method.inputs != "logps":
            raise ValueError(f"packing needs a log-prob method (not reward) and a mask-honouring model: "
                             f"{problem or cfg.method + ' scores sequences'}; use packing: false")
        return "packed"
    possible = method.paired and method.inputs == "logps" and problem is None
    if cfg.share_prompt is True and not possible:
        raise ValueError(f"share_prompt: true needs paired log-prob data and a mask-honouring model: "
                         f"{problem or cfg.method + ' is not a paired log-prob method'}; use share_prompt: auto")
    share = possible if cfg.share_prompt == "auto" else bool(cfg.share_prompt)
    return "shared_prompt" if share else "padded"


def make_step(model, method_name: str, cfg: TrainConfig, reference, autocast: Callable):
    method = METHODS[method_name]
    loss_fn = method.loss
    if cfg.rpo_alpha and method.paired:
        loss_fn = with_nll(loss_fn, cfg.rpo_alpha)
    hparams = dict(beta=cfg.beta, gamma=cfg.gamma, desirable_weight=cfg.desirable_weight,
                   undesirable_weight=cfg.undesirable_weight, margin_scale=cfg.margin_scale)
    if cfg.label_smoothing is not None:  # None: the method's own default (cdpo/robust: 0.1)
        hparams["label_smoothing"] = cfg.label_smoothing

    def step(batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float], int]:
        b = len(batch["index"])
        # real prompt + completion tokens of every sequence, whatever the layout computed
        tokens = int(batch["tokens"]) if "tokens" in batch else int(batch["attention_mask"].sum())
        if method.inputs == "scores":  # a reward model: one scalar per sequence
            with autocast():
                scores = sequence_scores(model, batch["input_ids"], batch["attention_mask"])  # (2B,)
            loss, metrics = loss_fn(chosen_scores=scores[:b], rejected_scores=scores[b:],
                                    margins=batch.get("margins"), **hparams)
            return loss.mean(), {k: float(v.float().mean()) for k, v in metrics.items()}, tokens
        with autocast():
            logps = batch_logps(model, batch, cfg.logits_chunk_mb)  # (slots * B,)
        lengths = batch["lengths"].clamp(min=1)
        ref = reference.logps(batch).float() if reference is not None else None
        if method.data == "completions":
            tensors = dict(policy_logps=logps, lengths=lengths)
        elif method.paired:
            tensors = dict(policy_chosen_logps=logps[:b], policy_rejected_logps=logps[b:],
                           chosen_lengths=lengths[:b], rejected_lengths=lengths[b:])
            if ref is not None:
                tensors.update(ref_chosen_logps=ref[:b], ref_rejected_logps=ref[b:])
        else:
            tensors = dict(policy_logps=logps[:b], ref_logps=ref[:b], labels=batch["labels"],
                           kl=(logps[b:] - ref[b:]).mean())
        loss, metrics = loss_fn(**tensors, **hparams)
        out = {k: float(torch.nanmean(v.float())) for k, v in metrics.items()}
        logps_d = logps.detach()
        answer = "chosen" if method.paired else "completion"  # SFT and KTO score completions, not pairs
        out[f"logps/{answer}"] = float(logps_d[:b].mean())
        if method.paired:
            out["logps/rejected"] = float(logps_d[b:].mean())
            # does the model itself rank chosen above rejected? (for the untrained model: the
            # reference's own preference accuracy, the baseline implicit rewards are compared to)
            out["logps/accuracy"] = float((logps_d[:b] > logps_d[b:]).float().mean())
        if ref is not None:
            # mean policy - reference log-ratio per token on the dataset's answers: not a KL (it goes
            # negative under DPO's likelihood displacement); the KL is the monitor's kl/policy_ref_*
            out[f"logratio/{answer}"] = float((logps[:b] - ref[:b]).detach().sum() / lengths[:b].sum())
            if method.paired:
                out["logratio/rejected"] = float((logps[b:] - ref[b:]).detach().sum() / lengths[b:].sum())
        return loss.mean(), out, tokens

    return step


def start_run(cfg: RunConfig) -> tuple[Path, torch.device, Callable]:
    """The run folder with its resolved config.yaml, the device, the autocast context; seeded."""
    set_malloc_mmap_threshold(cfg.malloc_mmap_threshold_mb)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    return out, device, autocast_for(cfg.precision, device)


def run_offline(cfg: TrainConfig, log: Callable[[str], None] = print, progress: bool = True) -> LoopResult:
    out, device, autocast = start_run(cfg)
    method = METHODS[cfg.method]

    tokenizer = load_tokenizer_for(cfg.model, cfg.trust_remote_code)
    if method.inputs == "scores":
        model = load_scalar_model(cfg.model, pad_token_id=tokenizer.pad_token_id,
                                  trust_remote_code=cfg.trust_remote_code, device=device)
    else:
        model = load_model(cfg.model, trust_remote_code=cfg.trust_remote_code, device=device,
                           quantize_4bit=cfg.quantize_4bit)
    disable_dropout(model)
    enable_checkpointing(model, cfg.gradient_checkpointing)
    data = _load_data(cfg.data, cfg, tokenizer, method, out, "data", log)
    eval_data = _load_data(cfg.eval_data, cfg, tokenizer, method, out, "eval_data", log) if cfg.eval_data else None

    strategy = choose_reference(cfg, method, len(data))
    reference = None
    if strategy == "copy":
        reference = CopyReference(model, autocast, cfg.logits_chunk_mb)  # before LoRA and before any update
    watch = method.inputs == "logps" and auto_every(cfg.kl_every, cfg.max_steps, cfg.kl_budget) > 0
    initial = None
    if watch and strategy != "copy" and cfg.lora_settings is None:
        # a full fine-tune with no reference model in memory: the monitor needs the starting weights,
        # a second copy; held only when asked for (kl_every or kl_budget set), so costs stay honest
        if cfg.kl_every is None and cfg.kl_budget is None:
            watch = False
            log("KL monitor off: a full fine-tune without a reference copy would hold one for it "
                "(set kl_every to turn it on)")
        else:
            initial = copy.deepcopy(model).requires_grad_(False).eval()
            log("KL monitor: holding a frozen copy of the initial model (model_copies counts it)")
    if cfg.lora_settings is not None:
        model = add_lora(model, cfg.lora_settings, "SEQ_CLS" if method.inputs == "scores" else "CAUSAL_LM")
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()
    pad = tokenizer.pad_token_id
    layout = choose_layout(cfg, model, method)
    collate_fn = {"packed": collate_packed, "shared_prompt": collate_shared_prompt, "padded": collate}[layout]
    collate_pad = partial(collate_fn, pad_id=pad)
    make_batch = partial(lambda d, idx: collate_pad([d.examples[i] for i in idx], idx), data)
    if strategy == "adapter":
        reference = AdapterReference(model, autocast, cfg.logits_chunk_mb)
    elif strategy == "precompute":
        t0 = time.perf_counter()
        reference = _precompute(model, cfg, data, collate_pad, device, autocast, "ref_logps", log)
        log(f"reference pass: {time.perf_counter() - t0:.1f} s")
    log(f"method {cfg.method}, reference {strategy or 'none (reference-free)'}, "
        f"{'LoRA' if is_peft(model) else 'full fine-tune'}, device {device.type}, "
        f"{layout.replace('_', '-')} rows")

    eval_fn = None
    if eval_data is not None:
        eval_fn = _evaluator(model, cfg, eval_data, strategy, autocast, device, collate_pad, reference)
    monitor = None
    if watch:
        ref_model = reference.model if strategy == "copy" else initial if initial is not None else model
        ctx = model.disable_adapter if ref_model is model else nullcontext
        monitor = build_monitor(cfg, model, ref_model, ctx, tokenizer, cfg.eval_data or cfg.data, device, autocast, log)
    step = make_step(model, cfg.method, cfg, reference, autocast)
    result = train_loop(cfg, model, len(data), make_batch, step, device, eval_fn=eval_fn, monitor=monitor, log=log,
                        progress=progress)
    if method.inputs == "scores" and is_peft(model):
        # a reward model is a judge for later runs: one standalone folder, not an adapter
        save_model(model.merge_and_unload(), tokenizer, out / "final")
    else:
        save_model(model, tokenizer, out / "final", base=cfg.model)
    summary = {"method": cfg.method, "reference": strategy, "lora": is_peft(model), "steps": result.steps,
               "stopped": result.stopped, "skipped_steps": result.skipped_steps,
               "wall_seconds": result.wall_seconds, "tokens": result.tokens,
               "tokens_per_s": result.tokens / result.wall_seconds if result.wall_seconds else None,
               "peak_memory_bytes": result.last.get("peak_memory_bytes"),
               "model_copies": 1 + (strategy == "copy") + (initial is not None), "final": result.last}
    (out / "run.json").write_text(json.dumps(summary, indent=2))
    log(f"saved {out / 'final'} ({result.steps} steps, {result.wall_seconds:.1f} s)")
    return result


def in_order(data: TokenizedData, batch_size: int, collate_fn, device: torch.device):
    """Every example once, in file order: (indices, batch on the device)."""
    for i in range(0, len(data), batch_size):
        idx = list(range(i, min(i + batch_size, len(data))))
        yield idx, {k: v.to(device) for k, v in collate_fn([data.examples[j] for j in idx], idx).items()}


def _precompute(model, cfg, data, collate_fn, device, autocast, name: str, log):
    fp = fingerprint(model, data.examples, f"{cfg.precision}|{device.type}")
    batches = (batch for _, batch in in_order(data, cfg.batch_size, collate_fn, device))
    return precompute(model, batches, len(data), len(data.examples[0].seqs), Path(cfg.output) / f"{name}.safetensors",
                      fp, autocast, cfg.logits_chunk_mb, log)


def _evaluator(model, cfg, eval_data, strategy, autocast, device, collate_fn, train_reference):
    """Mean metrics of the objective over the whole eval set (no gradient)."""
    reference = train_reference
    if strategy == "precompute":
        # eval examples have their own table, computed once with the model as it is now (untrained)
        reference = _precompute(model, cfg, eval_data, collate_fn, device, autocast, "ref_logps_eval", lambda _: None)
    step = make_step(model, cfg.method, cfg, reference, autocast)

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        model.eval()
        rows, weights = [], []
        for idx, batch in in_order(eval_data, cfg.batch_size, collate_fn, device):
            loss, metrics, _ = step(batch)
            rows.append({"loss": float(loss), **metrics})
            weights.append(len(idx))
        out = {}
        for k in rows[0]:
            pairs = [(r[k], w) for r, w in zip(rows, weights, strict=True) if k in r and not math.isnan(r[k])]
            out[k] = sum(v * w for v, w in pairs) / sum(w for _, w in pairs) if pairs else float("nan")
        return out

    return evaluate
