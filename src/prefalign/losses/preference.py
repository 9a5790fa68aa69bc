"""Offline preference losses: pure functions over per-sequence log-probabilities.

Vocabulary (STYLE.md): `policy_`/`ref_` x `chosen_`/`rejected_` x `logps` are *summed* log-probs of
the completion tokens, shape (B,); `chosen_lengths`/`rejected_lengths` are their token counts.
Each function returns (per-example loss (B,), metrics dict of (B,) tensors); the caller averages.
A function's parameters are exactly what it consumes: the tensors by name, then its own
hyperparameters, keyword-only, with the paper's defaults (train/methods.py passes each loss only the
tensors its signature names, and a method's config holds exactly these hyperparameters).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional

Metrics = dict[str, Tensor]


def _reward_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Metrics:
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {"rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
            "rewards/margins": chosen_rewards - rejected_rewards,
            "rewards/accuracy": (chosen_rewards > rejected_rewards).float()}


def _logratio_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps) -> Tensor:
    """h = log pi(y_w)/pi_ref(y_w) - log pi(y_l)/pi_ref(y_l)."""
    return (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)


def _implicit_rewards(beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps):
    return _reward_metrics(beta * (policy_chosen_logps - ref_chosen_logps),
                           beta * (policy_rejected_logps - ref_rejected_logps))


def dpo(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
        ref_rejected_logps: Tensor, *, beta: float = 0.1, label_smoothing: float = 0.0) -> tuple[Tensor, Metrics]:
    """Rafailov et al. 2023, eq. 7: -log sigma(beta * h).

    With label_smoothing eps > 0 this is conservative DPO (cDPO, Mitchell 2023): the preference label
    is assumed flipped with probability eps, giving -(1-eps) log sigma(beta h) - eps log sigma(-beta h).
    """
    logits = beta * _logratio_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    loss = -(1 - label_smoothing) * functional.logsigmoid(logits) - label_smoothing * functional.logsigmoid(-logits)
    return loss, _implicit_rewards(beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                   ref_rejected_logps)


def cdpo(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
         ref_rejected_logps: Tensor, *, beta: float = 0.1, label_smoothing: float = 0.1) -> tuple[Tensor, Metrics]:
    """Conservative DPO (Mitchell 2023): DPO with label smoothing, flip rate eps = 0.1 by default."""
    return dpo(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=beta,
               label_smoothing=label_smoothing)


def robust(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
           ref_rejected_logps: Tensor, *, beta: float = 0.1, label_smoothing: float = 0.1) -> tuple[Tensor, Metrics]:
    """Chowdhury et al. 2024 (rDPO), eq. 8: an unbiased loss under label-flip rate eps < 1/2:
    [-(1-eps) log sigma(beta h) + eps log sigma(-beta h)] / (1 - 2 eps)."""
    if not 0 <= label_smoothing < 0.5:
        raise ValueError("robust DPO needs a flip rate label_smoothing in [0, 0.5)")
    logits = beta * _logratio_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    loss = (-(1 - label_smoothing) * functional.logsigmoid(logits) + label_smoothing * functional.logsigmoid(-logits)) \
        / (1 - 2 * label_smoothing)
    return loss, _implicit_rewards(beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                   ref_rejected_logps)


def ipo(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
        ref_rejected_logps: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor, *,
        beta: float = 0.1) -> tuple[Tensor, Metrics]:
    """Azar et al. 2023, eq. 17: (h - 1/(2 tau))^2 with tau = beta, on length-normalised log-probs."""
    h = _logratio_margin(policy_chosen_logps / chosen_lengths, policy_rejected_logps / rejected_lengths,
                         ref_chosen_logps / chosen_lengths, ref_rejected_logps / rejected_lengths)
    loss = (h - 1 / (2 * beta)) ** 2
    return loss, _implicit_rewards(beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                   ref_rejected_logps)


def hinge(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
          ref_rejected_logps: Tensor, *, beta: float = 0.1) -> tuple[Tensor, Metrics]:
    """SLiC (Zhao et al. 2023) calibration loss on the reference-normalised margin: max(0, 1 - beta h)."""
    h = _logratio_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return torch.relu(1 - beta * h), _implicit_rewards(beta, policy_chosen_logps, policy_rejected_logps,
                                                       ref_chosen_logps, ref_rejected_logps)


def simpo(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, chosen_lengths: Tensor,
          rejected_lengths: Tensor, *, beta: float = 2.0, simpo_gamma: float = 0.5) -> tuple[Tensor, Metrics]:
    """Meng et al. 2024, eq. 6: -log sigma(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma), with
    the target reward margin gamma = simpo_gamma.
    Reference-free; the reward is the length-normalised log-prob scaled by beta."""
    chosen_rewards = beta * policy_chosen_logps / chosen_lengths
    rejected_rewards = beta * policy_rejected_logps / rejected_lengths
    loss = -functional.logsigmoid(chosen_rewards - rejected_rewards - simpo_gamma)
    return loss, _reward_metrics(chosen_rewards, rejected_rewards)


def orpo(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, chosen_lengths: Tensor,
         rejected_lengths: Tensor, *, beta: float = 0.1) -> tuple[Tensor, Metrics]:
    """Hong et al. 2024, eqs. 6-7: L_SFT + lambda * L_OR with lambda = beta, where
    L_OR = -log sigma(log odds(y_w) - log odds(y_l)), odds(y) = P(y)/(1 - P(y)) and
    P(y) = exp(mean token log-prob). Reference-free."""
    chosen_mean, rejected_mean = policy_chosen_logps / chosen_lengths, policy_rejected_logps / rejected_lengths
    # log odds = log p - log(1 - p); log1p(-exp(x)) is stable for x < 0 (clamped away from 0)
    log_odds = (chosen_mean - rejected_mean) - (
        torch.log1p(-torch.exp(chosen_mean.clamp(max=-1e-6))) - torch.log1p(-torch.exp(rejected_mean.clamp(max=-1e-6))))
    ratio_loss = -functional.logsigmoid(log_odds)
    nll = -chosen_mean
    metrics = _reward_metrics(beta * chosen_mean, beta * rejected_mean)
    metrics["orpo/log_odds_ratio"] = log_odds.detach()
    metrics["orpo/nll"] = nll.detach()
    return nll + beta * ratio_loss, metrics


def kto(policy_logps: Tensor, ref_logps: Tensor, labels: Tensor, kl: Tensor, *, beta: float = 0.1,
        desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> tuple[Tensor, Metrics]:
    """Ethayarajh et al. 2024, eq. 8, on unpaired examples.

    r = log pi(y|x) - log pi_ref(y|x); z0 = the batch KL reference point (the caller estimates it on
    mismatched prompt/completion pairs and passes it in; it carries no gradient here).
    desirable:   lambda_D (1 - sigma(beta (r - z0)))
    undesirable: lambda_U (1 - sigma(beta (z0 - r)))
    """
    z0 = kl.detach().clamp(min=0)
    r = policy_logps - ref_logps
    labels = labels.bool()
    loss = torch.where(labels, desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
                       undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))))
    reward = (beta * r).detach()
    metrics = {"rewards/desirable": torch.where(labels, reward, torch.nan),
               "rewards/undesirable": torch.where(labels, torch.nan, reward),
               "rewards/accuracy": torch.where(labels, reward > 0, reward < 0).float(),
               "kto/kl": z0.expand_as(r)}
    return loss, metrics


def rpo_nll(policy_chosen_logps: Tensor, chosen_lengths: Tensor) -> Tensor:
    """RPO (Pang et al. 2024, eq. 2): the length-normalised NLL of the chosen answer, added to a paired
    loss times `rpo_alpha` (train/offline.py)."""
    return -policy_chosen_logps / chosen_lengths


def sft(policy_logps: Tensor, lengths: Tensor, mean_length: Tensor | None = None) -> tuple[Tensor, Metrics]:
    """Supervised fine-tuning on completions only: the token-mean negative log-likelihood of the
    batch. Per example the loss is -log pi(y)/|y| weighted by |y|/mean|y|, so the batch mean of the
    returned (B,) tensor equals sum(-log p over all tokens) / (all tokens): long answers weigh by
    their tokens, as in a packed run. `mean_length`: mean|y| over the whole batch when this call
    sees one process's share of it (default: over `lengths`)."""
    loss = -policy_logps / (lengths.float().mean() if mean_length is None else mean_length)
    return loss, {"nll/token": (-policy_logps / lengths).detach(), "sft/tokens": lengths.detach()}


def bradley_terry(chosen_scores: Tensor, rejected_scores: Tensor, margins: Tensor | None = None, *,
                  margin_scale: float = 0.0) -> tuple[Tensor, Metrics]:
    """Reward-model loss: -log sigma(r(x, y_w) - r(x, y_l) - m) (Bradley and Terry 1952; Ouyang et al.
    2022, eq. 1; the margin m = margin_scale * the pair's known margin is Llama 2's, Touvron et al.
    2023, eq. 2)."""
    diff = chosen_scores - rejected_scores
    if margins is not None and margin_scale:
        diff = diff - margin_scale * margins
    metrics = {"reward_model/chosen": chosen_scores.detach(), "reward_model/rejected": rejected_scores.detach(),
               "reward_model/margin": (chosen_scores - rejected_scores).detach(),
               "reward_model/accuracy": (chosen_scores > rejected_scores).float().detach()}
    return -functional.logsigmoid(diff), metrics
