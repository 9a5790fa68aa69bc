"""PPO-based RLHF, and the critic-free RLOO and GRPO on the same rollouts: one readable module.

One step of `max_steps`:
  1. rollout: `batch_size` prompts (each repeated `samples_per_prompt` times, consecutively), one
     completion sampled per row with the KV cache; the sampled ids are kept as generated.
  2. score: the judge (a Python callable or a reward model) scores each completion once; a completion
     that never reached EOS loses `missing_eos_penalty`; scores may be normalised and clipped.
  3. no-grad pass: the policy's log-probs of its own tokens under the sampling temperature (old
     log-probs), the reference's, the per-token entropy, and the critic's values V(s_t).
  4. advantages:
       ppo:  per-token reward = -kl_coef * k1_t (kl_penalty: reward_k1), plus the score at the last
             real token; GAE over it; advantages whitened (critic learns the unwhitened returns).
       rloo: sequence reward = score - kl_coef * sum_t k1_t; leave-one-out baseline over the k samples.
       grpo: the group-normalised score; its KL is in the loss (loss_k3 or loss_full).
  5. update: `ppo_epochs` passes over the rollout in `num_minibatches` shuffled minibatches; clipped
     surrogate (+ clipped value loss for ppo, + kl_coef * the loss_k3 / loss_full penalty, whose
     expected gradient is that of the sequence KL: losses/ppo.py); gradient clipping. A non-finite
     reward or log-prob (policy, reference) skips the rollout, a non-finite loss or gradient skips the
     update; `max_bad_steps` of them in a row stop the run.
  6. the KL coefficient adapts towards `kl_target` (Ziegler et al. 2019) when one is set.
Checkpoints hold the trainable weights (policy adapters or weights, and the critic), the optimizer,
the schedule, the RNG, the prompt position, the KL coefficient and the running reward statistics, so
a resumed run samples and updates exactly as the uninterrupted one would.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import faults
from ..config import Sampling
from ..data.records import text_of
from ..errors import ConfigError
from ..judges import RewardModelJudge, make_judge
from ..losses import ppo as ppo_losses
from ..models.backends import HFGenerator, check_backend, make_generator
from ..models.generate import encode_prompt
from ..models.load import add_lora, is_peft, load_model, load_tokenizer_for, save_model, weight_dtypes
from ..models.logps import completion_logps, states_kl
from ..models.scalar import load_scalar_model, score_head
from ..models.scalar import token_scores as critic_token_scores
from ..runtime.determinism import disable_dropout
from ..runtime.device import describe
from ..runtime.distributed import World, shut_down
from ..runtime.memory import doing
from ..runtime.precision import weights_dtype
from .config import RLConfig
from .kl_monitor import build_monitor
from .loop import LoopResult, Optimization, Update, batch_indices, train_loop, write_summary
from .methods import METHODS
from .offline import start_run
from .parallel import ddp
from .sources import load_prompt_mix


class ActorCritic(nn.Module):
    """The trainable whole: the policy and its critic (a value head on the policy's trunk, a separate
    scalar model, or none for rloo/grpo). One module so one optimizer and one checkpoint hold both;
    its forward is `forward_rows`, so that DDP can wrap it."""

    def __init__(self, policy, value_head: nn.Module | None = None, critic_model=None):
        super().__init__()
        self.policy, self.value_head, self.critic_model = policy, value_head, critic_model

    def forward(self, *args, **kwargs):
        return self.forward_rows(*args, **kwargs)

    def forward_rows(self, rows: dict[str, Tensor], n_prompt: int, cfg: RLConfig, *, entropy: bool = False,
                     hidden: bool = False):
        """Log-probs (B, Tc) of the rollout's completion tokens, values (B, Tc) where a critic exists,
        and on request the `hidden` states (B, Tc, H) that predicted them."""
        out = completion_logps(self.policy, rows["input_ids"], rows["attention_mask"], n_prompt,
                               rows["completion_mask"], chunk_mb=cfg.logits_chunk_mb, temperature=cfg.temperature,
                               entropy=entropy, hidden_out=hidden or self.value_head is not None)
        if self.value_head is not None:
            # V(s_t): the state before token t
            out["values"] = self.value_head((out["hidden"] if hidden else out.pop("hidden")).float()).squeeze(-1)
        elif self.critic_model is not None:
            # same layout, same positions: the critic's head at the state before each completion token
            out["values"] = critic_token_scores(self.critic_model, rows["input_ids"], rows["attention_mask"])[
                :, n_prompt - 1:-1]
        return out


@dataclass
class RunningMoments:
    """Running mean/variance of scores across rollouts (Chan et al. parallel update), for
    reward_norm: running. Kept in checkpoints."""

    mean: float = 0.0
    var: float = 1.0
    count: float = 1e-4

    def update(self, x: Tensor, reduce: ppo_losses.Reduce | None = None) -> None:
        """Fold in the scores `x` (of every process's share, with `reduce`)."""
        if reduce is None:
            n, m, v = x.numel(), float(x.mean()), float(x.var(unbiased=False)) if x.numel() > 1 else 0.0
        else:
            mean, var = ppo_losses.masked_moments(x, torch.ones_like(x), reduce)
            n = int(reduce(torch.tensor([float(x.numel())], device=x.device))[0])
            m, v = float(mean), float(var) * (n - 1) / n if n > 1 else 0.0
        total = self.count + n
        delta = m - self.mean
        self.mean += delta * n / total
        self.var = (self.var * self.count + v * n + delta**2 * self.count * n / total) / total
        self.count = total


def _reference(cfg: RLConfig, policy):
    """(a context manager that makes the policy the reference, or a frozen copy, model copies held)."""
    strategy = cfg.reference if cfg.reference != "auto" else ("adapter" if cfg.lora else "copy")
    if strategy == "adapter":
        return strategy, None
    ref = copy.deepcopy(policy).requires_grad_(False).eval()  # before LoRA and before any update
    return strategy, ref


def shape_scores(cfg: RLConfig, raw: Tensor, ended: Tensor, lengths: Tensor, moments: RunningMoments,
                 reduce: ppo_losses.Reduce | None = None) -> Tensor:
    """`lengths` (N,): completion tokens including EOS. Penalties first, then normalisation (over
    every process's share, with `reduce`) and clipping."""
    scores = raw.clone()
    if cfg.missing_eos_penalty is not None:
        scores = torch.where(ended, scores, scores - cfg.missing_eos_penalty)
    if cfg.min_new_tokens:
        # an EOS that came before min_new_tokens other tokens: the early-EOS collapse a strong KL
        # penalty invites (every token is a cost, ending is free), penalised in the score
        early = ended & (lengths - 1 < cfg.min_new_tokens)
        scores = torch.where(early, scores - cfg.early_eos_penalty, scores)
    if cfg.reward_norm == "batch" and (scores.numel() > 1 or reduce is not None):
        mean, var = ppo_losses.masked_moments(scores, torch.ones_like(scores), reduce)
        scores = (scores - mean) / (var.sqrt() + 1e-8)
    elif cfg.reward_norm == "running":
        moments.update(scores, reduce)
        scores = (scores - moments.mean) / math.sqrt(moments.var + 1e-8)
    if cfg.reward_clip is not None:
        scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
    return scores


def advantages(cfg: RLConfig, scores: Tensor, old: Tensor, ref: Tensor, values: Tensor | None, mask: Tensor,
               kl_coef: float, reduce: ppo_losses.Reduce | None = None) -> tuple[Tensor, Tensor | None]:
    """(advantages (N, Tc), returns (N, Tc) for the critic or None): the method's estimator
    (train/methods.py) on the scores, with k1 in the reward for reward_k1 (the loss_* penalties act in
    the loss, in `minibatch_loss`); `reduce`: the rollout is shared over processes."""
    kl = ppo_losses.kl_k1(old, ref) * mask if cfg.kl_penalty == "reward_k1" else torch.zeros_like(old)
    spec = METHODS[cfg.method]
    own = {k: getattr(cfg, k) for k in spec.hyperparameters if k != "kl_coef"}
    return spec.advantages(scores, kl, values, mask, reduce, kl_coef=kl_coef, **own)


def minibatch_loss(cfg: RLConfig, new: dict[str, Tensor], old: Tensor, ref: Tensor, adv: Tensor, mask: Tensor,
                   kl_coef: float, full_kl: Tensor | None = None, old_values: Tensor | None = None,
                   returns: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """The loss of one minibatch, (B, Tc) tensors of its rows: the clipped surrogate, the clipped
    value loss where a critic learns `returns`, and kl_coef x the loss-side KL penalty (loss_k3,
    loss_full: `full_kl` is the exact per-position KL, differentiable). tests/test_kl_penalty.py
    enumerates outcomes through this function and `advantages`."""
    loss, stats = ppo_losses.clipped_policy_loss(new["logps"], old, adv, mask, cfg.clip_range)
    row = {"ppo/policy_loss": loss.item(), **{f"ppo/{k}": float(v) for k, v in stats.items()}}
    if returns is not None:
        vf_loss, vf_stats = ppo_losses.clipped_value_loss(
            new["values"].float(), old_values, returns, mask, cfg.clip_range_value
        )
        loss = loss + cfg.vf_coef * vf_loss
        row.update({"ppo/value_loss": vf_loss.item(), "ppo/value_clipfrac": float(vf_stats["value_clipfrac"])})
    if cfg.kl_penalty != "reward_k1":
        kl_term = ppo_losses.masked_mean(
            ppo_losses.kl_penalty_loss(cfg.kl_penalty, new["logps"], old, ref, mask, full_kl), mask
        )
        loss = loss + kl_coef * kl_term
        row["ppo/kl_loss"] = kl_term.item()
    return loss, row


def run_rl(cfg: RLConfig, log=print, progress: bool = True) -> LoopResult:
    out, device, autocast, world = start_run(cfg)
    try:
        return _run_rl(cfg, out, device, autocast, world, log if world.main else (lambda _: None), progress)
    finally:
        shut_down(world)


def check_rl_world(cfg: RLConfig, world: World) -> None:
    """What a multi-process RL run needs, checked before any work: each process samples and updates
    on its share of the prompts (whole groups), under DDP."""
    if not world.active:
        return
    if cfg.distributed != "ddp":
        raise ConfigError(f"{cfg.method} runs under distributed: ddp (each process samples from the whole policy)")
    if cfg.generation_backend == "vllm":
        # one in-process engine per rank next to the training process group: not wired (needs vLLM's
        # external launcher) nor run on a GPU yet
        raise ConfigError("generation_backend: vllm runs in one process for now; use hf with several processes")
    if cfg.batch_size % world.size:
        raise ConfigError(f"batch_size {cfg.batch_size} (prompts per rollout) must divide over the {world.size} "
                          "processes")
    rows = cfg.batch_size // world.size * cfg.samples_per_prompt
    if rows % cfg.num_minibatches:
        raise ConfigError(f"each process's {rows} rollout rows must divide into num_minibatches "
                          f"({cfg.num_minibatches})")


def _run_rl(cfg: RLConfig, out: Path, device, autocast, world: World, log, progress: bool) -> LoopResult:
    check_rl_world(cfg, world)
    if cfg.generation_backend == "openai":
        raise ConfigError(f"{cfg.method} samples from the policy it trains; generation_backend: openai samples a "
                          "fixed served model (use it for sample, label and eval); use hf or vllm")
    check_backend(cfg.generation_backend, device)  # before any model is loaded

    doing("while loading the models")  # the policy, reference, judge and critic; what an OOM error names
    faults.point("model.load")
    tokenizer = load_tokenizer_for(cfg.model, cfg.trust_remote_code, cfg.chat_template)
    policy = load_model(cfg.model, trust_remote_code=cfg.trust_remote_code, device=device,
                        quantize_4bit=cfg.quantize_4bit, dtype=weights_dtype(cfg.dtype, device, bool(cfg.lora)),
                        attn_implementation=cfg.attn_implementation, training=True)
    disable_dropout(policy)
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    strategy, ref_model = _reference(cfg, policy)
    # a vLLM engine starts from the weights before adapters; a LoRA run then pushes adapters only
    generator = make_generator(cfg.generation_backend, policy, tokenizer, device, autocast, seed=cfg.seed,
                               max_length=cfg.max_prompt_length + cfg.max_new_tokens,
                               memory_fraction=cfg.vllm_memory_fraction,
                               lora_rank=(cfg.lora_settings or {}).get("r"))
    if cfg.lora_settings is not None:
        policy = add_lora(policy, cfg.lora_settings)
    generator.push(policy)
    judge = make_judge(cfg.reward, device)
    ac = ActorCritic(policy, *_critic(cfg, policy, judge, tokenizer, device))

    doing("while reading the prompts")
    prompts, uses = load_prompt_mix(cfg, out, log, world)
    feed_ids = isinstance(judge, RewardModelJudge) and judge.shares_vocab(tokenizer)
    copies = 1 + (ref_model is not None) + (ac.critic_model is not None) + (judge.kind == "reward_model")
    critic = "value head" if ac.value_head is not None else "model" if ac.critic_model is not None else "none"
    log(f"method {cfg.method}, {len(prompts)} prompts, reference {strategy}, critic {critic}, "
        f"reward {judge.kind}{' (on the sampled ids)' if feed_ids else ''}, "
        f"{'LoRA' if is_peft(policy) else 'full fine-tune'}, {copies} model copies, device {describe(device)}, "
        f"{weight_dtypes(policy)}" + (f", {world.size} processes (ddp)" if world.active else ""))

    iteration = Iteration(cfg, ac, ref_model, tokenizer, judge, prompts, feed_ids, device, autocast, generator,
                          world, ddp(ac, world, device))
    monitor = None
    if world.main:  # rank 0 measures the KL; the others would repeat it
        monitor = build_monitor(cfg, policy, ref_model if ref_model is not None else policy,
                                nullcontext if ref_model is not None else policy.disable_adapter, tokenizer,
                                prompts, device, autocast, log)
    result = train_loop(cfg, ac, iteration, device, monitor=monitor, log=log, progress=progress, label=cfg.method,
                        world=world)
    doing("while writing final/")
    if world.main:
        save_model(policy, tokenizer, out / "final", base=cfg.model)
        write_summary(out, result, method=cfg.method, reference=strategy, lora=is_peft(policy), model_copies=copies,
                      reward=judge.kind, processes=world.size, data_sources=[u.to_json() for u in uses])
    world.barrier()
    log(f"saved {out / 'final'} ({result.steps} steps, {result.wall_seconds:.1f} s)")
    return result


def _critic(cfg: RLConfig, policy, judge, tokenizer, device) -> tuple[nn.Module | None, nn.Module | None]:
    """(value head, critic model): PPO's critic; RLOO and GRPO have none."""
    critic = getattr(cfg, "critic", None)
    if critic == "value_head":
        value_head = nn.Linear(policy.config.get_text_config().hidden_size, 1).to(device)
        nn.init.zeros_(value_head.weight), nn.init.zeros_(value_head.bias)  # V = 0 until it learns
        return value_head, None
    if critic == "model":
        # a second model; from the reward model when there is one (InstructGPT), else from the policy
        source = judge.model_path if isinstance(judge, RewardModelJudge) else cfg.model
        critic_model = load_scalar_model(source, pad_token_id=tokenizer.pad_token_id, device=device,
                                         attn_implementation=cfg.attn_implementation, training=True)
        disable_dropout(critic_model)
        if cfg.lora_settings is not None:
            critic_model = add_lora(critic_model, cfg.lora_settings, "SEQ_CLS")
        if not is_peft(critic_model):
            score_head(critic_model).requires_grad_(True)
        # with LoRA, PEFT trains a copy of the head (modules_to_save); making its frozen original
        # trainable too would give DDP a parameter that never receives a gradient
        return None, critic_model
    return None, None


class Iteration(Update):
    """One PPO/RLOO/GRPO iteration, the phases of the module docstring in order; `train_loop` runs it."""

    def __init__(self, cfg: RLConfig, ac: ActorCritic, ref_model, tokenizer, judge, prompts: list, feed_ids: bool,
                 device: torch.device, autocast, generator=None, world: World = World(), train_forward=None):
        self.cfg, self.ac, self.tokenizer, self.judge, self.prompts = cfg, ac, tokenizer, judge, prompts
        # several processes: each samples and updates on its share of the prompts; the update's
        # forward goes through DDP, statistics of the whole rollout through `reduce`
        self.world, self.train_forward = world, train_forward or ac
        self.reduce = world.reduce if world.active else None
        self.generator = generator or HFGenerator(ac.policy, tokenizer, device, autocast)
        self.feed_ids, self.device, self.autocast = feed_ids, device, autocast
        self.prompt_ids = [encode_prompt(tokenizer, p, cfg.max_prompt_length) for p in prompts]
        self.sampling = Sampling.of(cfg)
        self.moments, self.kl_ctl = (
            RunningMoments(),
            ppo_losses.KLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon),
        )
        policy = ac.policy
        self.ref_net = ref_model if ref_model is not None else policy
        # the reference is a frozen copy, or the policy with its adapters switched off
        self.ref_ctx = nullcontext if ref_model is not None else policy.disable_adapter

    def prompt_share(self, idx: list[int]) -> list[int]:
        """This process's prompts of the rollout (all of them for one process); a prompt's k samples
        stay together, so group baselines never need another process."""
        share = len(idx) // self.world.size
        return idx[self.world.rank * share:(self.world.rank + 1) * share]

    def rollout_seed(self) -> int | None:
        """One process draws from torch's RNG (saved in checkpoints). Several must not draw the same
        noise for different prompts: each seeds its rollout from (seed, rollout, rank), which a
        resumed run reproduces on the same process count."""
        if not self.world.active:
            return None
        key = f"{self.cfg.seed}/{self.position}/{self.world.rank}".encode()
        return int.from_bytes(hashlib.blake2b(key, digest_size=4).digest(), "little")  # any seed, no overflow

    def state(self) -> dict:
        return {"kl_coef": self.kl_ctl.value, "moments": self.moments.__dict__}

    def restore(self, state: dict) -> None:
        self.kl_ctl.value, self.moments = state["kl_coef"], RunningMoments(**state["moments"])

    def __call__(self, step: int, opt: Optimization) -> tuple[dict[str, float], int]:
        # one function on purpose: the iteration reads top to bottom in the numbered phases of the
        # module docstring; split into helpers, the story of one PPO step would be scattered
        cfg, ac, device = self.cfg, self.ac, self.device
        # ---- 1. rollout
        faults.point("rollout")
        t0 = time.perf_counter()
        idx = self.prompt_share(batch_indices(self.position, cfg.batch_size, len(self.prompts), cfg.seed))
        self.position += 1
        rows_idx = [i for i in idx for _ in range(cfg.samples_per_prompt)]  # k consecutive samples per prompt
        roll = self.generator([self.prompt_ids[i] for i in rows_idx], self.sampling, seed=self.rollout_seed(),
                              prompt_texts=[text_of(self.prompts[i]) for i in rows_idx])
        all_rows = roll.select(torch.arange(len(rows_idx)))
        mask = roll.completion_mask.float()

        # ---- 2. score (once per completion, on the sampled ids when the reward model shares the vocabulary)
        if self.feed_ids:
            raw = self.judge.score_ids(roll.input_ids, roll.attention_mask).float().to(device)
        else:
            raw = torch.tensor(self.judge.score([self.prompts[i] for i in rows_idx], roll.completion_texts),
                               device=device)
        raw = faults.poison("reward", raw)
        if not self.world.all_true(bool(torch.isfinite(raw).all())):
            # a judge that returned NaN/Inf: no advantage can be built from it
            where = " (here, or in another process)" if self.world.active else ""
            opt.skip(step, f"{int((~torch.isfinite(raw)).sum())} non-finite rewards{where}; rollout skipped")
            return {}, 0

        # ---- 3. the no-grad pass: old log-probs, entropy, values; reference log-probs
        with torch.no_grad():
            ac.eval()
            with self.autocast():
                fwd = ac.forward_rows(all_rows, roll.n_prompt, cfg, entropy=True)
            old, entropy = fwd["logps"], fwd["entropy"]
            old_values = faults.poison("values", fwd["values"].float() * mask) if "values" in fwd else None
            ref, ref_states = self.reference_pass(all_rows, roll.n_prompt)
            ref = faults.poison("ref_logps", ref)
            passes = (("policy log-probs", old), ("reference log-probs", ref), ("values", old_values))
            bad = [name for name, t in passes if t is not None and not bool(torch.isfinite(t).all())]
            if not self.world.all_true(not bad):
                # skipped here, as one bad step: left to the loss, each of the ppo_epochs x num_minibatches
                # updates would count as one (a single bad pass could reach max_bad_steps), and a NaN KL
                # would poison the adaptive kl_coef for the rest of the run
                what = " and ".join(bad) if bad else "log-probs or values in another process"
                opt.skip(step, f"non-finite {what}; rollout skipped")
                return {}, 0
            k1, k3 = ppo_losses.kl_k1(old, ref) * mask, ppo_losses.kl_k3(old, ref) * mask

            # ---- 4. advantages (the scores shaped only now: a rollout skipped above leaves the running
            # reward statistics as they were)
            scores = shape_scores(cfg, raw, roll.ended.to(device), mask.sum(-1), self.moments, self.reduce)
            adv, returns = advantages(cfg, scores, old, ref, old_values, mask, self.kl_ctl.value, self.reduce)
        rollout_seconds = time.perf_counter() - t0

        # ---- 5. update: ppo_epochs passes of num_minibatches clipped steps
        t1 = time.perf_counter()
        ac.train()
        stats = []
        for _ in range(cfg.ppo_epochs):
            for mb in torch.randperm(len(rows_idx)).chunk(cfg.num_minibatches):
                if opt.guard.exceeded:  # the run stops: no more updates
                    break
                mb_dev = mb.to(device)
                rows, m = roll.select(mb), mask[mb_dev]
                with self.autocast():
                    new = self.train_forward(rows, roll.n_prompt, cfg, hidden=cfg.kl_penalty == "loss_full")
                full = self.exact_kl(new, m, mb_dev, mask, ref_states) if cfg.kl_penalty == "loss_full" else None
                loss, row = minibatch_loss(
                    cfg, new, old[mb_dev], ref[mb_dev], adv[mb_dev], m, self.kl_ctl.value, full,
                    None if returns is None else old_values[mb_dev], None if returns is None else returns[mb_dev])
                loss = faults.poison("loss", loss)
                if not self.world.all_true(bool(torch.isfinite(loss))):  # every process skips it, or none
                    opt.skip(step, "non-finite loss; update skipped")
                    continue
                loss.backward()
                skipped = opt.skipped
                grad_norm = opt.apply(step, "update")
                if opt.skipped == skipped:
                    stats.append({"loss": loss.item(), "grad_norm": grad_norm, **row})
        self.generator.push(ac.policy)  # vllm: the engine samples the next rollout from the updated weights
        update_seconds = time.perf_counter() - t1

        # ---- 6. the KL coefficient
        # the adaptive controller follows k3: unbiased like k1 on samples from the policy, and never negative
        kl_seq = k3.sum(-1)
        self.kl_ctl.update(self.world.ratio(kl_seq.sum(), len(rows_idx)), int(self.world.sum(len(rows_idx))))
        metrics = {
            **{k: sum(s[k] for s in stats) / len(stats) for k in (stats[0] if stats else {})},
            "ppo/reward": float(raw.mean()), "ppo/reward_std": float(raw.std()) if len(rows_idx) > 1 else 0.0,
            "ppo/score": float(scores.mean()),
            "ppo/kl": float(kl_seq.mean()), "ppo/kl_k1": float(k1.sum(-1).mean()), "ppo/kl_k3": float(kl_seq.mean()),
            "ppo/entropy": float(ppo_losses.masked_mean(entropy, mask)), "ppo/kl_coef": self.kl_ctl.value,
            "ppo/completion_length": float(mask.sum(-1).mean()), "ppo/eos_rate": float(roll.ended.float().mean()),
            "ppo/rollout_seconds": rollout_seconds, "ppo/update_seconds": update_seconds,
            "ppo/generation_tokens_per_s": roll.tokens_per_s, "step_seconds": rollout_seconds + update_seconds,
            # where an RL step's time goes: generation is the usual bottleneck (a fast backend's case)
            "ppo/rollout_share": rollout_seconds / (rollout_seconds + update_seconds),
            "ppo/generation_share": roll.seconds / (rollout_seconds + update_seconds),
        }
        if returns is not None:
            metrics["ppo/value_explained_var"] = ppo_losses.explained_variance(old_values, returns, mask)
        return metrics, int(roll.attention_mask.sum())

    def reference_pass(self, rows: dict[str, Tensor], n_prompt: int) -> tuple[Tensor, Tensor | None]:
        """The reference's log-probs (N, Tc) and, for loss_full, its states at the completion positions."""
        args = (rows["input_ids"], rows["attention_mask"], n_prompt, rows["completion_mask"])
        full = self.cfg.kl_penalty == "loss_full"
        with self.ref_ctx(), self.autocast():
            out = completion_logps(self.ref_net, *args, chunk_mb=self.cfg.logits_chunk_mb,
                                   temperature=self.cfg.temperature, hidden_out=full)
        states = out["hidden"][rows["completion_mask"].bool()].float() if full else None  # (N, H) row-major
        return out["logps"], states

    def exact_kl(self, new: dict[str, Tensor], m: Tensor, mb: Tensor, mask: Tensor, ref_states: Tensor) -> Tensor:
        """(B_mb, Tc) exact KL(pi || pi_ref) per completion position of a minibatch, differentiable in
        the policy. ref_states holds the reference's states of the whole rollout, row-major over its
        completion mask; `slot` finds each minibatch position's row there."""
        slot = torch.zeros(mask.shape, dtype=torch.long, device=self.device)
        slot[mask.bool()] = torch.arange(int(mask.sum()), device=self.device)
        sel = m.bool()
        with self.ref_ctx():  # the reference's own head (LoRA never adapts the head)
            flat = states_kl(self.ac.policy, new["hidden"][sel].float(), self.ref_net, ref_states[slot[mb][sel]],
                             chunk_mb=self.cfg.logits_chunk_mb, temperature=self.cfg.temperature)
        return torch.zeros_like(m).index_put(sel.nonzero(as_tuple=True), flat)
