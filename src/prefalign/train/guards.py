"""Guardrails that pick the checkpoint (docs/guardrails.md): every `guard_every` steps (and at the last)
the run measures its exact KL to the reference (the KL monitor), what it kept of the reference's skills
(suite scores and perplexity on held-out text, reference minus policy) and its held-out preference
accuracy; `guards`' rules then end the run (`action: stop`) or end it on the last checkpoint that kept
every rule (`rollback`), and `select: frontier` makes final/ the checkpoint with the best held-out
accuracy among those within every rule.

The rules and the choice of checkpoint are pure functions of the figures (`broken_rules`, `last_good`,
`frontier`); `Guard` measures, keeps the history (in every checkpoint's state.json, so a resumed run
decides what the uninterrupted one would) and loads the chosen checkpoint at the end.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..config import Sampling
from ..data import read_prompts
from ..errors import ConfigError, DataError, TrainingError
from ..judges.suites import load_suite, score_suite, shipped_suites, suite_prompts
from ..models.generate import encode_prompt, generate
from ..models.perplexity import perplexity, text_pieces, tokenize_pieces, total_nll
from ..runtime.distributed import World
from ..storage import finite  # state.json and run.json hold null; a rule or the frontier: not measured
from .checkpoint import load_checkpoint
from .config import Guards, RunConfig

# rule -> (the figure it limits, True when the figure must stay at or below the limit)
RULES = {"kl_max": ("kl", True), "retention_drop_max": ("retention_drop", True),
         "perplexity_increase_max": ("perplexity_increase", True), "min_heldout_accuracy": ("heldout_accuracy", False),
         "min_heldout_reward": ("heldout_reward", False)}
# the held-out figure, by what the method logs on eval_data (docs/metrics.md), first found wins
HELDOUT = ("rewards/accuracy", "reward_model/accuracy")


# ------------------------------------------------------------------ the rules: pure functions of the figures


def broken_rules(rules: Guards, figures: dict[str, Any]) -> list[dict[str, Any]]:
    """The rules of `rules` that `figures` break, each {rule, value, limit}. A rule whose figure is
    missing or not finite is broken (value None): a checkpoint nobody could measure is vouched for by none."""
    out = []
    for rule, (key, at_most) in RULES.items():
        limit = getattr(rules, rule)
        if limit is None:
            continue
        value = figures.get(key)
        if value is None or not math.isfinite(value):
            out.append({"rule": rule, "value": None, "limit": limit})
        elif (value > limit) if at_most else (value < limit):
            out.append({"rule": rule, "value": value, "limit": limit})
    return out


def last_good(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The latest guard step that broke no rule (what `action: rollback` returns to), or None."""
    good = [h for h in history if not h["broken"]]
    return good[-1] if good else None


def frontier(history: list[dict[str, Any]], by: str = "heldout_accuracy") -> dict[str, Any] | None:
    """`select: frontier`'s pick among the guard steps that broke no rule: the highest held-out figure `by`
    (offline: heldout_accuracy; RL: heldout_reward); among equals the lowest KL (the least moved from the
    reference), then the earliest step."""
    good = [h for h in history if not h["broken"] and finite(h.get(by)) is not None]
    if not good:
        return None
    # an unmeasured (or NaN) KL ranks as the farthest from the reference, never as a tie-winner
    return min(good, key=lambda h: (-h[by], math.inf if finite(h.get("kl")) is None else h["kl"], h["step"]))


def describe(broken: list[dict[str, Any]]) -> str:
    """`kl_max: 0.91 > 0.5; ...` for the log and run.json's reason."""
    sign = {r: "<" if not at_most else ">" for r, (_, at_most) in RULES.items()}
    return "; ".join(f"{b['rule']}: {'not measured' if b['value'] is None else format(b['value'], '.4g')} "
                     f"{sign[b['rule']]} {b['limit']}" for b in broken)


# ------------------------------------------------------------------ measuring


class Retention:
    """Suite scores (greedy answers, judges/suites.py's scorers) and perplexity on held-out text of
    a model, measured as `prefalign eval` measures them; the reference's once, the policy's at each check."""

    def __init__(self, cfg: RunConfig, tokenizer, device, autocast, batch_size: int = 16):
        self.tokenizer, self.device, self.autocast, self.batch_size = tokenizer, device, autocast, batch_size
        self.chunk_mb, g = cfg.logits_chunk_mb, cfg.guards
        self.suites, names = [], {}
        for spec in g.suites:
            suite, items = load_suite(spec)
            # scores are keyed by the suite's name: two suites of one name (or a YAML named like a shipped
            # suite) would overwrite each other's, or pass for the shipped one's
            if suite.name in names or (Path(spec).suffix and suite.name in shipped_suites()):
                raise ConfigError(f"guards.suites: {spec} is named {suite.name!r}, as "
                                  f"{names.get(suite.name, 'a shipped suite')} is: give it another `name`")
            names[suite.name] = spec
            items = items[:g.suite_limit] if g.suite_limit else items
            ids = [encode_prompt(tokenizer, p, cfg.max_prompt_length) for p in suite_prompts(suite, items, tokenizer)]
            self.suites.append((suite, items, ids))
        # skipped: guards.text's rows that do not tokenize (run.json says how many)
        self.seqs, self.skipped = tokenize_pieces(tokenizer, text_pieces(g.text, "guards.text") if g.text else [],
                                                  getattr(cfg, "max_length", 512), cfg.max_prompt_length)
        if g.text and not self.seqs:
            raise ConfigError(f"{g.text}: no row of guards.text tokenizes")

    @torch.no_grad()
    def measure(self, model) -> dict[str, float]:
        """{suites/<name>: score, perplexity: exp(mean NLL)} of `model` (eval mode, no gradient)."""
        out = {}
        greedy = dict(temperature=0.0)
        for suite, items, ids in self.suites:
            sampling = Sampling(max_new_tokens=suite.max_new_tokens, **greedy)
            answers = [t for i in range(0, len(ids), self.batch_size)
                       for t in generate(model, self.tokenizer, ids[i:i + self.batch_size], sampling, seed=0,
                                         device=self.device, autocast=self.autocast).completion_texts]
            out[f"suites/{suite.name}"] = score_suite(suite, items, answers)["score"]
        if self.seqs:  # as `prefalign eval` measures it (models/perplexity.py)
            out["perplexity"] = perplexity(*total_nll(model, self.seqs, self.tokenizer.pad_token_id, self.device,
                                                      batch_size=self.batch_size, chunk_mb=self.chunk_mb,
                                                      autocast=self.autocast))
        return out


def heldout_prompts(path: str) -> list:
    """eval_prompts' prompts (a prompt or preference file, as `prompts`); a bad row is an error naming it."""
    prompts = read_prompts("eval_prompts", path)
    if not prompts:
        raise DataError(f"eval_prompts: {path}: no prompts")
    return prompts


class HeldoutReward:
    """RL's held-out figure: one completion per `eval_prompts` prompt, sampled by the policy with the run's
    sampling settings (temperature, max_new_tokens) and the same seed at every guard step (so two steps'
    figures differ by the policy, not the draw), scored by the run's judge as the rollouts are (raw scores:
    no KL penalty, EOS penalties or normalisation); the mean and its standard error (std / sqrt(n))."""

    def __init__(self, cfg, prompts: list, judge, feed_ids: bool, tokenizer, device, autocast, batch_size: int = 16):
        self.prompts, self.judge, self.feed_ids, self.tokenizer = prompts, judge, feed_ids, tokenizer
        self.ids = [encode_prompt(tokenizer, p, cfg.max_prompt_length) for p in prompts]
        self.sampling = Sampling(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)
        self.seed, self.device, self.autocast, self.batch_size = cfg.seed, device, autocast, batch_size

    @torch.no_grad()
    def measure(self, model) -> dict[str, float]:
        scores: list[float] = []
        for b, i in enumerate(range(0, len(self.ids), self.batch_size)):
            roll = generate(model, self.tokenizer, self.ids[i:i + self.batch_size], self.sampling,
                            seed=self.seed * 1_000_003 + b, device=self.device, autocast=self.autocast)
            if self.feed_ids:
                scores += self.judge.score_ids(roll.input_ids, roll.attention_mask).float().tolist()
            else:
                scores += self.judge.score(self.prompts[i:i + self.batch_size], roll.completion_texts)
        t = torch.tensor(scores, dtype=torch.float64)
        stderr = float(t.std() / math.sqrt(len(t))) if len(t) > 1 else float("nan")
        return {"heldout_reward": float(t.mean()), "heldout_reward_stderr": stderr}


def figures(kl: float | None, heldout: float | None, mine: dict[str, float], ref: dict[str, float]) -> dict[str, Any]:
    """One guard step's figures from the measurements: the drops are reference minus policy (suites,
    absolute), and policy over reference minus 1 (perplexity, relative)."""
    drops = {k: ref[k] - v for k, v in mine.items() if k.startswith("suites/")}
    out: dict[str, Any] = {"kl": finite(kl), "heldout_accuracy": finite(heldout),
                           "suites": {k[len("suites/"):]: v for k, v in mine.items() if k.startswith("suites/")}}
    out["retention_drop"] = max(drops.values()) if drops else None
    if "perplexity" in mine:
        mine_ppl, ref_ppl = finite(mine["perplexity"]), finite(ref.get("perplexity"))
        out["perplexity"] = mine_ppl
        out["perplexity_increase"] = None if mine_ppl is None or not ref_ppl else mine_ppl / ref_ppl - 1
    return out


def heldout_of(evaluated: dict[str, float]) -> float | None:
    """The held-out accuracy among an eval pass's metrics (a named set's `<set>/<metric>`: the first set's)."""
    for key, value in evaluated.items():
        if key.split("/", 1)[-1] in HELDOUT or key in HELDOUT:
            return value
    return None


# ------------------------------------------------------------------ the run's guard


class NoGuard:
    """The guard of a run without guard_every (train_loop's default): never due, never fired."""

    fired = None
    needs_checkpoints = False

    def due(self, step: int) -> bool:
        return False

    def check(self, step: int, row: dict[str, Any], model=None) -> bool:
        return False

    def state(self) -> dict[str, Any]:
        return {}

    def restore(self, state: dict[str, Any]) -> None:
        pass

    def protected(self) -> set[int]:
        return set()

    def finish(self, step: int, model, opt, world: World = World()) -> None:
        return None


class Guard:
    """The guard of one run: `check` at each guard step (True: the run must end), `state`/`restore` for
    checkpoints, `protected` for checkpoint pruning, `finish` loads the checkpoint final/ is to hold."""

    def __init__(self, cfg: RunConfig, monitor, eval_fn: Callable[[], dict[str, float]] | None,
                 retention: Retention, log: Callable[[str], None], heldout_reward: HeldoutReward | None = None,
                 world: World = World()):
        self.cfg, self.rules, self.monitor, self.eval_fn, self.retention, self.log = \
            cfg, cfg.guards, monitor, eval_fn, retention, log
        # several processes: rank 0 (the one with the KL monitor) measures, every rank gets its figures
        # and so takes the same decisions (stop, rollback, the frontier's pick) from the same history
        self.heldout_reward, self.world = heldout_reward, world
        # what select: frontier ranks by: RL's held-out reward, else the held-out preference accuracy
        self.by = "heldout_reward" if heldout_reward is not None else "heldout_accuracy"
        self.history: list[dict[str, Any]] = []
        self.fired: dict[str, Any] | None = None  # the step whose check ended the run, and what it broke
        self.reference: dict[str, float] | None = None  # the reference's retention figures, measured once

    @property
    def needs_checkpoints(self) -> bool:
        """Whether each guard step saves a checkpoint: rollback and frontier return to one."""
        return self.rules.action == "rollback" or self.cfg.select == "frontier"

    def due(self, step: int) -> bool:
        return step % self.cfg.guard_every == 0 or step == self.cfg.max_steps

    def check(self, step: int, row: dict[str, Any], model=None) -> bool:
        """Measure step `step` (what the row lacks of the KL and eval_data's metrics is measured here and
        added to it), add the guard/* figures to the row, keep them; True when a rule ended the run.
        Several processes: every rank calls it (eval_data's pass is shared), rank 0 measures the rest.
        `model`: the loop's, put back in training mode after an eval_data pass run here (on every rank)."""
        if self.eval_fn is not None and not any(k.startswith("eval/") for k in row):
            row.update({f"eval/{k}": v for k, v in self.eval_fn().items()})
            if model is not None:
                model.train()
        entry = self._measure(step, row) if self.world.main else None
        entry, self.reference = self.world.share((entry, self.reference))
        self.history.append(entry)
        row.update(guard_row(entry, self.reference))
        if entry["broken"]:
            then = {"stop": "stopping", "rollback": "rolling back and stopping",
                    "continue": "going on (it is no candidate for select: frontier)"}[self.rules.action]
            self.log(f"guard: step {step} breaks {describe(entry['broken'])}: {then}")
        if entry["broken"] and self.rules.action != "continue":
            self.fired = {"step": step, "broken": entry["broken"]}
        return self.fired is not None

    def _measure(self, step: int, row: dict[str, Any]) -> dict[str, Any]:
        """Rank 0's part of `check`: the KL (when the monitor was not due), retention, held-out figures."""
        policy = self.monitor.policy
        was_training = policy.training  # the measurements switch it off (the loop puts eval_fn's model back)
        if "kl/policy_ref_token" not in row:
            row.update(self.monitor.measure())
        heldout = None
        if self.eval_fn is not None:
            heldout = heldout_of({k[len("eval/"):]: v for k, v in row.items() if k.startswith("eval/")})
        policy.eval()  # first: an adapter reference is the policy with its adapters off (no dropout either)
        if self.reference is None:
            with self.monitor.reference_ctx():
                self.reference = {k: finite(v) for k, v in self.retention.measure(self.monitor.reference).items()}
        mine = self.retention.measure(policy)
        rewards = {k: finite(v) for k, v in self.heldout_reward.measure(policy).items()} \
            if self.heldout_reward is not None else {}
        policy.train(was_training)
        entry = {"step": step, **figures(row["kl/policy_ref_token"], heldout, mine, self.reference), **rewards}
        entry["broken"] = broken_rules(self.rules, entry)
        return entry

    def protected(self) -> set[int]:
        """Guard steps whose checkpoints pruning must keep: rollback's target and frontier's pick so far."""
        keep = set()
        if self.rules.action == "rollback" and (good := last_good(self.history)) is not None:
            keep.add(good["step"])
        if self.cfg.select == "frontier" and (best := frontier(self.history, self.by)) is not None:
            keep.add(best["step"])
        return keep

    def state(self) -> dict[str, Any]:
        return {"guard": {"history": self.history, "fired": self.fired, "reference": self.reference,
                          "rules": self.rules.model_dump(mode="json"), "select": self.cfg.select}}

    def restore(self, state: dict[str, Any]) -> None:
        """The checkpoint's history, judged again under this run's rules: a run resumed with changed rules
        (a limit loosened after a stop) decides by the new ones, from the figures the checkpoint recorded."""
        saved = state.get("guard") or {}
        self.history, self.reference = saved.get("history", []), saved.get("reference")
        for h in self.history:
            h["broken"] = broken_rules(self.rules, h)
        first = next((h for h in self.history if h["broken"]), None)
        self.fired = {"step": first["step"], "broken": first["broken"]} \
            if first is not None and self.rules.action != "continue" else None
        now = (self.rules.model_dump(mode="json"), self.cfg.select)
        if saved.get("rules") is not None and (saved["rules"], saved.get("select")) != now:
            then = f"step {self.fired['step']} broke them" if self.fired else "no guard step broke them"
            self.log(f"guard: the rules changed since the checkpoint (were {saved.get('rules')}, select "
                     f"{saved.get('select')}; now {describe_rules(self.cfg)}): the recorded guard steps were judged "
                     f"again, {then}")

    def choose(self, step: int) -> tuple[dict[str, Any] | None, str]:
        """(the guard step final/ is to hold, or None for the model as it is at `step`; why), by the rules
        of docs/guardrails.md: frontier whenever asked for; else rollback's last good step after a rule broke.
        Only steps whose checkpoints are on disk (or `step` itself) can be chosen: a run resumed with tightened
        rules may want one the old rules let pruning remove, and then the reason names it."""
        fired = f"step {self.fired['step']} broke {describe(self.fired['broken'])}; " if self.fired else ""
        kept = [h for h in self.history if h["step"] == step or self._saved(h["step"])]
        if self.cfg.select == "frontier":
            best, fired = self._pick(lambda hs: frontier(hs, self.by), kept, fired)
            if best is None:
                raise TrainingError(f"select: frontier: no guard step kept every rule ({fired}steps checked: "
                                    f"{[h['step'] for h in self.history]}); metrics.jsonl's guard/* rows have the "
                                    "figures")
            kl = "not measured" if best["kl"] is None else format(best["kl"], ".4g")
            return best, (f"{fired}frontier: step {best['step']} has the best held-out {self.by[8:]} "
                          f"({best[self.by]:.4g}, kl {kl}) of the "
                          f"{sum(not h['broken'] for h in self.history)} guard steps within every rule")
        if self.fired and self.rules.action == "rollback":
            # before the step that fired (after rules tightened on resume, later steps may be within them)
            before = self.fired["step"]
            good, fired = self._pick(lambda hs: last_good([h for h in hs if h["step"] < before]), kept, fired)
            if good is None:
                raise TrainingError(f"guards: {fired}no earlier guard step kept every rule with its checkpoint "
                                    "left, so there is nothing to roll back to (final/ not written; the checkpoints "
                                    "and metrics.jsonl are kept)")
            return good, f"{fired}rolled back to step {good['step']}, the last guard step within every rule"
        if self.fired:
            return None, f"{fired}stopped there (action: stop)"
        broke = [h["step"] for h in self.history if h["broken"]]
        return None, (f"guard steps {broke} broke rules (action: continue)" if broke else
                      "every guard step kept every rule") + f"; final/ is step {step}, the last"

    def _pick(self, rule, kept: list[dict[str, Any]], why: str) -> tuple[dict[str, Any] | None, str]:
        """`rule` over the steps still on disk; `why` grows a note when over every step it picks one that is not."""
        got, ideal = rule(kept), rule(self.history)
        if ideal is not None and ideal not in kept:
            why += f"step {ideal['step']}, which the rules pick, has no checkpoint left (pruned under earlier rules); "
        return got, why

    def _saved(self, step: int) -> bool:
        return (Path(self.cfg.output) / "checkpoints" / f"step-{step}").is_dir()

    def finish(self, step: int, model, opt, world: World = World()) -> dict[str, Any]:
        """Load the chosen checkpoint into `model` (when it is not `step`'s own weights) and return run.json's
        `guard` section."""
        chosen, reason = self.choose(step)
        final_step = step if chosen is None else chosen["step"]
        if final_step != step:
            path = Path(self.cfg.output) / "checkpoints" / f"step-{final_step}"
            load_checkpoint(path, model, opt.optimizer, opt.scheduler, world, opt.tensors)
        self.log(f"guard: {reason}")
        return {"every": self.cfg.guard_every, "rules": self.rules.model_dump(mode="json"), "select": self.cfg.select,
                "fired": self.fired, "final_step": final_step, "reason": reason, "reference": self.reference,
                "candidates": [h["step"] for h in self.history if not h["broken"]], "history": self.history,
                "text_rows_skipped": self.retention.skipped}


def guard_row(entry: dict[str, Any], reference: dict[str, float]) -> dict[str, float]:
    """A guard step's metrics.jsonl keys (docs/metrics.md)."""
    row = {"guard/passed": float(not entry["broken"]), **({"guard/kl": entry["kl"]} if entry["kl"] is not None else {})}
    for name, score in entry["suites"].items():
        row[f"guard/suites/{name}/score"] = score
        row[f"guard/suites/{name}/score_reference"] = reference[f"suites/{name}"]
    for key in ("retention_drop", "perplexity", "perplexity_increase", "heldout_accuracy", "heldout_reward",
                "heldout_reward_stderr"):
        if entry.get(key) is not None:
            row[f"guard/{key}"] = entry[key]
    if reference.get("perplexity") is not None:
        row["guard/perplexity_reference"] = reference["perplexity"]
    return row


def build_guard(cfg: RunConfig, monitor, eval_fn, tokenizer, device, autocast, log: Callable[[str], None],
                world: World = World(), paired: bool = True,
                heldout_reward: HeldoutReward | None = None) -> Guard | None:
    """The run's guard, or None without guard_every. `paired`: the method logs a held-out accuracy;
    `heldout_reward`: RL's held-out figure (eval_prompts)."""
    if not cfg.guard_every:
        return None
    if world.active and cfg.distributed != "ddp":
        raise ConfigError(f"guard_every on several processes needs distributed: ddp (rank 0 samples and measures "
                          f"with the whole model, which distributed: {cfg.distributed} does not keep on one process)")
    # several processes: only rank 0 holds the monitor; every rank must agree before any raises
    if not world.all_true(monitor is not None or not world.main):
        raise ConfigError(f"guard_every measures the KL with the KL monitor, which a {cfg.method} run does not have "
                          "(a reward model samples nothing): leave guard_every out")
    heldout = cfg.guards.min_heldout_accuracy is not None or (cfg.select == "frontier" and heldout_reward is None)
    if heldout and not paired:
        raise ConfigError(f"guards.min_heldout_accuracy and select: frontier need a held-out preference accuracy, "
                          f"which {cfg.method} does not log (only the DPO family and reward models do; RL ranks "
                          "by held-out reward: eval_prompts)")
    log(f"guards every {cfg.guard_every} steps: {describe_rules(cfg)}")
    retention = Retention(cfg, tokenizer, device, autocast)
    if retention.skipped:
        log(f"guards.text: {retention.skipped} of {retention.skipped + len(retention.seqs)} rows do not tokenize "
            f"(max_prompt_length / max_length leave no completion): perplexity leaves them out")
    return Guard(cfg, monitor, eval_fn, retention, log, heldout_reward, world)


def describe_rules(cfg: RunConfig) -> str:
    g = cfg.guards
    rules = [f"{r} {getattr(g, r)}" for r in RULES if getattr(g, r) is not None] or ["no rule (figures only)"]
    return f"{', '.join(rules)}; action {g.action}; select {cfg.select}"
