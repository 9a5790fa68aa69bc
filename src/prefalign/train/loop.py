"""The one training loop of every method, offline and RL: AdamW, warmup + schedule, clipping, atomic
checkpoints and exact resume, the NaN/Inf guard, the KL budget, metrics, TensorBoard and progress. A
method plugs in an `Update` (train/offline.py: micro-batches -> loss -> step; train/ppo.py: rollout ->
update); the loop knows nothing about methods.

Exact resume: the data order is a pure function of (seed, micro-batch position), and a checkpoint
(train/checkpoint.py) holds the trainable weights, optimizer, scheduler, torch RNG state and that
position; a run killed at any moment and resumed logs the same losses as one never interrupted.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor

from .. import faults
from ..errors import TrainingError
from ..runtime.device import cpu_model, describe
from ..runtime.distributed import World
from ..runtime.memory import doing, peak_memory_bytes
from ..storage import commit, disk_full, tmp_name, whole_append
from .checkpoint import WholeTensors, resume, save_checkpoint, sharded_format
from .config import RunConfig
from .guards import NoGuard
from .trackers import Trackers


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def batch_indices(position: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Indices of micro-batch number `position`: epochs of seeded permutations laid end to end."""
    out: list[int] = []
    start = position * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        take = min(batch_size - len(out), n - offset)
        out.extend(_epoch_order(n, seed, epoch)[offset:offset + take])
    return out


def lr_lambda(cfg: RunConfig) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        if cfg.lr_schedule == "linear":
            return max(0.0, 1 - progress)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


# ------------------------------------------------------------------ the loop


@dataclass
class LoopResult:
    steps: int
    stopped: str  # "max_steps", "max_seconds", "kl_budget", "guard"
    skipped_steps: int
    wall_seconds: float
    tokens: int
    last: dict[str, float] = field(default_factory=dict)
    device: str = ""  # where it ran (run.json's `device`): the costs are this hardware's
    guard: dict[str, Any] | None = None  # run.json's `guard` (train/guards.py), when guard_every is set
    chosen: dict[str, Any] | None = None  # the row of the step final/ holds, when a guard chose an earlier one


def mean_metrics(items: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for m in items for k in m}
    out = {}
    for k in sorted(keys):
        vals = [m[k] for m in items if k in m and not math.isnan(m[k])]
        if vals:
            out[k] = sum(vals) / len(vals)
    return out


def build_optimizer(cfg: RunConfig, model) -> tuple[list, torch.optim.Optimizer, Any]:
    """AdamW over the trainable parameters (no decay on biases and norms) and the LR schedule. A group
    with no parameters (a LoRA run has no 1-D trainable ones) is left out: DeepSpeed drops it, and the
    schedule and checkpoints must have the same groups under every strategy."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate)
    return params, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))


def _rows(path: Path, log: Callable[[str], None]) -> list[tuple[int, bytes, dict[str, Any] | None]]:
    """metrics.jsonl's lines: (byte offset, line, row or None). A line that does not parse (the last, cut
    short when a process died mid-write, or a full disk from an older prefalign) has None and is dropped
    with a note, never a failed resume."""
    rows, bad, offset = [], [], 0
    for i, line in enumerate(path.read_bytes().splitlines(keepends=True), 1):
        try:
            row = json.loads(line) if line.strip() else None
        except ValueError:
            bad.append(i)
            row = None
        rows.append((offset, line, row if isinstance(row, dict) else None))
        offset += len(line)
    if bad:
        log(f"note: {path}: dropped {len(bad)} line(s) that do not parse (line {bad[0]}: a write cut short)")
    return rows


def _cut_after(path: Path, step: int, log: Callable[[str], None]) -> tuple[dict[str, Any], int]:
    """metrics.jsonl without what was logged after checkpoint `step`, never rewritten in place (a kill or
    a full disk half-way would lose the rows before it too): steps only increase, so the rows kept are a
    prefix and the file is cut at the first one dropped (one truncate, atomic); a file where they are not
    (a cut line in the middle, from an older prefalign) is written whole under a temporary name and
    renamed. Returns (the last row kept, the last step the interrupted attempt logged)."""
    rows = _rows(path, log)
    keep = [r is not None and r.get("step", 0) <= step for _, _, r in rows]
    kept = [(line, r) for (_, line, r), k in zip(rows, keep, strict=True) if k]
    logged_until = max([r.get("step", 0) for _, _, r in rows if r is not None] + [step])
    first = keep.index(False) if False in keep else len(keep)
    faults.point("metrics.rewrite", path)
    if not any(keep[first:]):
        end = rows[first][0] if first < len(rows) else path.stat().st_size
        if end != path.stat().st_size:
            os.truncate(path, end)
        if kept and not kept[-1][0].endswith(b"\n"):  # a last row whole but for its newline
            with open(path, "ab") as f:
                f.write(b"\n")
    else:
        tmp = tmp_name(path)
        with disk_full(path, lambda: sum(len(x) + 1 for x, _ in kept), tmp):
            tmp.write_bytes(b"".join(x.rstrip(b"\r\n") + b"\n" for x, _ in kept))
            commit(tmp, path)
    return (kept[-1][1] if kept else {}), logged_until


class RunLog:
    """metrics.jsonl + the trackers of `report_to` (train/trackers.py: TensorBoard by default). On resume,
    what was logged after the checkpoint is dropped so no step appears twice; a fresh run starts a fresh file."""

    def __init__(self, out: Path, resumed_step: int | None, enabled: bool = True, cfg: RunConfig | None = None,
                 log: Callable[[str], None] = print):
        self.enabled = enabled  # rank 0 of a multi-process run writes; the others only compute
        self.last: dict[str, Any] = {}  # on resume, the last row kept
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        path = out / "metrics.jsonl"
        logged_until = None  # the last step the interrupted attempt logged: the trackers already have it
        if resumed_step is not None and path.exists():
            self.last, logged_until = _cut_after(path, resumed_step, log)
        elif path.exists():
            path.unlink()
        self.trackers = Trackers(cfg.trackers if cfg else ["tensorboard"], cfg.model_dump(mode="json") if cfg else {},
                                 out, cfg.tracker_project if cfg else None, resumed_step, logged_until, log)
        self.file = open(path, "ab", buffering=0)  # each row one write, whole or (a full disk) not at all

    def write(self, row: dict[str, Any], scalars: bool = True) -> None:
        if not self.enabled:
            return
        line = (json.dumps(row) + "\n").encode()
        with whole_append(self.file, len(line)) as write:
            faults.point("metrics.write", self.file.name)
            write(line)
        if scalars:
            self.trackers.write(row)

    def close(self, ok: bool = True) -> None:
        """`ok`: False when the run stops on an error (trackers mark their run failed)."""
        if not self.enabled:
            return
        self.file.close()
        self.trackers.finish(ok)


class Update:
    """One training method's step, driven by `train_loop`: offline methods take the next micro-batches,
    compute the loss and step the optimizer (train/offline.py); RL collects a rollout and updates on
    it (train/ppo.py). `position` counts the batches or rollouts consumed, so a resumed run continues
    with the next one; `state`/`restore` carry anything else a checkpoint must hold."""

    position: int = 0

    def __call__(self, step: int, opt: Optimization) -> tuple[dict[str, float], int]:
        """Run step `step`; returns (its metrics, the tokens it processed)."""
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        return {}

    def restore(self, state: dict[str, Any]) -> None:
        pass


class Optimization:
    """The loop's optimizer as an update sees it: `backward` adds a micro-batch's gradient, `apply`
    steps on the accumulated gradients (clipped) unless they are non-finite, `skip` records a step
    that cannot be taken. Both go through the one NaN/Inf guard (BadSteps) and count `skipped`.
    AdamW and the schedule are torch's; a strategy whose engine steps itself (DeepSpeed:
    train/deepspeed.py) overrides these three and `tensors`, how checkpoints read its state."""

    tensors = WholeTensors()

    def __init__(self, params: list, optimizer, max_grad_norm: float, guard: BadSteps, scheduler=None,
                 world: World = World()):
        self.params, self.optimizer, self.max_grad_norm, self.guard = params, optimizer, max_grad_norm, guard
        self.scheduler, self.skipped, self.world = scheduler, 0, world

    @classmethod
    def build(cls, cfg: RunConfig, model, log: Callable[[str], None], world: World = World()) -> Optimization:
        """AdamW over `model`'s trainable parameters as they are now (FSDP2: after sharding); `world`:
        the processes that step together (each skips a step only if all do)."""
        params, optimizer, scheduler = build_optimizer(cfg, model)
        return cls(params, optimizer, cfg.max_grad_norm, BadSteps(cfg.max_bad_steps, log), scheduler, world)

    def backward(self, loss: Tensor, micro_batches: int, finite: bool) -> None:
        """One of a step's `micro_batches`: its share of the step's gradient. A non-finite loss (here
        or on another process) adds nothing: the caller skips the step."""
        if finite:
            (loss / micro_batches).backward()
            faults.point("backward")

    def apply(self, step: int, what: str = "step") -> float:
        faults.poison_grads("grad", self.params)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        here = bool(torch.isfinite(grad_norm))
        # DDP's all-reduced gradients agree, but one rank's may go bad after it (a kernel's overflow,
        # the `grad` fail point): every rank skips together, or the replicas drift apart for good
        if self.world.all_true(here):
            faults.point("optimizer.step")
            self.optimizer.step()
            self.guard.good()
        else:
            self.skip(step, f"non-finite gradient{'' if not here else ' in another process'}; {what} skipped")
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def skip(self, step: int, why: str) -> None:
        self.skipped += 1
        self.guard.bad(step, why)
        self.optimizer.zero_grad(set_to_none=True)


def train_loop(cfg: RunConfig, model, update: Update, device: torch.device, *,
               eval_fn: Callable[[], dict[str, float]] | None = None, monitor=None,
               log: Callable[[str], None] = print, progress: bool = True, label: str = "training",
               world: World = World(), opt: Optimization | None = None, guard=None) -> LoopResult:
    """The one loop of every method: `update` runs each step; logging, the NaN/Inf policy, checkpoints and
    resume, the KL and time budgets, TensorBoard and the run's last row are here, once. `monitor`
    (train/kl_monitor.py) measures the exact KL to the reference on sampled completions. Several processes
    (`world`): metrics averaged and tokens summed over the ranks; rank 0 logs, measures the KL and writes;
    every rank loads a checkpoint to resume. `opt`: a strategy's optimizer (DeepSpeed's engine); by default
    AdamW over `model`. `guard` (train/guards.py) checks its rules and picks the checkpoint final/ holds."""
    opt, guard = opt or Optimization.build(cfg, model, log, world), guard or NoGuard()
    bad, state = opt.guard, _resume(cfg, model, update, opt, log, world, guard)
    step = state.get("step", 0)
    runlog = RunLog(Path(cfg.output), step if state else None, enabled=world.main, cfg=cfg, log=log)
    budgets = Budgets(cfg, log, world, state)
    # run.json counts the run, not its last attempt: a resumed run's tokens and seconds go on from its
    # checkpoint's, and its last row is the last one logged, also when no step is left (killed in final/)
    stopped, total_tokens, last = budgets.resumed(state, step), state.get("tokens", 0), runlog.last
    t_start, ok = budgets.t_start, False
    bar = progress_bar(cfg.max_steps, step, progress and world.main, label)
    model.train()
    try:
        if eval_fn is not None and getattr(cfg, "eval_every", 0) and step == 0:
            # the baseline: what the untrained model scores, logged as step 0
            runlog.write({"step": 0, **{f"eval/{k}": v for k, v in eval_fn().items()}})
            model.train()
        # a run whose guard or KL or time budget ended it (killed before final/) resumes to its end, not further
        while step < cfg.max_steps and not guard.fired and stopped == "max_steps":
            skipped_before = opt.skipped
            step += 1
            row, metrics, tokens = _one_step(update, step, opt, opt.scheduler, device, world)
            total_tokens += tokens
            if bad.exceeded:
                runlog.write(row)  # the last skipped step is on record before the run stops
                raise TrainingError(bad.exceeded)
            measured = _measure(cfg, step, row, model, eval_fn, monitor, world)
            stopped = budgets.after(step, row, measured)  # the monitor's KLs only, not a guard's
            checked = guard.due(step) or stopped != "max_steps"  # the step a run stops at is judged too
            if checked and guard.check(step, row, model):
                stopped = "guard"
            skipped = opt.skipped > skipped_before  # on record whatever log_every (not: no metrics; offline has some)
            if step % cfg.log_every == 0 or step == cfg.max_steps or measured or skipped or checked:
                runlog.write(row)
            last = row
            update_bar(bar, step, _bar_text(row))
            if checkpoint_or_stop(cfg, step, update.position, model, opt, {"skipped_steps": opt.skipped,
                                  "tokens": total_tokens, "wall_seconds": time.perf_counter() - t_start,
                                  **update.state(), **guard.state(), **budgets.state()}, stopped, log, world,
                                  checked and guard.needs_checkpoints, guard.protected()):
                break
        summary = guard.finish(step, model, opt, world)
        stopped = "guard" if guard.fired else stopped  # also for a run resumed after its guard ended it
        ok = True
    finally:
        if bar is not None:
            bar[0].stop()
        runlog.close(ok)
    return LoopResult(step, stopped, opt.skipped, time.perf_counter() - t_start, total_tokens, last,
                      hardware(device), summary, _chosen_row(cfg, step, summary, world))


def _chosen_row(cfg: RunConfig, step: int, guard: dict[str, Any] | None, world: World) -> dict[str, Any] | None:
    """metrics.jsonl's row of the step a guard chose for final/ (guard steps are always logged) when it is
    not the last, `step`; else None."""
    if not guard or guard["final_step"] == step or not world.main:
        return None
    rows = [json.loads(line) for line in (Path(cfg.output) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return next((r for r in reversed(rows) if r.get("step") == guard["final_step"]), None)


def _measure(cfg: RunConfig, step: int, row: dict[str, Any], model, eval_fn, monitor, world: World) -> bool:
    """eval_data's metrics and the KL monitor's, into step `step`'s row when due; whether the monitor measured."""
    if eval_fn is not None and getattr(cfg, "eval_every", 0) and step % cfg.eval_every == 0:
        row.update({f"eval/{k}": v for k, v in eval_fn().items()})
        model.train()
    faults.point("kl.monitor")  # every rank, each step: rank 0 measures here when due, the others wait
    measured = monitor is not None and world.main and monitor.due(step, cfg.max_steps)
    if measured:
        faults.point("kl.measure")  # rank 0, as it starts a measurement
        row.update(monitor.measure())
        model.train()
    return measured


def _resume(cfg: RunConfig, model, update: Update, opt: Optimization, log: Callable[[str], None],
            world: World, guard) -> dict[str, Any]:
    """The newest checkpoint's state, restored into the model, optimizer, update and RNG; {} for a fresh run."""
    state = resume(cfg, model, opt.optimizer, opt.scheduler, log, world, opt.tensors)
    if state is None:
        return {}
    update.position, opt.skipped = state["position"], state.get("skipped_steps", 0)
    update.restore(state)
    guard.restore(state)
    return state


def hardware(device: torch.device) -> str:
    """The device as a cost table names it: a GPU with its model; a CPU with its model and threads."""
    threads = torch.get_num_threads()
    return f"cpu ({cpu_model()}, {threads} thread{'s' * (threads != 1)})" if device.type == "cpu" else describe(device)


def versions() -> dict[str, str]:
    """run.json's `versions`: the packages whose versions decide what a rerun of the config computes."""
    out = {}
    for name in ("prefalign", "torch", "transformers", "peft"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def _one_step(update: Update, step: int, opt: Optimization, scheduler, device: torch.device,
              world: World) -> tuple[dict[str, Any], dict[str, float], int]:
    """Step `step` run by `update`: (its metrics.jsonl row, the update's metrics, its tokens), every
    process's metrics averaged and tokens summed."""
    doing(f"at step {step}")  # what an out-of-memory error names (train/run.py)
    faults.point("step")
    t0 = time.perf_counter()
    metrics, tokens = update(step, opt)
    metrics, tokens = world.mean_metrics(metrics), int(world.sum(tokens))
    scheduler.step()
    # an update may time its own step (RL: rollout + update, docs/metrics.md)
    seconds = metrics.pop("step_seconds", None) or time.perf_counter() - t0
    row = {"step": step, **metrics, "learning_rate": scheduler.get_last_lr()[0],
           **({"tokens_per_s": tokens / seconds} if tokens else {}), "step_seconds": seconds,
           "peak_memory_bytes": int(world.max(peak_memory_bytes(device))), "skipped_steps": opt.skipped}
    return row, metrics, tokens


def _bar_text(row: dict[str, Any]) -> str:
    if "ppo/reward" in row:
        return f"reward {row['ppo/reward']:.3f} kl {row['ppo/kl']:.3f}"
    if "tokens_per_s" not in row:
        return f"step skipped ({row['skipped_steps']} in all)"
    return f"loss {row.get('loss', float('nan')):.4f} {row['tokens_per_s']:.0f} tok/s"


def write_summary(out: Path, result: LoopResult, **fields: Any) -> dict[str, Any]:
    """run.json: what every run reports (docs/benchmarks.md, "How costs are counted"), plus the trainer's `fields`."""
    summary = {**fields, "steps": result.steps, "stopped": result.stopped, "skipped_steps": result.skipped_steps,
               "wall_seconds": result.wall_seconds, "tokens": result.tokens,
               "tokens_per_s": result.tokens / result.wall_seconds if result.wall_seconds else None,
               "peak_memory_bytes": result.last.get("peak_memory_bytes"), "device": result.device,
               "versions": versions(), "final_step": result.guard["final_step"] if result.guard else result.steps,
               # `final` describes final/: a guard's pick when it chose an earlier step (then `last` is the last row)
               "final": result.chosen or result.last, **({"last": result.last} if result.chosen else {}),
               **({"guard": result.guard} if result.guard else {})}
    path = out / "run.json"
    text = json.dumps(summary, indent=2)  # whole under a temporary name, then renamed: never half a run.json
    with disk_full(path, len(text), tmp_name(path)):
        tmp_name(path).write_text(text)
        commit(tmp_name(path), path)
    return summary


class Budgets:
    """kl_budget (with stop_on_kl_budget) and max_seconds: after each step, whether the run stops, on every rank
    alike (rank 0 measured the KL; any rank's clock counts); the budget that stopped it goes into the checkpoint,
    so a run resumed after that stop (killed writing final/) takes no step more unless its budget was raised."""

    def __init__(self, cfg: RunConfig, log: Callable[[str], None], world: World, state: dict[str, Any]):
        self.cfg, self.log, self.world, self.stopped_by, self.warned = cfg, log, world, None, False
        self.t_start = time.perf_counter() - state.get("wall_seconds", 0.0)  # counted over resumes

    def resumed(self, state: dict[str, Any], step: int) -> str:
        kind, limit = state.get("stopped_by") or (None, None)
        now = {"kl_budget": self.cfg.kl_budget if self.cfg.stop_on_kl_budget else None,
               "max_seconds": self.cfg.max_seconds}.get(kind)
        return kind if now is not None and now <= limit and step < self.cfg.max_steps else "max_steps"

    def after(self, step: int, row: dict[str, Any], measured: bool) -> str:
        if self.world.any_true(measured and self._over_kl(row["kl/policy_ref_token"], step)):
            self.stopped_by = ["kl_budget", self.cfg.kl_budget]
        elif self.cfg.max_seconds is not None and step < self.cfg.max_steps and \
                self.world.any_true(time.perf_counter() - self.t_start >= self.cfg.max_seconds):
            self.stopped_by = ["max_seconds", self.cfg.max_seconds]
        return self.stopped_by[0] if self.stopped_by else "max_steps"

    def _over_kl(self, kl: float, step: int) -> bool:
        """Whether the monitor's kl/policy_ref_token stops the run; over kl_budget warns once either way."""
        if self.cfg.kl_budget is None or kl <= self.cfg.kl_budget:
            return False
        if not self.warned:
            self.log(f"step {step}: kl/policy_ref_token {kl:.4f} exceeds kl_budget {self.cfg.kl_budget}")
            self.warned = True
        return self.cfg.stop_on_kl_budget

    def state(self) -> dict[str, Any]:
        return {"stopped_by": self.stopped_by} if self.stopped_by else {}


class BadSteps:
    """The NaN/Inf guard of every method: a non-finite loss, gradient or reward skips the update and is
    logged; `max_bad` of them in a row set `exceeded` (the reason), and the loop stops the run with a
    TrainingError once the step's row is written."""

    def __init__(self, max_bad: int, log: Callable[[str], None]):
        self.max_bad, self.log, self.in_a_row, self.exceeded = max_bad, log, 0, ""

    def good(self) -> None:
        self.in_a_row = 0

    def bad(self, step: int, what: str) -> None:
        self.in_a_row += 1
        self.log(f"step {step}: {what} ({self.in_a_row} in a row)")
        if self.in_a_row >= self.max_bad:
            self.exceeded = (f"{self.in_a_row} non-finite steps in a row (last: {what}); stopping. "
                             "Lower the learning rate, check the data or the reward, or use fp32.")


def checkpoint_or_stop(cfg: RunConfig, step: int, position: int, model, opt: Optimization, extra: dict,
                       stopped: str, log: Callable[[str], None], world: World = World(), save: bool = False,
                       protect: set[int] = frozenset()) -> bool:
    """Save a checkpoint when one is due (`save`: a guard step's) or the run stops early; True when the run
    must stop. `protect`: checkpoints pruning keeps whatever keep_checkpoints says (the guard's picks)."""
    if (cfg.save_every and step % cfg.save_every == 0) or stopped != "max_steps" or save:
        save_checkpoint(Path(cfg.output), step, position, model, opt.optimizer, opt.scheduler, extra,
                        cfg.keep_checkpoints, world, sharded_format(cfg, world), opt.tensors, protect)
    if stopped == "kl_budget":
        log(f"stopping at step {step}: kl/policy_ref_token is over its budget of {cfg.kl_budget} (stop_on_kl_budget)")
    elif stopped == "max_seconds":
        log(f"stopping at step {step} of {cfg.max_steps}: the training loop reached max_seconds "
            f"({cfg.max_seconds:g} s)")
    return stopped != "max_steps"


def update_bar(bar, step: int, description: str) -> None:
    if bar is not None:
        bar[0].update(bar[1], completed=step, description=description)


def progress_bar(total: int, done: int, enabled: bool, label: str = "training"):
    if not enabled:
        return None

    p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                 transient=False)
    p.start()
    return p, p.add_task(label, total=total, completed=done)
