"""GRPO math against numbers worked by hand."""
import math

import torch

from learner.algorithms import ADVANTAGES, grpo_loss, kl_k3, grpo_outcome_advantages


def test_advantages_of_known_groups():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 4.0, 6.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    adv = grpo_outcome_advantages(rewards, groups, eps=0.0)
    # group 0: mean 0.5, sample std sqrt(4 * 0.25 / 3) = 0.57735 -> +-0.866025
    # group 1: mean 4, sample std 2 -> -1, 0, 1
    expected = torch.tensor([0.866025, -0.866025, -0.866025, 0.866025, -1.0, 0.0, 1.0])
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=0)
    assert ADVANTAGES["grpo"] is grpo_outcome_advantages


def test_equal_rewards_give_zero_advantages_and_no_nan():
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    adv = grpo_outcome_advantages(rewards, groups)
    assert torch.equal(adv, torch.zeros(6))
    logp = torch.log(torch.full((6, 3), 0.3)).requires_grad_()
    loss, stats = grpo_loss(logp, logp.detach(), logp.detach() - 0.1, adv, torch.ones(6, 3), 0.2, 0.04)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert all(torch.isfinite(v) for v in stats.values())


def test_k3_estimator_by_hand():
    # pi = 0.5, pi_ref = 0.25: r = 0.5 -> 0.5 - ln 0.5 - 1
    val = kl_k3(torch.tensor(math.log(0.5)), torch.tensor(math.log(0.25)))
    assert abs(val.item() - (0.5 - math.log(0.5) - 1)) < 1e-6
    assert kl_k3(torch.tensor(-1.3), torch.tensor(-1.3)).item() == 0.0


def test_loss_value_by_hand():
    # one sample, two tokens, ratio 1, A = 2, beta = 0: loss = -(1/2)(2 + 2) = -2
    logp = torch.tensor([[-1.0, -2.0]])
    loss, _ = grpo_loss(logp, logp, None, torch.tensor([2.0]), torch.ones(1, 2), 0.2, 0.0)
    assert abs(loss.item() + 2.0) < 1e-6
    # ratio e^0.5 = 1.6487 > 1.2 with A = 1: clipped to 1.2 -> loss = -1.2
    loss, stats = grpo_loss(logp + 0.5, logp, None, torch.tensor([1.0]), torch.ones(1, 2), 0.2, 0.0)
    assert abs(loss.item() + 1.2) < 1e-6 and stats["clip_fraction"].item() == 1.0


def test_gradient_coefficient_matches_the_seeds_formula():
    """For unclipped tokens d(-loss)/d logp_t = (A + beta (pi_ref/pi_theta - 1)) / (B |o_i|)."""
    torch.manual_seed(0)
    B, T, beta = 3, 4, 0.1
    logp = (torch.rand(B, T) * -2 - 0.1).requires_grad_()
    ref = logp.detach() + torch.randn(B, T) * 0.3
    adv = torch.tensor([0.7, -1.2, 0.0])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.float32)
    loss, _ = grpo_loss(logp, logp.detach(), ref, adv, mask, 0.2, beta)
    loss.backward()
    lengths = mask.sum(1, keepdim=True)
    coeff = adv[:, None] + beta * (torch.exp(ref - logp.detach()) - 1)
    expected = -coeff * mask / (B * lengths)
    torch.testing.assert_close(logp.grad, expected, atol=1e-6, rtol=1e-5)


def test_clipped_tokens_get_no_surrogate_gradient():
    B, T = 1, 4
    old = torch.full((B, T), -1.0)
    # ratios: 1.5 (A>0: clipped), 1.05 (inside), 0.5 (A>0: not clipped, min picks rho*A), 1.5
    shifts = torch.tensor([[math.log(1.5), math.log(1.05), math.log(0.5), math.log(1.5)]])
    logp = (old + shifts).requires_grad_()
    adv = torch.tensor([1.0])
    loss, stats = grpo_loss(logp, old, None, adv, torch.ones(B, T), 0.2, 0.0)
    loss.backward()
    ratio = torch.exp(shifts)[0]
    expected = torch.tensor([0.0, -ratio[1] / T, -ratio[2] / T, 0.0])
    torch.testing.assert_close(logp.grad[0], expected, atol=1e-6, rtol=1e-5)
    assert abs(stats["clip_fraction"].item() - 0.5) < 1e-6
    # negative advantage: the low side clips, the high side does not
    logp2 = (old + shifts).detach().requires_grad_()
    loss, _ = grpo_loss(logp2, old, None, torch.tensor([-1.0]), torch.ones(B, T), 0.2, 0.0)
    loss.backward()
    expected = torch.tensor([ratio[0] / T, ratio[1] / T, 0.0, ratio[3] / T])
    torch.testing.assert_close(logp2.grad[0], expected, atol=1e-6, rtol=1e-5)


def test_dr_grpo_and_rloo_advantages_by_hand():
    rewards, groups = torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.zeros(4, dtype=torch.long)
    torch.testing.assert_close(ADVANTAGES["dr_grpo"](rewards, groups), torch.tensor([0.5, -0.5, -0.5, 0.5]))
    # leave-one-out: 1 - (0 + 0 + 1) / 3 = 2/3, 0 - 2/3 = -2/3
    torch.testing.assert_close(ADVANTAGES["rloo"](rewards, groups), torch.tensor([2, -2, -2, 2]) / 3.0)


def test_k1_k2_by_hand():
    from learner.algorithms import KL_ESTIMATORS
    logp, ref = torch.tensor(math.log(0.5)), torch.tensor(math.log(0.25))
    assert abs(KL_ESTIMATORS["k1"](logp, ref).item() - math.log(2)) < 1e-6
    assert abs(KL_ESTIMATORS["k2"](logp, ref).item() - 0.5 * math.log(2) ** 2) < 1e-6


def test_aggregations_by_hand_and_their_gradients():
    from learner.algorithms import AGGREGATIONS
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert AGGREGATIONS["seq-mean-token-mean"](x, mask, 4).item() == 3.0      # (2 + 4) / 2
    assert AGGREGATIONS["token-mean"](x, mask, 4).item() == 2.5               # 10 / 4 tokens
    assert AGGREGATIONS["seq-mean-token-sum-norm"](x, mask, 4).item() == 1.25  # (6/4 + 4/4) / 2
    # ratio 1, beta 0: d loss / d logp_t = -A_i * (the token's weight in the aggregation)
    adv = torch.tensor([1.0, -2.0])
    weights = {"seq-mean-token-mean": torch.tensor([[1 / 6] * 3, [1 / 2, 0, 0]]),
               "token-mean": mask / 4, "seq-mean-token-sum-norm": mask / 8}
    for name, w in weights.items():
        logp = torch.full((2, 3), -1.0, requires_grad=True)
        loss, _ = grpo_loss(logp, logp.detach(), None, adv, mask, 0.2, 0.0, aggregation=name, norm_len=4)
        loss.backward()
        torch.testing.assert_close(logp.grad, -adv[:, None] * w, msg=name)


def test_clip_higher_widens_only_the_upper_bound():
    old = torch.full((1, 2), -1.0)
    shifts = torch.tensor([[math.log(1.25), math.log(0.75)]])
    for high, expected in ((None, [0.0, -0.75 / 2]), (0.28, [-1.25 / 2, -0.75 / 2])):
        logp = (old + shifts).requires_grad_()
        loss, _ = grpo_loss(logp, old, None, torch.tensor([1.0]), torch.ones(1, 2), 0.2, 0.0, clip_eps_high=high)
        loss.backward()
        torch.testing.assert_close(logp.grad[0], torch.tensor(expected))
    # negative advantage: ratio 0.75 < 1 - 0.2 is clipped whatever the upper bound
    logp = (old + shifts).requires_grad_()
    loss, _ = grpo_loss(logp, old, None, torch.tensor([-1.0]), torch.ones(1, 2), 0.2, 0.0, clip_eps_high=0.28)
    loss.backward()
    torch.testing.assert_close(logp.grad[0], torch.tensor([1.25 / 2, 0.0]))
