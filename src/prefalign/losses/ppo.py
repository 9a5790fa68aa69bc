"""The pieces of PPO-based RLHF as pure functions over (B, T) completion-aligned tensors.

Layout: every tensor here is aligned to the *completion* tokens of a rollout, right-padded:
column t is the t-th generated token, `mask[b, t]` is 1 for real tokens (up to and including EOS).
Whatever padding the prompt had during generation is gone by the time a tensor reaches this file,
so "the last real token" is simply the last column where the mask is 1.

References: Ziegler et al. 2019 (KL-shaped reward, adaptive KL controller), Schulman et al. 2016
(GAE), Schulman et al. 2017 (clipped surrogate), Huang et al. 2024 "The N+ implementation details of
RLHF with PPO" (whitening, value clipping, EOS handling), Ahmadian et al. 2024 (RLOO), Shao et al.
2024 (GRPO), Schulman 2020 "Approximating KL divergence" (the k1/k3 estimators), Tang & Munos 2025
"On a few pitfalls in KL divergence gradient estimation for RL" and Zhang et al. 2025 "On the design
of KL-regularized policy gradient algorithms for LLM reasoning" (which estimator belongs where).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

# Several processes each hold a share of a rollout: `reduce` sums a tensor over them (a no-op for
# one), so statistics of the whole rollout (whitening, score normalisation) are computed from the
# sums of every share, in the same two passes as for one process.
Reduce = Callable[[Tensor], Tensor]


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: Tensor, mask: Tensor) -> Tensor:
    """Unbiased variance of the masked entries (Bessel's correction, as the N-details reference does)."""
    mean = masked_mean(x, mask)
    n = mask.sum().clamp(min=2)
    return ((x - mean) ** 2 * mask).sum() / (n - 1)


def masked_moments(x: Tensor, mask: Tensor, reduce: Reduce | None = None) -> tuple[Tensor, Tensor]:
    """(mean, unbiased variance) of the masked entries of every process's share (`reduce`); with one
    process, masked_mean and masked_var."""
    if reduce is None:
        return masked_mean(x, mask), masked_var(x, mask)
    mask = mask.to(x.dtype)
    s = reduce(torch.stack([(x * mask).sum(), mask.sum()]))
    mean = s[0] / s[1].clamp(min=1)
    sq = reduce(((x - mean) ** 2 * mask).sum().reshape(1))[0]
    return mean, sq / (s[1].clamp(min=2) - 1)


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8, reduce: Reduce | None = None) -> Tensor:
    """(x - mean) / std over the masked entries (of every process's share, with `reduce`); with
    shift_mean=False the mean is added back (used for rewards, whose sign carries meaning). Padded
    entries come back as 0."""
    mean, var = masked_moments(x, mask, reduce)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def last_token_index(mask: Tensor) -> Tensor:
    """(B,) column of the last real token of each row: the largest t with mask[b, t] = 1."""
    cols = torch.arange(mask.shape[1], device=mask.device)
    return (cols * mask.long()).argmax(-1)


# ------------------------------------------------------------------ KL estimators


def kl_k1(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """log pi(y) - log pi_ref(y) on samples y ~ pi: unbiased for KL(pi || pi_ref), but a single term
    (and a small batch's sum) can be negative, and with top-k/top-p or a temperature mismatch the
    samples are not from pi at all, and the estimate is biased (negative on average, as seen in tests)."""
    return logps - ref_logps


def kl_k3(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """(r - 1) - log r with r = pi_ref(y)/pi(y): also unbiased on samples from pi (E[r] = 1), and
    non-negative term by term (x - 1 >= log x), so no batch can ever report a negative KL."""
    log_r = ref_logps - logps
    return torch.expm1(log_r) - log_r


KL_ESTIMATORS = {"k1": kl_k1, "k3": kl_k3}

# How the KL to the reference enters the objective. The penalty must have the expected gradient of
# KL(pi || pi_ref) of the sequence distribution; that is tested by exact enumeration
# (tests/test_kl_penalty.py). Each penalty is an estimator f_t of the per-position KL, and
#   grad E_{y~pi}[sum_t f_t] = E[sum_t grad f_t]  (pathwise: f differentiated in the loss)
#                            + E[sum_t grad log pi(y_t | s_t) * sum_{t' >= t} f_t']  (score function)
#   reward_k1  f = k1 = log pi - log pi_ref in the reward (Ziegler et al. 2019). E[grad k1_t] = 0, so
#              the score-function part, which the policy gradient supplies, is the whole gradient.
#   loss_k3    f = k3 in the loss (GRPO, Shao et al. 2024) plus its score-function part. k3 in the
#              loss alone has E[grad] = grad KL(pi_ref || pi) per position (the *reverse* KL, at states
#              sampled from pi); k3 as a detached reward alone has grad KL(pi||pi_ref) - grad KL(pi_ref||pi),
#              which vanishes to second order near pi_ref. Only the sum of the two parts is right
#              (Schulman 2020; Tang & Munos 2025; Zhang et al. 2025).
#   loss_full  f = the exact KL over the vocabulary at each position, differentiated, plus the score
#              function of the KL at later positions (this token changes the states that follow).
KL_PENALTIES = ("reward_k1", "loss_k3", "loss_full")


def reward_to_go(x: Tensor, mask: Tensor, include_current: bool = True) -> Tensor:
    """sum_{t' >= t} x_t' (or t' > t) per row, over real tokens; 0 on padding. (B, T) -> (B, T)."""
    x = x * mask
    total = x.flip(-1).cumsum(-1).flip(-1)
    return (total if include_current else total - x) * mask


def kl_penalty_loss(kind: str, logps: Tensor, old_logps: Tensor, ref_logps: Tensor, mask: Tensor,
                    full_kl: Tensor | None = None) -> Tensor:
    """The loss-side part of a `loss_*` penalty, per token (B, T), to be multiplied by kl_coef and
    averaged like the policy loss: f_t + rho_t * stopgrad(reward-to-go of f), rho_t = pi/pi_old (1 on
    the first epoch; its gradient is grad log pi). `logps` (and `full_kl` for loss_full) carry the
    gradient; old and reference log-probs do not. reward_k1 has no loss-side part: zeros."""
    if kind == "reward_k1":
        return torch.zeros_like(logps)
    ratio = torch.exp(logps - old_logps.detach())
    if kind == "loss_k3":
        f = kl_k3(logps, ref_logps.detach())
        future = reward_to_go(f.detach(), mask)  # k3_t depends on y_t itself: t' >= t
    elif kind == "loss_full":
        if full_kl is None:
            raise ValueError("loss_full needs the exact per-position KL (full_kl)")
        f = full_kl
        future = reward_to_go(f.detach(), mask, include_current=False)  # KL_t(s_t) is fixed before y_t
    else:
        raise ValueError(f"unknown kl_penalty {kind!r} (choose one of {', '.join(KL_PENALTIES)})")
    return (f + ratio * future) * mask


def kl_shaped_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token rewards r_t = -kl_coef * kl_t plus the sequence score at the last real token
    (Ziegler et al. 2019, eq. 2); `kl` (B, T) is the per-token penalty (k1 for reward_k1, 0 for the
    loss-side penalties). 0 on padding."""
    rewards = -kl_coef * kl * mask
    last = last_token_index(mask)
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last] += scores
    return rewards * mask


# ------------------------------------------------------------------ advantages


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16), masked.

    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, with V and A past the last
    real token taken as 0 (the episode ends there). Returns (advantages, returns = A + V), (B, T).
    """
    mask = mask.to(values.dtype)
    values = values * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = (delta + gamma * lam * next_adv) * mask[:, t]
        advantages[:, t] = adv
        # a padded column passes nothing back: the value and advantage after the end are 0
        next_value, next_adv = values[:, t] * mask[:, t], adv
    return advantages, (advantages + values) * mask


def rloo_advantages(rewards: Tensor, k: int) -> Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024, eq. 5): rewards (N*k,) grouped as k
    consecutive samples per prompt; A_i = r_i - mean of the other k-1 rewards of its prompt."""
    if k < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    r = rewards.view(-1, k)
    baseline = (r.sum(-1, keepdim=True) - r) / (k - 1)
    return (r - baseline).reshape(-1)


def grpo_advantages(rewards: Tensor, k: int, eps: float = 1e-4) -> Tensor:
    """GRPO's outcome supervision (Shao et al. 2024, §4.1.2): (r_i - mean(group)) / (std(group) + eps),
    std with Bessel's correction as the DeepSeekMath reference code does."""
    if k < 2:
        raise ValueError("GRPO needs at least 2 samples per prompt")
    r = rewards.view(-1, k)
    return ((r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True) + eps)).reshape(-1)


# ------------------------------------------------------------------ the methods' advantage estimators
# Each takes the shaped scores (N,), the per-token penalty kl (N, T) (k1 for reward_k1, zeros when the
# KL is in the loss), the critic's values (N, T) or None, the completion mask, the current kl_coef and
# its method's own hyperparameters (named as the config's fields); returns (advantages (N, T), returns
# (N, T) for a critic, or None).


def gae_estimator(scores: Tensor, kl: Tensor, values: Tensor | None, mask: Tensor, reduce: Reduce | None = None, *,
                  kl_coef: float, gae_gamma: float = 1.0, gae_lambda: float = 0.95,
                  whiten_advantages: bool = True) -> tuple[Tensor, Tensor]:
    """PPO: per-token KL-shaped rewards, GAE with the critic's values, whitened advantages over the
    whole rollout (the critic learns the unwhitened returns)."""
    adv, returns = gae(kl_shaped_rewards(scores, kl, mask, kl_coef), values, mask, gae_gamma, gae_lambda)
    return (whiten(adv, mask, reduce=reduce) if whiten_advantages else adv), returns


def rloo_estimator(scores: Tensor, kl: Tensor, values: Tensor | None, mask: Tensor, reduce: Reduce | None = None, *,
                   kl_coef: float, samples_per_prompt: int = 4, whiten_advantages: bool = True) -> tuple[Tensor, None]:
    """RLOO: the sequence reward score - kl_coef * sum_t kl_t against its leave-one-out baseline, shared
    by every token of the completion (a prompt's k samples are always in one process's share)."""
    adv = rloo_advantages(scores - kl_coef * kl.sum(-1), samples_per_prompt)[:, None] * mask
    return (whiten(adv, mask, reduce=reduce) if whiten_advantages else adv), None


def grpo_estimator(scores: Tensor, kl: Tensor, values: Tensor | None, mask: Tensor, reduce: Reduce | None = None, *,
                   kl_coef: float, samples_per_prompt: int = 4) -> tuple[Tensor, None]:
    """GRPO: the group-normalised score, shared by every token of the completion (per group only, and
    a group is never split over processes: `reduce` has nothing to do)."""
    return grpo_advantages(scores - kl_coef * kl.sum(-1), samples_per_prompt)[:, None] * mask, None


# ------------------------------------------------------------------ losses


def clipped_policy_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor,
                        clip: float = 0.2) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise:
    mean_t max(-A_t rho_t, -A_t clip(rho_t, 1-eps, 1+eps)), rho_t = pi(y_t)/pi_old(y_t)."""
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        metrics = {"clipfrac": masked_mean((clipped > unclipped).float(), mask),
                   # k3 of the update: how far the policy moved from the one that sampled (>= 0)
                   "approx_kl": masked_mean(torch.expm1(-log_ratio) + log_ratio, mask)}
    return loss, metrics


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
                       clip: float = 0.2) -> tuple[Tensor, dict[str, Tensor]]:
    """0.5 mean_t max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2) (the PPO2 baselines form)."""
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    unclipped_err, clipped_err = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_err, clipped_err), mask)
    with torch.no_grad():
        metrics = {"value_clipfrac": masked_mean((clipped_err > unclipped_err).float(), mask)}
    return loss, metrics


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 - Var(R - V) / Var(R): 1 is a perfect critic, 0 no better than a constant, < 0 worse."""
    var_r = masked_var(returns, mask)
    return float(1 - masked_var(returns - values, mask) / var_r) if var_r > 0 else float("nan")


# ------------------------------------------------------------------ KL coefficient


@dataclass
class KLController:
    """Fixed (target None) or adaptive KL coefficient (Ziegler et al. 2019, §2.2):
    e = clip(KL / target - 1, -0.2, 0.2);  beta <- beta (1 + K_beta e), K_beta = n_steps / horizon."""

    value: float
    target: float | None = None
    horizon: int = 10_000

    def update(self, kl: float, n_steps: int) -> float:
        if self.target is not None:
            error = min(max(kl / self.target - 1, -0.2), 0.2)
            self.value *= 1 + error * n_steps / self.horizon
        return self.value
