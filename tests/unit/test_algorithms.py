"""GRPO math against numbers worked by hand."""
import math

import pytest
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


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_equal_rewards_that_do_not_average_exactly_give_exact_zeros(name):
    """Three rewards of 0.9: their float32 mean is off by 6e-8, which over (std + eps) made ~0.05."""
    adv = ADVANTAGES[name](torch.tensor([0.9, 0.9, 0.9, 0.0, 1.0, 1.0]), torch.tensor([0, 0, 0, 1, 1, 1]))
    assert torch.equal(adv[:3], torch.zeros(3)) and bool((adv[3:] != 0).all())


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


def test_process_advantages_by_hand():
    from learner.algorithms import process_advantages
    # group 0 pools step rewards [1, 0 | 0, 1]: mean 0.5, sample std 0.57735 -> +-0.866025 (as above)
    # sample 0: +0.866 ends at 1, -0.866 ends at 3 -> t0,t1: 0; t2,t3: -0.866; t4: 0 (after the last step)
    # sample 1: -0.866 ends at 0, +0.866 ends at 7 (clamped to 4) -> t0: 0; t1..t4: +0.866
    # sample 2 (group 1) has no steps; sample 3 (group 2) has one step: std 0, reward - mean = 0
    a = 0.866025
    adv = process_advantages([[1.0, 0.0], [0.0, 1.0], [], [5.0]], [[1, 3], [0, 7], [], [2]],
                             torch.tensor([0, 0, 1, 2]), length=5)
    expected = torch.tensor([[0, 0, -a, -a, 0], [0, a, a, a, a], [0] * 5, [0] * 5], dtype=torch.float32)
    assert adv.dtype == torch.float32 and adv.shape == (4, 5)
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=0)
    # a group of equal step rewards (0.1 is not exact in binary) carries no signal: exact zeros
    adv = process_advantages([[0.1, 0.1], [0.1]], [[0, 1], [2]], torch.tensor([3, 3]), length=3)
    assert torch.equal(adv, torch.zeros(2, 3))


def test_dual_clip_caps_negative_advantage_tokens():
    # sample 0: A = -1, ratios 5, 2, 0.5; sample 1: A = +1, ratios 5, 1, 1; c = 3, eps = 0.2
    # s0: ratio 5 -> -min(-5, -1.2) = 5 > c|A| = 3: loss 3, no gradient (dual clip binds)
    #     ratio 2 -> -min(-2, -1.2) = 2 < 3: loss 2, gradient rho/(B T) = 2/6
    #     ratio 0.5 -> clipped to 0.8: loss 0.8, no gradient
    # s1: A > 0 untouched: ratio 5 clipped to 1.2 (no gradient), then -1, -1 (gradient -1/6 each)
    # loss = ((3 + 2 + 0.8) / 3 + (-1.2 - 1 - 1) / 3) / 2 = 0.433333
    old = torch.full((2, 3), -2.0)
    shifts = torch.log(torch.tensor([[5.0, 2.0, 0.5], [5.0, 1.0, 1.0]]))
    logp = (old + shifts).requires_grad_()
    loss, stats = grpo_loss(logp, old, None, torch.tensor([-1.0, 1.0]), torch.ones(2, 3), 0.2, 0.0, dual_clip=3.0)
    loss.backward()
    assert abs(loss.item() - 2.6 / 6) < 1e-5
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 2 / 6, 0.0], [0.0, -1 / 6, -1 / 6]]))
    assert abs(stats["dual_clip_fraction"].item() - 1 / 6) < 1e-6
    # without dual clip the ratio-5 token costs 5 and carries gradient 5/6
    logp2 = (old + shifts).requires_grad_()
    loss2, stats2 = grpo_loss(logp2, old, None, torch.tensor([-1.0, 1.0]), torch.ones(2, 3), 0.2, 0.0)
    loss2.backward()
    assert abs(loss2.item() - 4.6 / 6) < 1e-5 and abs(logp2.grad[0, 0].item() - 5 / 6) < 1e-5
    assert "dual_clip_fraction" not in stats2


def test_gspo_sequence_ratio_matches_the_sequence_objective():
    # s0: log-ratios 0.3, -0.1, 0.1 -> mean 0.1, s = e^0.1 = 1.10517 > 1.1: A = +1 clips, no gradient
    # s1: log-ratios 0.05, -0.01 (pad) -> mean 0.02, s = 1.02020 inside, A = -0.5
    # loss = (-1.1 * 1 + 1.0202013 * 0.5) / 2 = -0.29489934
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.7, -3.0]])
    shifts = torch.tensor([[0.3, -0.1, 0.1], [0.05, -0.01, 9.0]])   # 9.0 sits on padding: ignored
    adv = torch.tensor([1.0, -0.5])
    logp = (old + shifts).requires_grad_()
    loss, stats = grpo_loss(logp, old, None, adv, mask, 0.1, 0.0, ratio_level="sequence")
    loss.backward()
    assert abs(loss.item() - (-1.1 + 1.0202013 * 0.5) / 2) < 1e-5
    assert abs(stats["ratio_mean"].item() - (3 * math.exp(0.1) + 2 * math.exp(0.02)) / 5) < 1e-5
    assert abs(stats["clip_fraction"].item() - 3 / 5) < 1e-6
    # direct: s_i = exp(masked mean log-ratio) as one differentiable number per sequence
    logp_d = (old + shifts).requires_grad_()
    s = torch.exp(((logp_d - old) * mask).sum(1) / mask.sum(1))
    direct = -torch.minimum(s * adv, s.clamp(0.9, 1.1) * adv).mean()
    direct.backward()
    torch.testing.assert_close(loss, direct)
    torch.testing.assert_close(logp.grad, logp_d.grad)
    # by hand: d/dlogp_t = -A s / (B |o|) = 0.5 * 1.0202 / 4 on s1's real tokens
    torch.testing.assert_close(logp.grad[1], torch.tensor([0.127525, 0.127525, 0.0]), atol=1e-6, rtol=0)


def test_is_weights_scale_the_policy_gradient_not_the_kl():
    # ratio 1, A = 1, one sample of T = 3: d loss / d logp_t = (-w_t A + beta (1 - pi_ref/pi_theta)) / T
    logp0 = torch.tensor([[-1.0, -0.5, -2.0]])
    ref = torch.tensor([[-1.2, -0.4, -2.0]])
    w = torch.tensor([[0.5, 2.0, 1.0]])
    grads = []
    for weights in (None, w):
        logp = logp0.clone().requires_grad_()
        loss, _ = grpo_loss(logp, logp0, ref, torch.tensor([1.0]), torch.ones(1, 3), 0.2, 0.1, is_weights=weights)
        loss.backward()
        grads.append(logp.grad)
    kl_grad = 0.1 * (1 - torch.exp(ref - logp0)) / 3
    torch.testing.assert_close(grads[0], (-1.0 + 0.1 * (1 - torch.exp(ref - logp0))) / 3)
    torch.testing.assert_close(grads[1], -w / 3 + kl_grad)


def test_entropy_bonus_gradient_and_entropy_function():
    from learner.algorithms import entropy, entropy_from_logits
    torch.manual_seed(1)
    B, T, V, coef = 2, 3, 5, 0.01
    logits = torch.randn(B, T, V, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    ent = entropy(logits, chunk=2)
    logp = torch.full((B, T), -1.0)   # A = 0 and beta = 0: only the entropy term has a gradient
    loss, stats = grpo_loss(logp, logp, None, torch.zeros(B), mask, 0.2, 0.0, entropy=ent, entropy_coef=coef)
    loss.backward()
    # direct: dH/dz_v = -p_v (log p_v + H); token weights 1/(B |o_i|) = 1/6 and 1/2
    p, lp = torch.softmax(logits.detach(), -1), torch.log_softmax(logits.detach(), -1)
    H = -(p * lp).sum(-1)
    weight = (mask / (B * mask.sum(1, keepdim=True)))[..., None]
    torch.testing.assert_close(logits.grad, -coef * weight * (-p * (lp + H[..., None])))
    torch.testing.assert_close(ent.detach(), H)
    torch.testing.assert_close(entropy_from_logits(logits), H)
    assert abs(stats["entropy"].item() - (H[0].sum() + H[1, 0]).item() / 4) < 1e-6
    # a masked vocabulary entry (-inf) contributes 0 log 0 = 0, with a finite gradient
    z = torch.tensor([[0.0, 0.0, float("-inf")]], requires_grad=True)
    h = entropy(z)
    h.sum().backward()
    assert abs(h.item() - math.log(2)) < 1e-6 and torch.isfinite(z.grad).all()


def test_divergence_replaces_the_sampled_kl_in_the_loss():
    logp0 = torch.tensor([[-1.0, -0.5]])
    ref = torch.tensor([[-1.5, -0.5]])
    div = torch.tensor([[0.3, 0.1]], requires_grad=True)
    logp = logp0.clone().requires_grad_()
    loss, stats = grpo_loss(logp, logp0, ref, torch.tensor([1.0]), torch.ones(1, 2), 0.2, 0.5, divergence=div)
    loss.backward()
    # loss = -1 + 0.5 * mean(0.3, 0.1) = -0.9; logp sees only the surrogate, div sees beta / T
    assert abs(loss.item() + 0.9) < 1e-6
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.5, -0.5]]))
    torch.testing.assert_close(div.grad, torch.tensor([[0.25, 0.25]]))
    # stats["kl"] still reports k3 of the sampled tokens: (e^-0.5 + 0.5 - 1 + 0) / 2
    assert abs(stats["kl"].item() - (math.exp(-0.5) - 0.5) / 2) < 1e-6
    assert abs(stats["divergence"].item() - 0.2) < 1e-6


def test_tis_weights_and_overlong_penalty_by_hand():
    from learner.algorithms import overlong_penalty, tis_weights
    engine = torch.tensor([-1.0, -1.0, -1.0], requires_grad=True)
    old = engine.detach() + torch.log(torch.tensor([2.0, 0.5, 10.0]))
    w = tis_weights(old, engine, cap=5.0)
    torch.testing.assert_close(w, torch.tensor([2.0, 0.5, 5.0]))      # 10 truncated to the cap
    assert not w.requires_grad and w.dtype == torch.float32
    # max_len 10, buffer 4, factor 2: free up to 6; inside (6, 10]: (6 - L) / 4 * 2; beyond 10: -2
    pen = overlong_penalty(torch.tensor([3, 6, 7, 8, 10, 12]), max_len=10, buffer=4, factor=2.0)
    torch.testing.assert_close(pen, torch.tensor([0.0, 0.0, -0.5, -1.0, -2.0, -2.0]))


def test_aggregations_over_micro_batches_equal_one_pass_over_the_minibatch():
    """Gradient accumulation: micro losses with denom = units / micros, averaged (as DeepSpeed does),
    give the full minibatch's loss and gradient for every aggregation, empty rows included."""
    from learner.algorithms import AGGREGATIONS, aggregation_units
    torch.manual_seed(0)
    x = torch.randn(4, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.float32)
    for name, agg in AGGREGATIONS.items():
        full_x = x.clone().requires_grad_()
        full = agg(full_x, mask, 5)
        full.backward()
        parts_x = x.clone().requires_grad_()
        denom = aggregation_units(name, mask) / 2  # two micro-batches
        loss = sum(agg(parts_x[k:k + 2], mask[k:k + 2], 5, denom) for k in (0, 2)) / 2
        loss.backward()
        torch.testing.assert_close(loss, full, msg=name)
        torch.testing.assert_close(parts_x.grad, full_x.grad, msg=name)
        # and the hand-worked token-mean: 9 real tokens, each weighs 1/9
        if name == "token-mean":
            torch.testing.assert_close(full_x.grad, mask / 9)
