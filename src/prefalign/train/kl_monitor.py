"""The KL monitor: during training, every `kl_every` steps, the exact KL to the reference on
completions sampled for a fixed prompt set, measured as `prefalign eval` measures it (models/kl.py)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from contextlib import nullcontext

from ..config import Sampling
from ..models.generate import encode_prompt, generate
from ..models.kl import rollouts_kl


class KLMonitor:
    """Every `every` steps (and at the last), the exact KL of the policy to its reference on completions
    sampled for a fixed prompt set with a fixed seed: `kl/policy_ref_seq` (nats per sequence) and
    `kl/policy_ref_token` (the same total over the completion tokens)."""

    def __init__(self, policy, reference, tokenizer, prompts: list, *, every: int, max_new_tokens: int,
                 max_prompt_length: int, seed: int, device, autocast, chunk_mb: float, reference_ctx=nullcontext,
                 batch_size: int = 16):
        self.policy, self.reference, self.tokenizer, self.every = policy, reference, tokenizer, every
        self.ids = [encode_prompt(tokenizer, p, max_prompt_length) for p in prompts]
        self.sampling = Sampling(max_new_tokens=max_new_tokens)
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


def build_monitor(cfg, policy, reference, reference_ctx, tokenizer, prompts: list | Callable[[], list], device,
                  autocast, log: Callable[[str], None]) -> KLMonitor | None:
    """The run's monitor, or None when kl_every is 0. `reference` is the model the KL is taken to;
    `prompts` (or what reads them, called only when the monitor is on): the first kl_prompts are used."""

    every = auto_every(cfg.kl_every, cfg.max_steps, cfg.kl_budget)
    if every <= 0:
        return None
    prompts = prompts() if callable(prompts) else prompts
    if not prompts:
        log("KL monitor off: no prompts")
        return None
    # distinct prompts: an upsampled mixture repeats rows, and a repeated prompt adds no information
    prompts = list({json.dumps(p, sort_keys=True): p for p in prompts}.values())[:cfg.kl_prompts]
    log(f"KL monitor: exact KL to the reference on {len(prompts)} prompts x {cfg.kl_max_new_tokens} sampled "
        f"tokens every {every} steps")
    return KLMonitor(policy, reference, tokenizer, prompts, every=every, max_new_tokens=cfg.kl_max_new_tokens,
                     max_prompt_length=cfg.max_prompt_length, seed=cfg.seed, device=device, autocast=autocast,
                     chunk_mb=cfg.logits_chunk_mb, reference_ctx=reference_ctx)
