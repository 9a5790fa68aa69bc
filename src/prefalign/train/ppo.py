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
       grpo: group-normalised score (with reward_k1, of score - kl_coef * sum_t k1_t).
  5. update: `ppo_epochs` passes over the rollout in `num_minibatches` shuffled minibatches; clipped
     surrogate (+ clipped value loss for ppo, + kl_coef * the loss_k3 / loss_full penalty, whose
     expected gradient is that of the sequence KL: losses/ppo.py); gradient clipping. A non-finite
     reward skips the rollout, a non-finite loss or gradient skips the update; `max_bad_steps` of them
     in a row stop the run.
  6. the KL coefficient adapts towards `kl_target` (Ziegler et al. 2019) when one is set.
Checkpoints hold the trainable weights (policy adapters or weights, and the critic), the optimizer,
the schedule, the RNG, the prompt position, the KL coefficient and the running reward statistics, so
a resumed run samples and updates exactly as the uninterrupted one would.
"""

from __future__ import annotations

import copy
import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..data import ReadOptions, load_prompts
from ..data.records import text_of
from ..judges import RewardModelJudge, make_judge
from ..losses import ppo as P
from ..models.generate import SamplingConfig, encode_prompt, generate
from ..models.load import add_lora, is_peft, load_model, load_tokenizer_for, save_model
from ..models.logprobs import completion_logps, states_kl
from ..models.scalar import load_scalar_model, score_head
from ..models.scalar import token_scores as critic_token_scores
from ..runtime.determinism import disable_dropout
from ..runtime.memory import peak_memory_bytes
from .config import RLConfig
from .kl_monitor import build_monitor
from .loop import (
    BadSteps,
    KLBudget,
    LoopResult,
    RunLog,
    batch_indices,
    build_optimizer,
    checkpoint_or_stop,
    progress_bar,
    resume,
    update_bar,
)
from .offline import start_run


class ActorCritic(nn.Module):
    """The trainable whole: the policy and its critic (a value head on the policy's trunk, a separate
    scalar model, or none for rloo/grpo). One module so one optimizer and one checkpoint hold both."""

    def __init__(self, policy, value_head: nn.Module | None = None, critic_model=None):
        super().__init__()
        self.policy, self.value_head, self.critic_model = policy, value_head, critic_model

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

    def update(self, x: Tensor) -> None:
        n, m, v = x.numel(), float(x.mean()), float(x.var(unbiased=False)) if x.numel() > 1 else 0.0
        total = self.count + n
        delta = m - self.mean
        self.mean += delta * n / total
        self.var = (self.var * self.count + v * n + delta**2 * self.count * n / total) / total
        self.count = total


@dataclass
class RLState:
    step: int = 0
    position: int = 0
    skipped: int = 0
    moments: RunningMoments = field(default_factory=RunningMoments)


def _reference(cfg: RLConfig, policy):
    """(a context manager that makes the policy the reference, or a frozen copy, model copies held)."""
    strategy = cfg.reference if cfg.reference != "auto" else ("adapter" if cfg.lora else "copy")
    if strategy == "adapter":
        return strategy, None
    ref = copy.deepcopy(policy).requires_grad_(False).eval()  # before LoRA and before any update
    return strategy, ref


def shape_scores(cfg: RLConfig, raw: Tensor, ended: Tensor, lengths: Tensor, moments: RunningMoments) -> Tensor:
    """`lengths` (N,): completion tokens including EOS. Penalties first, then normalisation and clipping."""
    scores = raw.clone()
    if cfg.missing_eos_penalty is not None:
        scores = torch.where(ended, scores, scores - cfg.missing_eos_penalty)
    if cfg.min_new_tokens:
        # an EOS that came before min_new_tokens other tokens: the early-EOS collapse a strong KL
        # penalty invites (every token is a cost, ending is free), penalised in the score
        early = ended & (lengths - 1 < cfg.min_new_tokens)
        scores = torch.where(early, scores - cfg.early_eos_penalty, scores)
    if cfg.reward_norm == "batch" and scores.numel() > 1:
        scores = (scores - scores.mean()) / (scores.std() + 1e-8)
    elif cfg.reward_norm == "running":
        moments.update(scores)
        scores = (scores - moments.mean) / math.sqrt(moments.var + 1e-8)
    if cfg.reward_clip is not None:
        scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
    return scores


def advantages(cfg: RLConfig, scores: Tensor, old: Tensor, ref: Tensor, values: Tensor | None, mask: Tensor,
               kl_coef: float) -> tuple[Tensor, Tensor | None]:
    """(advantages (N, Tc), returns (N, Tc) for the critic or None) for the configured method."""
    k = cfg.samples_per_prompt
    # reward_k1 puts k1 in the reward; the loss_* penalties act in the loss (update step), not here
    kl = P.kl_k1(old, ref) * mask if cfg.kl_penalty == "reward_k1" else torch.zeros_like(old)
    if cfg.method == "ppo":
        rewards = P.kl_shaped_rewards(scores, kl, mask, kl_coef)
        adv, returns = P.gae(rewards, values, mask, cfg.gamma, cfg.lam)
        return (P.whiten(adv, mask) if cfg.whiten_advantages else adv), returns
    if cfg.method == "rloo":
        seq_adv = P.rloo_advantages(scores - kl_coef * kl.sum(-1), k)
    else:  # grpo: the group-normalised (KL-shaped, with reward_k1) score
        seq_adv = P.grpo_advantages(scores - kl_coef * kl.sum(-1), k)
    adv = seq_adv[:, None] * mask  # every token of a completion shares its sequence's advantage
    if cfg.method == "rloo" and cfg.whiten_advantages:
        adv = P.whiten(adv, mask)
    return adv, None


def minibatch_loss(cfg: RLConfig, new: dict[str, Tensor], old: Tensor, ref: Tensor, adv: Tensor, mask: Tensor,
                   kl_coef: float, full_kl: Tensor | None = None, old_values: Tensor | None = None,
                   returns: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """The loss of one minibatch, (B, Tc) tensors of its rows: the clipped surrogate, the clipped
    value loss where a critic learns `returns`, and kl_coef x the loss-side KL penalty (loss_k3,
    loss_full: `full_kl` is the exact per-position KL, differentiable). tests/test_kl_penalty.py
    enumerates outcomes through this function and `advantages`."""
    loss, stats = P.clipped_policy_loss(new["logps"], old, adv, mask, cfg.clip_range)
    row = {"ppo/policy_loss": loss.item(), **{f"ppo/{k}": float(v) for k, v in stats.items()}}
    if returns is not None:
        vf_loss, vf_stats = P.clipped_value_loss(new["values"].float(), old_values, returns, mask, cfg.clip_range_value)
        loss = loss + cfg.vf_coef * vf_loss
        row.update({"ppo/value_loss": vf_loss.item(), "ppo/value_clipfrac": float(vf_stats["value_clipfrac"])})
    if cfg.kl_penalty != "reward_k1":
        kl_term = P.masked_mean(P.kl_penalty_loss(cfg.kl_penalty, new["logps"], old, ref, mask, full_kl), mask)
        loss = loss + kl_coef * kl_term
        row["ppo/kl_loss"] = kl_term.item()
    return loss, row


def _extra(st: RLState, kl_ctl: P.KLController) -> dict:
    return {"skipped_steps": st.skipped, "kl_coef": kl_ctl.value, "moments": st.moments.__dict__}


def run_rl(cfg: RLConfig, log=print, progress: bool = True) -> LoopResult:
    out, device, autocast = start_run(cfg)

    tokenizer = load_tokenizer_for(cfg.model, cfg.trust_remote_code)
    policy = load_model(cfg.model, trust_remote_code=cfg.trust_remote_code, device=device,
                        quantize_4bit=cfg.quantize_4bit)
    disable_dropout(policy)
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    strategy, ref_model = _reference(cfg, policy)
    if cfg.lora_settings is not None:
        policy = add_lora(policy, cfg.lora_settings)
    judge = make_judge(cfg.reward, device)

    value_head, critic_model = None, None
    if cfg.method == "ppo" and cfg.critic == "value_head":
        value_head = nn.Linear(policy.config.get_text_config().hidden_size, 1).to(device)
        nn.init.zeros_(value_head.weight), nn.init.zeros_(value_head.bias)  # V = 0 until it learns
    elif cfg.method == "ppo":
        # a second model; from the reward model when there is one (InstructGPT), else from the policy
        source = judge.model_path if isinstance(judge, RewardModelJudge) else cfg.model
        critic_model = load_scalar_model(source, pad_token_id=tokenizer.pad_token_id, device=device)
        disable_dropout(critic_model)
        if cfg.lora_settings is not None:
            critic_model = add_lora(critic_model, cfg.lora_settings, "SEQ_CLS")
        score_head(critic_model).requires_grad_(True)
    ac = ActorCritic(policy, value_head, critic_model)

    prompts, problems = load_prompts(cfg.prompts, ReadOptions(format=cfg.format))
    if problems:
        (out / "prompts_problems.jsonl").write_text("".join(json.dumps(p.to_json()) + "\n" for p in problems))
        log(f"{cfg.prompts}: {len(problems)} bad rows set aside (first: {problems[0]})")
    if not prompts:
        raise ValueError(f"{cfg.prompts}: no usable prompts")
    prompt_ids = [encode_prompt(tokenizer, p, cfg.max_prompt_length) for p in prompts]
    sampling = SamplingConfig(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p)
    feed_ids = isinstance(judge, RewardModelJudge) and judge.shares_vocab(tokenizer)
    copies = 1 + (ref_model is not None) + (critic_model is not None) + (judge.kind == "reward_model")
    log(f"method {cfg.method}, {len(prompts)} prompts, reference {strategy}, critic "
        f"{'value head' if value_head is not None else 'model' if critic_model is not None else 'none'}, "
        f"reward {judge.kind}{' (on the sampled ids)' if feed_ids else ''}, "
        f"{'LoRA' if is_peft(policy) else 'full fine-tune'}, {copies} model copies, device {device.type}")

    params, optimizer, scheduler = build_optimizer(cfg, ac)
    st, kl_ctl = RLState(), P.KLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    saved = resume(cfg, ac, optimizer, scheduler, log)
    if saved is not None:
        st = RLState(saved["step"], saved["position"], saved.get("skipped_steps", 0), RunningMoments(**saved["moments"]))
        kl_ctl.value = saved["kl_coef"]
    runlog = RunLog(out, st.step if saved is not None else None)
    bar = progress_bar(cfg.max_steps, st.step, progress, cfg.method)
    t_start, total_tokens, last, stopped = time.perf_counter(), 0, {}, "max_steps"
    budget, guard = KLBudget(cfg, log), BadSteps(cfg.max_bad_steps, log)
    monitor = build_monitor(cfg, policy, ref_model if ref_model is not None else policy,
                            nullcontext if ref_model is not None else policy.disable_adapter, tokenizer,
                            cfg.prompts, device, autocast, log)

    ref_net = ref_model if ref_model is not None else policy
    ref_ctx = (lambda: policy.disable_adapter()) if ref_model is None else nullcontext  # noqa: E731

    def reference_pass(rows: dict[str, Tensor], n_prompt: int) -> tuple[Tensor, Tensor | None]:
        """The reference's log-probs (N, Tc) and, for loss_full, its states at the completion positions."""
        args = (rows["input_ids"], rows["attention_mask"], n_prompt, rows["completion_mask"])
        full = cfg.kl_penalty == "loss_full"
        with ref_ctx(), autocast():
            out = completion_logps(ref_net, *args, chunk_mb=cfg.logits_chunk_mb, temperature=cfg.temperature,
                                   hidden_out=full)
        states = out["hidden"][rows["completion_mask"].bool()].float() if full else None  # (N, H) row-major
        return out["logps"], states

    def exact_kl(new: dict[str, Tensor], m: Tensor, mb: Tensor, mask: Tensor, ref_states: Tensor) -> Tensor:
        """(B_mb, Tc) exact KL(pi || pi_ref) per completion position of a minibatch, differentiable in
        the policy. ref_states holds the reference's states of the whole rollout, row-major over its
        completion mask; `slot` finds each minibatch position's row there."""
        slot = torch.zeros(mask.shape, dtype=torch.long, device=device)
        slot[mask.bool()] = torch.arange(int(mask.sum()), device=device)
        sel = m.bool()
        with ref_ctx():  # the reference's own head (LoRA never adapts the head)
            flat = states_kl(policy, new["hidden"][sel].float(), ref_net, ref_states[slot[mb][sel]],
                             chunk_mb=cfg.logits_chunk_mb, temperature=cfg.temperature)
        return torch.zeros_like(m).index_put(sel.nonzero(as_tuple=True), flat)

    try:
        while st.step < cfg.max_steps:
            # ---- 1. rollout
            t0 = time.perf_counter()
            idx = batch_indices(st.position, cfg.batch_size, len(prompts), cfg.seed)
            st.position += 1
            rows_idx = [i for i in idx for _ in range(cfg.samples_per_prompt)]  # k consecutive samples per prompt
            roll = generate(policy, tokenizer, [prompt_ids[i] for i in rows_idx], sampling, device=device,
                            autocast=autocast, prompt_texts=[text_of(prompts[i]) for i in rows_idx])
            all_rows = roll.select(torch.arange(len(rows_idx)))
            mask = roll.completion_mask.float()

            # ---- 2. score (once per completion, on the sampled ids when the reward model shares the vocabulary)
            if feed_ids:
                raw = judge.score_ids(roll.input_ids, roll.attention_mask).float().to(device)
            else:
                raw = torch.tensor(judge.score([prompts[i] for i in rows_idx], roll.completion_texts), device=device)
            if not torch.isfinite(raw).all():
                # a judge that returned NaN/Inf: no advantage can be built from it; skip the rollout
                guard.bad(st.step + 1, f"{int((~torch.isfinite(raw)).sum())} non-finite rewards; rollout skipped")
                st.skipped += 1
                st.step += 1
                scheduler.step()
                runlog.write({"step": st.step, "skipped_steps": st.skipped})
                if checkpoint_or_stop(cfg, st.step, st.position, ac, optimizer, scheduler, _extra(st, kl_ctl),
                                      stopped, log):
                    break
                continue
            scores = shape_scores(cfg, raw, roll.ended.to(device), mask.sum(-1), st.moments)

            # ---- 3. the no-grad pass: old log-probs, entropy, values; reference log-probs
            with torch.no_grad():
                ac.eval()
                with autocast():
                    fwd = ac.forward_rows(all_rows, roll.n_prompt, cfg, entropy=True)
                old, entropy = fwd["logps"], fwd["entropy"]
                old_values = fwd["values"].float() * mask if "values" in fwd else None
                ref, ref_states = reference_pass(all_rows, roll.n_prompt)
                k1, k3 = P.kl_k1(old, ref) * mask, P.kl_k3(old, ref) * mask

                # ---- 4. advantages
                adv, returns = advantages(cfg, scores, old, ref, old_values, mask, kl_ctl.value)
            rollout_seconds = time.perf_counter() - t0

            # ---- 5. update
            t1 = time.perf_counter()
            ac.train()
            n_rows, stats, skipped_now = len(rows_idx), [], 0
            for _ in range(cfg.ppo_epochs):
                order = torch.randperm(n_rows)
                for mb in order.chunk(cfg.num_minibatches):
                    mb_dev = mb.to(device)
                    rows, m = roll.select(mb), mask[mb_dev]
                    with autocast():
                        new = ac.forward_rows(rows, roll.n_prompt, cfg, hidden=cfg.kl_penalty == "loss_full")
                    full = exact_kl(new, m, mb_dev, mask, ref_states) if cfg.kl_penalty == "loss_full" else None
                    loss, row = minibatch_loss(
                        cfg, new, old[mb_dev], ref[mb_dev], adv[mb_dev], m, kl_ctl.value, full,
                        None if returns is None else old_values[mb_dev], None if returns is None else returns[mb_dev])
                    grad_norm = torch.tensor(float("nan"))
                    if torch.isfinite(loss):
                        loss.backward()
                        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer_stepped = bool(torch.isfinite(grad_norm))
                    if optimizer_stepped:
                        optimizer.step()
                        guard.good()
                    else:
                        skipped_now += 1
                        what = "loss" if not torch.isfinite(loss) else "gradient"
                        guard.bad(st.step + 1, f"non-finite {what}; update skipped")
                    optimizer.zero_grad(set_to_none=True)
                    if optimizer_stepped:
                        stats.append({"loss": loss.item(), "grad_norm": float(grad_norm), **row})
            scheduler.step()
            update_seconds = time.perf_counter() - t1
            st.skipped += skipped_now

            # ---- 6. the KL coefficient, bookkeeping
            # the adaptive controller follows k3: unbiased like k1 on samples from the policy, and never negative
            kl_seq = k3.sum(-1)
            kl_ctl.update(float(kl_seq.mean()), n_rows)
            st.step += 1
            tokens = int(roll.attention_mask.sum())
            total_tokens += tokens
            seconds = rollout_seconds + update_seconds
            metrics = {
                "step": st.step, **{k: sum(s[k] for s in stats) / len(stats) for k in (stats[0] if stats else {})},
                "ppo/reward": float(raw.mean()), "ppo/reward_std": float(raw.std()) if n_rows > 1 else 0.0,
                "ppo/score": float(scores.mean()),
                "ppo/kl": float(kl_seq.mean()), "ppo/kl_k1": float(k1.sum(-1).mean()),
                "ppo/kl_k3": float(k3.sum(-1).mean()),
                "ppo/entropy": float(P.masked_mean(entropy, mask)), "ppo/kl_coef": kl_ctl.value,
                "ppo/completion_length": float(mask.sum(-1).mean()), "ppo/eos_rate": float(roll.ended.float().mean()),
                "ppo/rollout_seconds": rollout_seconds, "ppo/update_seconds": update_seconds,
                "ppo/generation_tokens_per_s": roll.tokens_per_s, "tokens_per_s": tokens / seconds,
                "step_seconds": seconds, "learning_rate": scheduler.get_last_lr()[0],
                "peak_memory_bytes": peak_memory_bytes(device), "skipped_steps": st.skipped,
            }
            if returns is not None:
                metrics["ppo/value_explained_var"] = P.explained_variance(old_values, returns, mask)
            measured = monitor is not None and monitor.due(st.step, cfg.max_steps)
            if measured:
                metrics.update(monitor.measure())
            if st.step % cfg.log_every == 0 or st.step == cfg.max_steps or measured:
                runlog.write(metrics)
            last = metrics
            update_bar(bar, st.step, f"reward {metrics['ppo/reward']:.3f} kl {metrics['ppo/kl']:.3f}")
            if "kl/policy_ref_token" in metrics and budget.over(metrics["kl/policy_ref_token"], st.step):
                stopped = "kl_budget"
            if checkpoint_or_stop(cfg, st.step, st.position, ac, optimizer, scheduler, _extra(st, kl_ctl), stopped, log):
                break
    finally:
        if bar is not None:
            bar[0].stop()
        runlog.close()

    save_model(policy, tokenizer, out / "final", base=cfg.model)
    result = LoopResult(st.step, stopped, st.skipped, time.perf_counter() - t_start, total_tokens, last)
    summary = {"method": cfg.method, "reference": strategy, "lora": is_peft(policy), "steps": result.steps,
               "stopped": result.stopped, "skipped_steps": result.skipped_steps, "wall_seconds": result.wall_seconds,
               "tokens": result.tokens, "tokens_per_s": result.tokens / result.wall_seconds if result.wall_seconds else None,
               "peak_memory_bytes": last.get("peak_memory_bytes"), "model_copies": copies,
               "reward": judge.kind, "final": last}
    (out / "run.json").write_text(json.dumps(summary, indent=2))
    log(f"saved {out / 'final'} ({result.steps} steps, {result.wall_seconds:.1f} s)")
    return result
