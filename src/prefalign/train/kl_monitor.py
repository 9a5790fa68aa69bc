"""The KL to the reference, measured the one way prefalign measures it (here and in `prefalign eval`):
sample completions from the policy, then sum the exact per-position KL(pi || pi_ref) over the full
vocabulary along each one. A single-sample log-ratio on the dataset's answers is no KL: under DPO's
likelihood displacement it goes negative while the policy moves away (README "Which KL").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext

import torch

from ..models.logprobs import completion_kl
from .rollout import Rollout, SamplingConfig, encode_prompt, generate


def kl_refusal(sampling: SamplingConfig) -> str | None:
    """Why the KL of what was sampled cannot be given, or None. Temperature is exact (both
    distributions are tempered); top-k/top-p truncation makes KL(processed pi || processed pi_ref)
    infinite wherever the reference's truncation drops a token the policy's keeps, and the KL of the
    untruncated distributions is not the KL of what was sampled."""
    if sampling.top_k or sampling.top_p < 1.0:
        return (f"not computed: top_k={sampling.top_k}/top_p={sampling.top_p} truncate the sampled distribution; "
                "sample with top_k 0 and top_p 1 to measure KL")
    if sampling.temperature <= 0:
        return "not computed: greedy decoding samples no distribution"
    return None


def kl_distribution(sampling: SamplingConfig) -> str:
    """What the reported KL is the KL of (eval.json `kl_distribution`)."""
    refusal = kl_refusal(sampling)
    if refusal:
        return refusal
    t = sampling.temperature
    return "softmax(logits)" if t == 1.0 else f"softmax(logits / {t:g})"


@torch.no_grad()
def rollouts_kl(policy, reference, rolls: list[Rollout], *, temperature: float = 1.0, chunk_mb: float = 128.0,
                reference_ctx=nullcontext, advance: Callable[[int], None] | None = None) -> dict:
    """Per-sequence exact KL (list), completion tokens and the policy's summed entropy over rollouts."""
    kl_seq, tokens, entropy = [], 0, 0.0
    for r in rolls:
        out = completion_kl(policy, reference, r.input_ids, r.attention_mask, r.n_prompt, r.completion_mask,
                            chunk_mb=chunk_mb, temperature=temperature, reference_ctx=reference_ctx)
        kl_seq += out["kl"].sum(-1).tolist()
        entropy += float(out["entropy"].sum())
        tokens += int(r.completion_mask.sum())
        if advance is not None:
            advance(len(r.completion_texts))
    return {"kl_seq": kl_seq, "tokens": tokens, "entropy_sum": entropy}


class KLMonitor:
    """Every `every` steps (and at the last), the exact KL of the policy to its reference on completions
    sampled for a fixed prompt set with a fixed seed: `kl/policy_ref_seq` (nats per sequence) and
    `kl/policy_ref_token` (the same total over the completion tokens)."""

    def __init__(self, policy, reference, tokenizer, prompts: list, *, every: int, max_new_tokens: int,
                 max_prompt_length: int, seed: int, device, autocast, chunk_mb: float, reference_ctx=nullcontext,
                 batch_size: int = 16):
        self.policy, self.reference, self.tokenizer, self.every = policy, reference, tokenizer, every
        self.ids = [encode_prompt(tokenizer, p, max_prompt_length) for p in prompts]
        self.sampling = SamplingConfig(max_new_tokens, 1.0, 0, 1.0)
        self.seed, self.device, self.autocast, self.chunk_mb = seed, device, autocast, chunk_mb
        self.reference_ctx, self.batch_size = reference_ctx, batch_size

    def due(self, step: int, max_steps: int) -> bool:
        return self.every > 0 and (step % self.every == 0 or step == max_steps)

    def measure(self) -> dict[str, float]:
        was_training = self.policy.training
        self.policy.eval()
        rolls = [generate(self.policy, self.tokenizer, self.ids[i:i + self.batch_size], self.sampling,
                          seed=self.seed * 1_000_003 + b, device=self.device, autocast=self.autocast)
                 for b, i in enumerate(range(0, len(self.ids), self.batch_size))]
        out = rollouts_kl(self.policy, self.reference, rolls, chunk_mb=self.chunk_mb, reference_ctx=self.reference_ctx)
        self.policy.train(was_training)
        total = sum(out["kl_seq"])
        return {"kl/policy_ref_seq": total / len(out["kl_seq"]), "kl/policy_ref_token": total / max(out["tokens"], 1)}


def auto_every(kl_every: int | None, max_steps: int, budget: float | None = None) -> int:
    """kl_every unset: about four measurements a run (and one at the end), twenty when a kl_budget
    is to be held; 0 turns the monitor off."""
    if kl_every is not None:
        return kl_every
    return max(1, math.ceil(max_steps / (20 if budget is not None else 4)))


def build_monitor(cfg, policy, reference, reference_ctx, tokenizer, prompts_path: str, device, autocast,
                  log: Callable[[str], None]) -> KLMonitor | None:
    """The run's monitor, or None when kl_every is 0. `reference` is the model the KL is taken to."""
    from ..data import ReadOptions, load_prompts

    every = auto_every(cfg.kl_every, cfg.max_steps, cfg.kl_budget)
    if every <= 0:
        return None
    prompts, _ = load_prompts(prompts_path, ReadOptions(format=cfg.format))
    if not prompts:
        log(f"KL monitor off: no prompts in {prompts_path}")
        return None
    prompts = prompts[:cfg.kl_prompts]
    log(f"KL monitor: exact KL to the reference on {len(prompts)} prompts x {cfg.kl_max_new_tokens} sampled "
        f"tokens every {every} steps")
    return KLMonitor(policy, reference, tokenizer, prompts, every=every, max_new_tokens=cfg.kl_max_new_tokens,
                     max_prompt_length=cfg.max_prompt_length, seed=cfg.seed, device=device, autocast=autocast,
                     chunk_mb=cfg.logits_chunk_mb, reference_ctx=reference_ctx)
