"""Preference losses against values worked by hand (the arithmetic is written out) and closed-form properties."""

import inspect
import math

import pytest
import torch

from prefalign.losses.preference import cdpo, dpo, hinge, ipo, kto, orpo, robust, rpo_nll, simpo
from prefalign.train.methods import METHODS


def call(fn, tensors, **hyperparameters):
    # a loss takes exactly the tensors its signature names (train/methods.py `Method.compute`)
    wanted = inspect.signature(fn).parameters
    return fn(**{k: v for k, v in tensors.items() if k in wanted}, **hyperparameters)

T = torch.tensor
# One example: policy chosen/rejected -10/-14, reference -11/-12, lengths 4 and 8.
PC, PR, RC, RR = T([-10.0]), T([-14.0]), T([-11.0]), T([-12.0])
LC, LR = T([4.0]), T([8.0])
ARGS = dict(policy_chosen_logps=PC, policy_rejected_logps=PR, ref_chosen_logps=RC, ref_rejected_logps=RR,
            chosen_lengths=LC, rejected_lengths=LR)
# h = (-10 - -11) - (-14 - -12) = 1 - (-2) = 3
H = 3.0


def sig(x):
    return 1 / (1 + math.exp(-x))


def close(t, value):
    assert abs(float(t) - value) < 1e-6, (float(t), value)


def test_dpo_hand_value_and_rewards():
    loss, m = call(dpo, ARGS, beta=0.5)
    close(loss, -math.log(sig(0.5 * H)))  # -log sigma(1.5) = 0.2014132
    close(loss, 0.20141327)
    close(m["rewards/chosen"], 0.5 * 1)
    close(m["rewards/rejected"], 0.5 * -2)
    close(m["rewards/margins"], 1.5)
    close(m["rewards/accuracy"], 1.0)


def test_cdpo_and_label_smoothing_zero_equals_dpo():
    eps = 0.2
    loss, _ = call(cdpo, ARGS, beta=0.5, label_smoothing=eps)
    close(loss, -(1 - eps) * math.log(sig(1.5)) - eps * math.log(sig(-1.5)))
    l0, _ = call(dpo, ARGS, beta=0.5, label_smoothing=0.0)
    lc0, _ = call(cdpo, ARGS, beta=0.5, label_smoothing=0.0)
    close(l0, float(lc0))


def test_robust_hand_value_and_unbiasedness():
    eps = 0.2
    loss, _ = call(robust, ARGS, beta=0.5, label_smoothing=eps)
    close(loss, (-(1 - eps) * math.log(sig(1.5)) + eps * math.log(sig(-1.5))) / (1 - 2 * eps))
    # Unbiased under flips: E over a label flipped w.p. eps equals the clean DPO loss (Chowdhury et al. Lemma 3.1)
    swapped = dict(ARGS, policy_chosen_logps=PR, policy_rejected_logps=PC, ref_chosen_logps=RR, ref_rejected_logps=RC)
    lf, _ = call(robust, swapped, beta=0.5, label_smoothing=eps)
    clean, _ = call(dpo, ARGS, beta=0.5)
    close((1 - eps) * loss + eps * lf, float(clean))
    with pytest.raises(ValueError):
        call(robust, ARGS, label_smoothing=0.5)


def test_ipo_length_normalised_hand_value():
    # h_norm = (-10/4 - -11/4) - (-14/8 - -12/8) = 0.25 - (-0.25) = 0.5; tau = 0.1 -> target 5
    loss, _ = call(ipo, ARGS, beta=0.1)
    close(loss, (0.5 - 5.0) ** 2)  # 20.25


def test_hinge_hand_value():
    close(call(hinge, ARGS, beta=0.1)[0], 1 - 0.3)  # max(0, 1 - 0.1 * 3)
    close(call(hinge, ARGS, beta=1.0)[0], 0.0)


def test_simpo_hand_value():
    # beta/|y| log pi: 2 * -10/4 = -5 ; 2 * -14/8 = -3.5 ; margin -1.5 - gamma 0.5 = -2
    loss, m = call(simpo, ARGS, beta=2.0, simpo_gamma=0.5)
    close(loss, -math.log(sig(-2.0)))
    close(m["rewards/chosen"], -5.0)
    close(m["rewards/accuracy"], 0.0)


def test_orpo_hand_value():
    # mean logps: -2.5 and -1.75; log odds(y) = m - log(1 - e^m)
    lo_c = -2.5 - math.log(1 - math.exp(-2.5))
    lo_r = -1.75 - math.log(1 - math.exp(-1.75))
    loss, m = call(orpo, ARGS, beta=0.1)
    close(m["orpo/log_odds_ratio"], lo_c - lo_r)
    close(loss, 2.5 + 0.1 * -math.log(sig(lo_c - lo_r)))


def test_kto_hand_values():
    policy, ref = T([-5.0, -6.0]), T([-6.0, -5.0])  # r = +1, -1
    labels, kl = T([True, False]), T(0.5)
    loss, m = kto(policy, ref, labels, kl, beta=0.2, desirable_weight=1.0, undesirable_weight=2.0)
    close(loss[0], 1 - sig(0.2 * (1 - 0.5)))
    close(loss[1], 2 * (1 - sig(0.2 * (0.5 - -1))))
    # a negative KL estimate is clamped to 0
    loss_neg, _ = kto(policy, ref, labels, T(-3.0), beta=0.2)
    close(loss_neg[0], 1 - sig(0.2))
    assert m["rewards/accuracy"].tolist() == [1.0, 1.0]


def test_rpo_nll_term():
    loss, _ = call(dpo, ARGS, beta=0.5)
    nll = rpo_nll(ARGS["policy_chosen_logps"], ARGS["chosen_lengths"])
    close(nll, 2.5)
    close(loss + 0.5 * nll, -math.log(sig(1.5)) + 0.5 * 2.5)


PAIRED_REF = ["dpo", "cdpo", "robust", "ipo", "hinge"]


@pytest.mark.parametrize("name", PAIRED_REF + ["simpo", "orpo"])
def test_swapping_chosen_and_rejected_flips_the_margin(name):
    fn = METHODS[name].loss
    _, m = call(fn, ARGS)
    swapped = dict(ARGS, policy_chosen_logps=PR, policy_rejected_logps=PC, ref_chosen_logps=RR,
                   ref_rejected_logps=RC, chosen_lengths=LR, rejected_lengths=LC)
    _, ms = call(fn, swapped)
    close(ms["rewards/margins"], -float(m["rewards/margins"]))


@pytest.mark.parametrize("name", PAIRED_REF + ["simpo", "orpo"])
def test_gradient_moves_chosen_up_and_rejected_down(name):
    pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    # a point where no loss is saturated (hinge: beta * h < 1)
    loss, _ = call(METHODS[name].loss, dict(ARGS, policy_chosen_logps=pc, policy_rejected_logps=pr), beta=0.1)
    loss.sum().backward()
    assert pc.grad.item() < 0 < pr.grad.item(), name  # descent raises log pi(chosen), lowers rejected


def test_kto_gradient_signs():
    policy = T([-5.0, -5.0], requires_grad=True)
    loss, _ = kto(policy, T([-5.0, -5.0]), T([True, False]), T(0.0))
    loss.sum().backward()
    assert policy.grad[0] < 0 < policy.grad[1]


def test_dpo_at_reference_is_log2():
    loss, _ = dpo(RC, RR, RC, RR, beta=0.1)
    close(loss, math.log(2))
