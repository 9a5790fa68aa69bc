"""The KL penalty must penalise KL: by exact enumeration of every outcome, the expected gradient of
each configured penalty, through the trainer's own `advantages` and `minibatch_loss` (train/ppo.py),
equals grad KL(pi || pi_ref) of the sequence distribution; the old detached-k3 reward and GRPO's
pathwise-only k3 loss do not."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch

from prefalign.losses import ppo as ppo_losses
from prefalign.models.logps import completion_logps, completion_states, states_kl
from prefalign.train.config import RLConfig
from prefalign.train.methods import make_config
from prefalign.train.ppo import advantages, minibatch_loss


def rl_config(method: str, penalty: str) -> RLConfig:
    """The configuration under which the equality is exact: undiscounted returns with no critic
    baseline (gamma = lam = 1, values 0) and advantages not whitened. (With lam < 1 and a critic, or
    whitening, the KL inherits the same bias and scaling as the score: docs/rlhf.md, "Which KL".)"""
    return make_config(model="m", output="o", prompts="p", reward="r", method=method, kl_penalty=penalty,
                       samples_per_prompt=1 if method == "ppo" else 2,
                       **({} if method == "grpo" else {"whiten_advantages": False}),
                       **({"gae_gamma": 1.0, "gae_lambda": 1.0} if method == "ppo" else {}))


def trainer_loss(cfg: RLConfig, logp: torch.Tensor, ref: torch.Tensor, full_kl: torch.Tensor | None = None):
    """The loss train/ppo.py builds for a rollout of rows (N, T) on its first update (ratio 1), with
    score 0 and kl_coef 1: its own `advantages` and `minibatch_loss`."""
    mask = torch.ones_like(logp)
    old = logp.detach()
    values = torch.zeros_like(old) if cfg.method == "ppo" else None
    adv, _ = advantages(cfg, torch.zeros(logp.shape[0], dtype=logp.dtype), old, ref, values, mask, 1.0)
    loss, _ = minibatch_loss(cfg, {"logps": logp}, old, ref, adv, mask, 1.0, full_kl)
    return loss


def old_loss(old_way: str, logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """The two pitfalls, built from the same pieces: "reward_k3" (a detached k3 reward, prefalign's old
    default) and "pathwise_k3" (k3 differentiated in the loss alone, GRPO's term)."""
    mask = torch.ones_like(logp)
    old = logp.detach()
    kl = ppo_losses.kl_k3(old, ref) * mask if old_way == "reward_k3" else torch.zeros_like(old)
    rewards = ppo_losses.kl_shaped_rewards(torch.zeros(logp.shape[0], dtype=logp.dtype), kl, mask, 1.0)
    adv, _ = ppo_losses.gae(rewards, torch.zeros_like(rewards), mask, gamma=1.0, lam=1.0)
    loss, _ = ppo_losses.clipped_policy_loss(logp, old, adv, mask, clip=0.2)
    return loss + (ppo_losses.masked_mean(ppo_losses.kl_k3(logp, ref), mask) if old_way == "pathwise_k3" else 0.0)


CONFIGS = [("ppo", k) for k in ppo_losses.KL_PENALTIES] + [("rloo", k) for k in ppo_losses.KL_PENALTIES] + \
          [("grpo", "loss_k3"), ("grpo", "loss_full")]


# ------------------------------------------------------------------ a categorical policy (one token)


def _categorical(seed: int, scale: float):
    g = torch.Generator().manual_seed(seed)
    theta = (scale * torch.randn(5, generator=g, dtype=torch.float64)).requires_grad_(True)
    ref = torch.log_softmax(scale * torch.randn(5, generator=g, dtype=torch.float64), -1)
    return theta, ref


def _expected_grad(theta, ref, cfg: RLConfig | None = None, old_way: str | None = None) -> torch.Tensor:
    """E over every joint outcome of the rollout's rows (1 for ppo, the k = 2 samples of one prompt for
    rloo/grpo) of the gradient of the trainer's loss."""
    logp_all = torch.log_softmax(theta, -1)
    probs = logp_all.detach().exp()
    full_all = (logp_all.exp() * (logp_all - ref)).sum()  # exact KL at the one state
    n = 1 if cfg is None else cfg.samples_per_prompt
    total = torch.zeros((), dtype=torch.float64)
    for ys in itertools.product(range(5), repeat=n):
        logp, r = logp_all[list(ys)].view(n, 1), ref[list(ys)].view(n, 1)
        loss = old_loss(old_way, logp, r) if old_way else trainer_loss(cfg, logp, r, full_all.expand(n, 1))
        total = total + math.prod(float(probs[y]) for y in ys) * loss
    return torch.autograd.grad(total, theta)[0]


def _kl_grad(theta, ref) -> torch.Tensor:
    logp = torch.log_softmax(theta, -1)
    return torch.autograd.grad((logp.exp() * (logp - ref)).sum(), theta)[0]


@pytest.mark.parametrize("method,penalty", CONFIGS)
@pytest.mark.parametrize("scale", [0.3, 1.5])
def test_each_penalty_has_the_gradient_of_the_kl_on_a_categorical(method, penalty, scale):
    theta, ref = _categorical(0, scale)
    got = _expected_grad(theta, ref, rl_config(method, penalty))
    assert torch.allclose(got, _kl_grad(theta, ref), atol=1e-10, rtol=0)


def test_the_old_detached_k3_reward_and_the_pathwise_k3_loss_do_not():
    theta, ref = _categorical(0, 1.5)
    want = _kl_grad(theta, ref)
    for old_way in ("reward_k3", "pathwise_k3"):
        got = _expected_grad(theta, ref, old_way=old_way)
        assert (got - want).norm() > 0.2 * want.norm(), old_way
    # pathwise k3 alone is the gradient of the *reverse* KL(pi_ref || pi)
    logp = torch.log_softmax(theta, -1)
    reverse = torch.autograd.grad((ref.exp() * (ref - logp)).sum(), theta)[0]
    assert torch.allclose(_expected_grad(theta, ref, old_way="pathwise_k3"), reverse, atol=1e-10)


# ------------------------------------------------------------------ a tiny LM, two generated tokens


@pytest.fixture(scope="module")
def lm_pair():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    # GPT-2 in float64 end to end (Llama's RMSNorm computes in float32 whatever the weights, which
    # leaves ~3e-6 of rounding in these gradients); the comparison below is then exact to ~1e-13
    cfg = GPT2Config(vocab_size=6, n_embd=16, n_layer=1, n_head=2, n_positions=16, tie_word_embeddings=False,
                     attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    policy = GPT2LMHeadModel(cfg).double().eval()
    with torch.no_grad():
        policy.lm_head.weight.mul_(20.0)  # peaked next-token distributions, so the KL below is not tiny
    ref = copy.deepcopy(policy).requires_grad_(False)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return policy, ref


def _lm_expected_grads(policy, ref, penalty: str, old_way=None):
    """(E[grad surrogate] * T, grad KL_seq) over all V^2 completions of a fixed prompt."""
    V, T = policy.config.vocab_size, 2
    ys = torch.tensor(list(itertools.product(range(V), repeat=T)))  # (V^2, T)
    ids = torch.cat([torch.tensor([[1, 2]]).expand(len(ys), 2), ys], 1)  # [prompt | completion]
    attn, cmask = torch.ones_like(ids), torch.ones_like(ys)
    logp = completion_logps(policy, ids, attn, 2, cmask)["logps"]  # (V^2, T), with grad
    with torch.no_grad():
        ref_logp = completion_logps(ref, ids, attn, 2, cmask)["logps"]
        ref_states = completion_states(ref, ids, attn, 2, cmask)
    full = states_kl(policy, completion_states(policy, ids, attn, 2, cmask), ref, ref_states).view(len(ys), T)
    params = [p for p in policy.parameters() if p.requires_grad]
    seq = logp.sum(-1)
    kl = (seq.exp() * (seq - ref_logp.sum(-1))).sum()  # KL of the sequence distribution, exact
    want = torch.autograd.grad(kl, params, retain_graph=True)
    probs = seq.detach().exp()
    cfg = rl_config("ppo", penalty)
    total = sum(probs[i] * (old_loss(old_way, logp[i:i + 1], ref_logp[i:i + 1]) if old_way else
                            trainer_loss(cfg, logp[i:i + 1], ref_logp[i:i + 1], full[i:i + 1]))
                for i in range(len(ys)))
    got = torch.autograd.grad(total * T, params)  # the token mean divides by T
    flat = lambda gs: torch.cat([g.reshape(-1) for g in gs])  # noqa: E731
    return flat(got), flat(want), kl.item()


@pytest.mark.parametrize("kind", ppo_losses.KL_PENALTIES)
def test_each_penalty_has_the_gradient_of_the_sequence_kl_on_a_tiny_lm(lm_pair, kind):
    got, want, kl = _lm_expected_grads(*lm_pair, kind)
    assert kl > 0.05  # far enough from the reference for a wrong estimator to show
    assert torch.allclose(got, want, atol=1e-6, rtol=0), float((got - want).abs().max())


def test_the_old_detached_k3_reward_fails_on_the_tiny_lm(lm_pair):
    got, want, _ = _lm_expected_grads(*lm_pair, "reward_k1", old_way="reward_k3")
    assert (got - want).norm() > 0.1 * want.norm()


def test_loss_full_without_the_future_term_is_a_partial_gradient(lm_pair):
    """The exact per-position KL differentiated alone misses that a token changes the states after it
    (Tang & Munos 2025): dropping the score-function term breaks equality."""
    policy, ref = lm_pair
    original = ppo_losses.reward_to_go
    ppo_losses.reward_to_go = lambda x, mask, include_current=True: torch.zeros_like(x)
    try:
        got, want, _ = _lm_expected_grads(policy, ref, "loss_full")
    finally:
        ppo_losses.reward_to_go = original
    assert (got - want).norm() > 0.05 * want.norm()
