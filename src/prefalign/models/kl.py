"""The KL to the reference, measured the one way prefalign measures it (the training monitor and
`prefalign eval` both call this): sample completions from the policy, then sum the exact per-position
KL(pi || pi_ref) over the full vocabulary along each one. A single-sample log-ratio on the dataset's
answers is no KL: under DPO's likelihood displacement it goes negative while the policy moves away
(docs/rlhf.md, "Which KL").
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch

from ..config import Sampling
from .generate import Rollout
from .logps import completion_kl


def kl_refusal(sampling: Sampling) -> str | None:
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


def kl_distribution(sampling: Sampling) -> str:
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
