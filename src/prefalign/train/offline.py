"""Any offline preference method on the one loop: a loss from `losses/` plus what it needs."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from .. import faults
from ..config import dump_config
from ..data.batches import TokenizedData, collate, collate_packed, collate_prompt_once, collate_shared_prompt
from ..errors import ConfigError
from ..losses.preference import rpo_nll
from ..models.arch import block_mask_problem, model_type
from ..models.attention import attn_implementation_of, shared_prompt_problem
from ..models.load import (
    add_lora,
    enable_checkpointing,
    is_peft,
    load_model,
    load_tokenizer_for,
    save_model,
    weight_dtypes,
)
from ..models.prompt_once import ROUTES, UNSUPPORTED, not_faster, prompt_once_problem
from ..models.reference import AdapterReference, CopyReference, fingerprint, precompute
from ..models.scalar import load_scalar_model
from ..runtime.determinism import disable_dropout
from ..runtime.device import describe, set_up
from ..runtime.distributed import World, init_world, shut_down
from ..runtime.memory import doing, set_malloc_mmap_threshold
from ..runtime.precision import autocast_for, bf16_wanted, weights_dtype
from . import deepspeed
from .config import OfflineConfig, RunConfig
from .guards import build_guard
from .kl_monitor import auto_every, build_monitor
from .loop import LoopResult, Optimization, Update, batch_indices, mean_metrics, train_loop, write_summary
from .methods import METHODS, Method
from .noise import resolve_label_smoothing
from .parallel import Forward, accumulating, full_state, parallelize
from .sources import load_eval_sets, load_examples, monitor_prompts


def sharded_weights(cfg: RunConfig, world: World) -> str | None:
    """The strategy, when no process holds the whole model outside its forward (FSDP2, ZeRO-3)."""
    if world.active and (cfg.distributed == "fsdp" or (cfg.distributed == "deepspeed" and cfg.zero_stage == 3)):
        return "distributed: fsdp" if cfg.distributed == "fsdp" else "ZeRO-3 (distributed: deepspeed)"
    return None


def choose_reference(cfg: OfflineConfig, method: Method, n_examples: int, world: World = World()) -> str | None:
    if not method.reference:
        return None
    sharded = sharded_weights(cfg, world)
    if sharded and cfg.reference not in ("auto", "precompute"):
        # a sharded model is whole only inside its forward: the reference pass runs before sharding
        raise ConfigError(f"{sharded} takes reference: precompute (or auto), not {cfg.reference}")
    if cfg.reference != "auto":
        return cfg.reference
    if sharded:
        return "precompute"
    visits = cfg.max_steps * cfg.batch_size * cfg.grad_accum
    # Precomputing costs one reference forward per example; on the fly costs one per visit.
    if visits >= n_examples:
        return "precompute"
    return "adapter" if cfg.lora else "copy"


COLLATE = {"packed": collate_packed, "shared_prompt": collate_shared_prompt, "prompt_once": collate_prompt_once,
           "padded": collate}  # choose_layout's layouts


def choose_layout(cfg: OfflineConfig, model, method: Method) -> str:
    """"packed" (padding-free rows, asked for), "shared_prompt" (one row per pair), "prompt_once"
    (state-space models: the prompt once, both answers continued from its state) or "padded"."""
    return layout_and_reason(cfg, model, method)[0]


def layout_and_reason(cfg: OfflineConfig, model, method: Method) -> tuple[str, str | None]:
    """choose_layout's layout, and why a paired log-prob method got padded rows (None otherwise).
    Shared-prompt and packed rows need a model whose every layer honours the 4D mask: not Mamba, nor
    hybrids with Mamba layers (Jamba, Bamba, ...), whatever attention heads they have; those get
    prompt-once rows where models/prompt_once.py proves them exact: by default where they were also measured
    faster (FASTER), on `share_prompt: true` wherever exact. `share_prompt: false` forces padded rows."""
    problem = block_mask_problem(model, cfg.max_length)
    if cfg.packing:
        if problem or method.inputs != "logps":
            raise ConfigError(f"packing needs a log-prob method (not reward) and a mask-honouring model: "
                             f"{problem or cfg.method + ' scores sequences'}; use packing: false")
        return "packed", None
    if not (method.paired and method.inputs == "logps"):
        if cfg.share_prompt is True:
            raise ConfigError(f"share_prompt: true needs paired log-prob data: {cfg.method} is not a paired "
                              "log-prob method; use share_prompt: auto")
        return "padded", None
    if cfg.share_prompt is False:
        return "padded", "share_prompt: false"
    problem = problem or shared_prompt_problem(model)  # flash_attention_2 has no mask to share a prompt with
    if problem is None:
        return "shared_prompt", None
    once = prompt_once_problem(model)
    sharded = cfg.distributed == "fsdp" or (cfg.distributed == "deepspeed" and cfg.zero_stage == 3)
    if once is None and sharded and ROUTES.get(model_type(model)) == "layers":
        # FSDP2 and ZeRO-3 gather a block's weights in hooks on its call; the Mamba-1 route calls its parts
        once = f"distributed: {cfg.distributed} gathers weights in hooks on each layer's call, which the Mamba-1 " \
               "route bypasses"
    if once is None and cfg.share_prompt is True:
        return "prompt_once", None
    if cfg.share_prompt is True:
        raise ConfigError(f"share_prompt: true needs a model whose every layer honours the mask ({problem}) or "
                          f"prompt-once rows ({once}); use share_prompt: auto")
    if once is None:
        slower = not_faster(model)
        return ("padded", slower) if slower else ("prompt_once", None)
    ssm = model_type(model) in ROUTES or model_type(model) in UNSUPPORTED
    return "padded", f"prompt-once rows: {once}" if ssm else problem


def make_step(forward, cfg: OfflineConfig, reference, autocast: Callable, world: World = World()):
    """One micro-batch -> (mean loss, metrics, tokens) for the config's method (train/methods.py).
    `forward` (train/parallel.py) gives per-sequence log-probs or scores; with several processes
    each holds a share of the micro-batch, and what a loss takes over the whole batch (SFT's token
    count, KTO's KL reference point) is taken over every rank's share."""
    method = METHODS[cfg.method]
    rpo_alpha = getattr(cfg, "rpo_alpha", 0.0)  # paired methods only

    def step(batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float], int]:
        b = len(batch["index"])
        # real prompt + completion tokens of every sequence, whatever the layout computed
        tokens = int(batch["tokens"]) if "tokens" in batch else int(batch["attention_mask"].sum())
        if method.inputs == "scores":  # a reward model: one scalar per sequence
            with autocast():
                scores = forward(batch)  # (2B,)
            loss, metrics = method.compute(dict(chosen_scores=scores[:b], rejected_scores=scores[b:],
                                                margins=batch.get("margins")), cfg)
            return loss.mean(), {k: float(v.float().mean()) for k, v in metrics.items()}, tokens
        with autocast():
            logps = forward(batch)  # (slots * B,)
        lengths = batch["lengths"].clamp(min=1)
        ref = faults.poison("ref_logps", reference.logps(batch).float()) if reference is not None else None
        if method.unit == "completions":
            tensors = dict(policy_logps=logps, lengths=lengths,
                           mean_length=torch.tensor(world.ratio(lengths.sum(), len(lengths))))
        elif method.paired:
            tensors = dict(policy_chosen_logps=logps[:b], policy_rejected_logps=logps[b:],
                           chosen_lengths=lengths[:b], rejected_lengths=lengths[b:])
            if ref is not None:
                tensors.update(ref_chosen_logps=ref[:b], ref_rejected_logps=ref[b:])
        else:
            kl = world.ratio((logps[b:] - ref[b:]).detach().sum(), b)
            tensors = dict(policy_logps=logps[:b], ref_logps=ref[:b], labels=batch["labels"], kl=torch.tensor(kl))
        loss, metrics = method.compute(tensors, cfg)
        if rpo_alpha:
            nll = rpo_nll(logps[:b], lengths[:b])
            metrics["nll/chosen"] = nll.detach()
            loss = loss + rpo_alpha * nll
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


def start_run(cfg: RunConfig) -> tuple[Path, torch.device, Callable, World]:
    """The run folder with its resolved config.yaml, the device, the autocast context and the
    process group when a launcher started several processes; seeded."""
    set_malloc_mmap_threshold(cfg.malloc_mmap_threshold_mb)
    world, device = init_world(set_up(cfg))
    out = Path(cfg.output)
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out / "config.yaml")
    world.barrier()
    return out, device, autocast_for(cfg.precision, device), world


def run_offline(cfg: OfflineConfig, log: Callable[[str], None] = print, progress: bool = True) -> LoopResult:
    out, device, autocast, world = start_run(cfg)
    log = log if world.main else (lambda _: None)
    try:
        cfg, label_noise = resolve_label_smoothing(cfg, log)  # `auto`: eps from the data's own label noise
        return _run_offline(cfg, out, device, autocast, world, log, progress, label_noise)
    finally:
        shut_down(world)


def _run_offline(cfg: OfflineConfig, out: Path, device, autocast, world: World, log, progress, noise) -> LoopResult:
    method = METHODS[cfg.method]
    check_world(cfg, world)
    if world.active and cfg.distributed == "deepspeed":
        deepspeed.check_precision(bf16_wanted(cfg.precision, device), device)
    tokenizer = load_tokenizer_for(cfg.model, cfg.trust_remote_code, cfg.chat_template)
    model = _load(cfg, method, tokenizer, device)
    doing("while reading the data")
    data, uses = load_examples(cfg.data, "data", cfg, tokenizer, method.unit, out, "data", log, world)
    eval_sets = load_eval_sets(cfg, tokenizer, method.unit, out, log, world)  # {None: set} for a plain path
    strategy = choose_reference(cfg, method, len(data), world)
    reference = None
    if strategy == "copy":
        doing("while copying the model for the reference", reference_copy=True)  # OOM advice: train/oom.py
        reference = CopyReference(model, autocast, cfg.logits_chunk_mb)  # before LoRA and before any update
    watch, initial = _watch(cfg, method, strategy, model, log, world)
    if cfg.lora_settings is not None:
        model = add_lora(model, cfg.lora_settings, "SEQ_CLS" if method.inputs == "scores" else "CAUSAL_LM")
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()
    layout, why = layout_and_reason(cfg, model, method)
    collate_pad = partial(COLLATE[layout], pad_id=tokenizer.pad_token_id)
    make_batch = partial(lambda d, idx: collate_pad([d.examples[i] for i in idx], idx), data)
    # every reference pass happens before the model is wrapped (an FSDP2 model is only whole in its forward)
    if strategy == "adapter":
        reference = AdapterReference(model, autocast, cfg.logits_chunk_mb)
    elif strategy == "precompute":
        reference = _precompute(model, cfg, data, collate_pad, device, autocast, "ref_logps", log, world)
    eval_references = {name: reference for name in eval_sets}
    if strategy == "precompute":
        # eval examples have their own table, computed once with the model as it is now (untrained)
        eval_references = {name: _precompute(model, cfg, d, collate_pad, device, autocast, "ref_logps_eval" + (
            f"_{name}" if name else ""), lambda _: None, world) for name, d in eval_sets.items()}
    doing("while setting up training")
    log(f"method {cfg.method}, reference {strategy or 'none (reference-free)'}, "
        f"{'LoRA' if is_peft(model) else 'full fine-tune'}, device {describe(device)}, "
        f"{layout.replace('_', '-')} rows{f' ({why})' if why else ''}, attention {attn_implementation_of(model)}, "
        f"{weight_dtypes(model)}" + (f", {world.size} processes ({cfg.distributed})" if world.active else ""))
    monitor = None
    if watch:
        ref_model = reference.model if strategy == "copy" else initial if initial is not None else model
        ctx = model.disable_adapter if ref_model is model else nullcontext
        monitor = build_monitor(cfg, model, ref_model, ctx, tokenizer, partial(monitor_prompts, cfg), device, autocast,
                                log)
    opt = None
    if world.active and cfg.distributed == "deepspeed":  # the engine is built with its optimizer
        forward, opt = deepspeed.prepare(forward_of(model, cfg), model, cfg, world, log)
    else:
        forward = parallelize(forward_of(model, cfg), world, cfg.distributed, bf16_wanted(cfg.precision, device),
                              cfg.fsdp_cpu_offload, device)
    step_fn = make_step(forward, cfg, reference, autocast, world)
    eval_fn = None
    if eval_sets:
        steps = {name: make_step(forward, cfg, eval_references[name], autocast, world) for name in eval_sets}
        eval_fn = _evaluator(model, cfg, device, collate_pad, {name: (d, steps[name]) for name, d in eval_sets.items()})
    update = OfflineUpdate(cfg, make_batch, step_fn, len(data), device, world, forward)
    result = train_loop(cfg, model, update, device, eval_fn=eval_fn, monitor=monitor, log=log, progress=progress,
                        world=world, opt=opt, guard=build_guard(cfg, monitor, eval_fn, tokenizer, device, autocast,
                                                                log, world, method.paired))
    _finish(cfg, method, model, tokenizer, out, result, strategy, initial, world, log, uses, noise)
    return result


def _finish(cfg, method: Method, model, tokenizer, out: Path, result: LoopResult, strategy, initial, world: World,
            log, uses=(), label_noise=None) -> None:
    """final/ and run.json, written by rank 0 (under FSDP2 every rank first gathers its shards)."""
    lora, base = is_peft(model), cfg.model
    if method.inputs == "scores" and lora:
        # a reward model is a judge for later runs: one standalone folder, not an adapter
        model, base = model.merge_and_unload(), None
    state = None
    if world.active and cfg.distributed == "fsdp":
        state = full_state(model, keep=world.main, only_trainable=lora)
    elif world.active and cfg.distributed == "deepspeed":
        state = deepspeed.final_state(model, keep=world.main, only_trainable=lora)
    doing("while writing final/")
    if world.main:
        save_model(model, tokenizer, out / "final", base=base, state_dict=state)
        write_summary(out, result, method=cfg.method, reference=strategy, lora=lora,
                      model_copies=1 + (strategy == "copy") + (initial is not None), processes=world.size,
                      data_sources=[u.to_json() for u in uses],
                      **({"label_noise": label_noise} if label_noise else {}))
    world.barrier()
    log(f"saved {out / 'final'} ({result.steps} steps, {result.wall_seconds:.1f} s)")


def check_world(cfg: OfflineConfig, world: World) -> None:
    """What a multi-process run needs, checked before any work."""
    method = METHODS[cfg.method]
    if not world.active:
        return
    if cfg.batch_size % world.size:
        raise ConfigError(f"batch_size {cfg.batch_size} is the global micro-batch and must divide over the "
                          f"{world.size} processes (each takes batch_size / processes pairs)")
    deepspeed.check(cfg)
    if cfg.distributed != "ddp" and cfg.quantize_4bit:
        raise ConfigError(f"distributed: {cfg.distributed} does not shard 4-bit (QLoRA) weights here; use ddp")
    sharded = sharded_weights(cfg, world)
    if sharded and method.inputs == "scores" and cfg.lora:
        raise ConfigError(f"{sharded} cannot merge a sharded LoRA reward model into final/; use ddp")


def forward_of(model, cfg: OfflineConfig) -> Forward:
    return Forward(model, METHODS[cfg.method].inputs == "scores", cfg.logits_chunk_mb)


def _load(cfg: OfflineConfig, method: Method, tokenizer, device: torch.device):
    """The model to train: a scalar head for reward models, else the causal LM; dropout off."""
    doing("while loading the model")  # what an out-of-memory error names (train/run.py)
    faults.point("model.load")
    if method.inputs == "scores":
        model = load_scalar_model(cfg.model, pad_token_id=tokenizer.pad_token_id,
                                  trust_remote_code=cfg.trust_remote_code, device=device,
                                  attn_implementation=cfg.attn_implementation, training=True)
    else:
        model = load_model(cfg.model, trust_remote_code=cfg.trust_remote_code, device=device,
                           quantize_4bit=cfg.quantize_4bit, dtype=weights_dtype(cfg.dtype, device, bool(cfg.lora)),
                           attn_implementation=cfg.attn_implementation, training=True)
    disable_dropout(model)
    enable_checkpointing(model, cfg.gradient_checkpointing)
    return model


def _watch(cfg: OfflineConfig, method: Method, strategy: str | None, model, log,
           world: World = World()) -> tuple[bool, object]:
    """(KL monitor on?, a frozen copy of the initial model when the monitor needs one, else None).
    Several processes: rank 0 measures (the others would repeat it); under FSDP2 no rank holds the
    whole model to sample from, so the monitor is off."""
    watch = method.inputs == "logps" and auto_every(cfg.kl_every, cfg.max_steps, cfg.kl_budget) > 0
    sharded = sharded_weights(cfg, world)
    if watch and sharded:
        if cfg.kl_budget is not None:
            raise ConfigError(f"kl_budget needs the KL monitor, which {sharded} does not run; use ddp")
        log(f"KL monitor off: under {sharded} no process holds the whole model to sample from")
        return False, None
    watch = watch and world.main
    if not watch or strategy == "copy" or cfg.lora_settings is not None:
        return watch, None
    # a full fine-tune with no reference model in memory: the monitor needs the starting weights, a
    # second copy; held only when asked for (kl_every or kl_budget set), so costs stay honest
    if cfg.kl_every is None and cfg.kl_budget is None and not cfg.guard_every:
        log("KL monitor off: a full fine-tune without a reference copy would hold one for it "
            "(set kl_every to turn it on)")
        return False, None
    log("KL monitor: holding a frozen copy of the initial model (model_copies counts it)")
    return True, copy.deepcopy(model).requires_grad_(False).eval()


class OfflineUpdate(Update):
    """One optimizer step of an offline method: `grad_accum` micro-batches, each loss -> backward, then
    the clipped step. A non-finite loss skips the whole step."""

    def __init__(self, cfg: OfflineConfig, make_batch: Callable, step_fn: Callable, n_examples: int,
                 device: torch.device, world: World = World(), forward=None):
        self.cfg, self.make_batch, self.step_fn, self.n, self.device = cfg, make_batch, step_fn, n_examples, device
        self.world, self.forward = world, forward

    def micro_batch(self) -> list[int]:
        """This process's share of the next micro-batch: the micro-batches (and so the optimisation)
        are the same whatever the process count, and `position` means the same on resume."""
        idx = batch_indices(self.position, self.cfg.batch_size, self.n, self.cfg.seed)
        share = len(idx) // self.world.size
        return idx[self.world.rank * share:(self.world.rank + 1) * share]

    def __call__(self, step: int, opt: Optimization) -> tuple[dict[str, float], int]:
        items, tokens, finite = [], 0, True
        for i in range(self.cfg.grad_accum):
            batch = self.make_batch(self.micro_batch())
            self.position += 1
            # DDP: gradients reduced once a step, on its last micro-batch (DDP decides in the forward,
            # so the forward is inside too)
            with accumulating(self.forward, i < self.cfg.grad_accum - 1):
                loss, metrics, n_tok = self.step_fn({k: v.to(self.device) for k, v in batch.items()})
                loss = faults.poison("loss", loss)
                tokens += n_tok
                # every rank skips together: under DDP a rank without backward would leave the others waiting
                ok = self.world.all_true(bool(torch.isfinite(loss)))
                finite = finite and ok
                opt.backward(loss, self.cfg.grad_accum, ok)
            if ok:
                items.append({"loss": float(loss.detach()), **metrics})
        if finite:
            grad_norm = opt.apply(step)
        else:
            opt.skip(step, "non-finite loss; step skipped")
            grad_norm = float("nan")
        return {**mean_metrics(items), "grad_norm": grad_norm}, tokens


def in_order(data: TokenizedData, batch_size: int, collate_fn, device: torch.device):
    """Every example once, in file order: (indices, batch on the device)."""
    for i in range(0, len(data), batch_size):
        idx = list(range(i, min(i + batch_size, len(data))))
        yield idx, {k: v.to(device) for k, v in collate_fn([data.examples[j] for j in idx], idx).items()}


def _precompute(model, cfg, data, collate_fn, device, autocast, name: str, log, world: World = World()):
    """The reference table; several processes each take every world.size-th batch and share them."""
    doing("in the reference precompute")
    t0 = time.perf_counter()
    fp = fingerprint(model, data.examples, f"{cfg.precision}|{cfg.dtype}|{device.type}")
    batches = (batch for i, (_, batch) in enumerate(in_order(data, cfg.batch_size, collate_fn, device))
               if i % world.size == world.rank)
    world.barrier()  # every rank reads the cache before any writes it
    table = precompute(model, batches, len(data), len(data.examples[0].seqs), Path(cfg.output) / f"{name}.safetensors",
                       fp, autocast, cfg.logits_chunk_mb, log, gather=world.reduce,
                       write=world.main, agree=world.all_true)
    world.barrier()
    log(f"reference pass: {time.perf_counter() - t0:.1f} s")
    return table


def _evaluator(model, cfg, device, collate_fn, sets: dict[str | None, tuple[TokenizedData, Callable]]):
    """Mean metrics of the objective over each whole eval set (no gradient); every process runs it. A
    named set's metrics are `<name>/<metric>` (the loop logs eval/<name>/<metric>), a plain path's `<metric>`."""

    def mean_over(data: TokenizedData, step) -> dict[str, float]:
        rows, weights = [], []
        for idx, batch in in_order(data, cfg.batch_size, collate_fn, device):
            faults.point("eval")
            loss, metrics, _ = step(batch)
            rows.append({"loss": float(loss), **metrics})
            weights.append(len(idx))
        out = {}
        for k in rows[0]:
            pairs = [(r[k], w) for r, w in zip(rows, weights, strict=True) if k in r and not math.isnan(r[k])]
            out[k] = sum(v * w for v, w in pairs) / sum(w for _, w in pairs) if pairs else float("nan")
        return out

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        model.eval()
        return {(f"{name}/{k}" if name else k): v for name, (data, step) in sets.items()
                for k, v in mean_over(data, step).items()}

    return evaluate
