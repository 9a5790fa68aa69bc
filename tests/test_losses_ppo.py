"""PPO pieces against hand-computed values (arithmetic written out in each test)."""

import math

import pytest
import torch

from prefalign.losses import ppo as ppo_losses


def close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol)


def test_gae_by_hand_with_padding():
    # one row of 3 real tokens then padding; gamma 0.9, lambda 0.5
    r = torch.tensor([[1.0, 0.0, 2.0, 9.0]])
    v = torch.tensor([[0.5, 1.0, 1.5, 7.0]])  # the padded value (7) must be ignored
    m = torch.tensor([[1, 1, 1, 0]])
    adv, ret = ppo_losses.gae(r, v, m, gamma=0.9, lam=0.5)
    d2 = 2.0 + 0.9 * 0 - 1.5            # 0.5: the episode ends at t=2
    d1 = 0.0 + 0.9 * 1.5 - 1.0          # 0.35
    d0 = 1.0 + 0.9 * 1.0 - 0.5          # 1.4
    a2 = d2
    a1 = d1 + 0.9 * 0.5 * a2            # 0.35 + 0.225 = 0.575
    a0 = d0 + 0.9 * 0.5 * a1            # 1.4 + 0.25875 = 1.65875
    assert close(adv, [[a0, a1, a2, 0.0]])
    assert close(ret, [[a0 + 0.5, a1 + 1.0, a2 + 1.5, 0.0]])


def test_gae_lambda_one_gamma_one_is_reward_to_go_minus_value():
    r = torch.tensor([[0.1, -0.2, 1.0]])
    v = torch.tensor([[0.3, 0.2, 0.4]])
    adv, ret = ppo_losses.gae(r, v, torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert close(ret, [[0.9, 0.8, 1.0]])  # Monte Carlo returns
    assert close(adv, [[0.6, 0.6, 0.6]])


def test_kl_shaped_rewards_put_the_score_on_the_last_real_token():
    logp = torch.tensor([[-1.0, -2.0, -1.0], [-0.5, -0.5, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, -9.0], [-1.0, -0.5, -0.5]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])  # row 0 ended after 2 tokens
    kl = ppo_losses.kl_k1(logp, ref) * mask
    rewards = ppo_losses.kl_shaped_rewards(torch.tensor([3.0, 5.0]), kl, mask, kl_coef=0.1)
    # k1 = logp - ref: row 0 [0.5, -1.0, (pad)], row 1 [0.5, 0, 0]
    assert close(kl, [[0.5, -1.0, 0.0], [0.5, 0.0, 0.0]])
    assert close(rewards, [[-0.05, 0.1 + 3.0, 0.0], [-0.05, 0.0, 5.0]])


def test_last_token_index_for_ragged_rows():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    assert ppo_losses.last_token_index(mask).tolist() == [2, 0, 4]


def test_k1_can_go_negative_in_aggregate_k3_cannot():
    # a batch where the sampled tokens happen to be likelier under the reference
    logp = torch.tensor([-2.0, -1.5, -0.2])
    ref = torch.tensor([-1.0, -1.0, -0.3])
    k1, k3 = ppo_losses.kl_k1(logp, ref), ppo_losses.kl_k3(logp, ref)
    assert float(k1.sum()) < 0  # -1.0 - 0.5 + 0.1 = -1.4
    r = torch.exp(ref - logp)
    assert close(k3, (r - 1) - torch.log(r))
    assert close(k3[0], math.e - 1 - 1.0)  # r = e: (e - 1) - 1
    assert (k3 >= 0).all()


def test_k1_and_k3_are_unbiased_for_the_true_kl():
    p = torch.tensor([0.7, 0.2, 0.1])
    q = torch.tensor([0.5, 0.3, 0.2])
    exact = float((p * (p / q).log()).sum())
    gen = torch.Generator().manual_seed(0)
    y = torch.multinomial(p, 200_000, replacement=True, generator=gen)
    lp, lq = p.log()[y], q.log()[y]
    assert abs(float(ppo_losses.kl_k1(lp, lq).mean()) - exact) < 3e-3
    assert abs(float(ppo_losses.kl_k3(lp, lq).mean()) - exact) < 3e-3


def test_whiten_masked():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    m = torch.tensor([[1, 1, 1, 0]])
    w = ppo_losses.whiten(x, m)
    # mean 2, unbiased variance ((1)+(0)+(1))/2 = 1
    assert close(w, [[-1.0, 0.0, 1.0, 0.0]], 1e-4)
    assert close(ppo_losses.whiten(x, m, shift_mean=False), [[1.0, 2.0, 3.0, 0.0]], 1e-4)


def test_clipped_policy_loss_by_hand():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    loss, m = ppo_losses.clipped_policy_loss(new, old, adv, torch.ones(1, 3), clip=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(0.5, 0.8) = 0.8 (clipped);
    # token 2: max(-2.2, -2.2) = -2.2
    assert close(loss, (-1.2 + 0.8 - 2.2) / 3)
    assert close(m["clipfrac"], 2 / 3)


def test_clipped_value_loss_by_hand():
    v, old, ret = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.0]]), torch.tensor([[2.0, 1.0]])
    loss, _ = ppo_losses.clipped_value_loss(v, old, ret, torch.ones(1, 2), clip=0.2)
    # token 0: unclipped (1-2)^2 = 1, clipped (0.7-2)^2 = 1.69 -> 1.69; token 1: (0-1)^2 = 1 both
    assert close(loss, 0.5 * (1.69 + 1.0) / 2)


def test_rloo_and_grpo_baselines_by_hand():
    r = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])  # two prompts, k = 3
    assert close(ppo_losses.rloo_advantages(r, 3), [1 - 2.5, 2 - 2.0, 3 - 1.5, 0 - 3.0, 0 - 3.0, 6 - 0.0])
    g = ppo_losses.grpo_advantages(r, 3, eps=0.0)
    # group 1: mean 2, std 1; group 2: mean 2, std sqrt(12) = 3.4641
    assert close(g, [-1.0, 0.0, 1.0, -2 / 12**0.5, -2 / 12**0.5, 4 / 12**0.5], 1e-5)
    with pytest.raises(ValueError):
        ppo_losses.rloo_advantages(r, 1)


def test_adaptive_kl_controller_follows_ziegler():
    ctl = ppo_losses.KLController(0.2, target=6.0, horizon=10_000)
    # KL 9 is 50% over target: error clipped to 0.2; multiplier 1 + 0.2 * 256 / 10000
    assert close(ctl.update(9.0, 256), 0.2 * (1 + 0.2 * 256 / 10_000))
    ctl = ppo_losses.KLController(0.2, target=6.0, horizon=1000)
    assert close(ctl.update(5.4, 100), 0.2 * (1 + (-0.1) * 100 / 1000))  # 5.4/6 - 1 = -0.1
    fixed = ppo_losses.KLController(0.2)
    assert fixed.update(100.0, 256) == 0.2


def test_explained_variance():
    ret = torch.tensor([[1.0, 2.0, 3.0]])
    assert ppo_losses.explained_variance(ret, ret, torch.ones(1, 3)) == pytest.approx(1.0)
    assert ppo_losses.explained_variance(torch.full((1, 3), 2.0), ret, torch.ones(1, 3)) == pytest.approx(0.0)
