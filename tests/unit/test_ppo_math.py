"""PPO-with-critic math against numbers worked by hand."""
import torch

from learner.ppo_math import gae, kl_shaped_rewards, masked_whiten, value_loss


def test_kl_shaped_rewards_by_hand():
    # beta 0.1: -0.1 * kl on real tokens, outcome added at the last real token, padding 0
    kl = torch.tensor([[1.0, 2.0, 3.0], [0.5, 9.0, 9.0], [4.0, 4.0, 4.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    r = kl_shaped_rewards(torch.tensor([1.0, -1.0, 7.0]), kl, mask, beta=0.1)
    expected = torch.tensor([[-0.1, -0.2, 0.7], [-1.05, 0.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(r, expected)


def test_gae_with_gamma_lam_one_is_reward_to_go_minus_value():
    torch.manual_seed(0)
    r, v = torch.randn(3, 5), torch.randn(3, 5)
    mask = torch.tensor([[1.0] * 5, [1.0, 1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
    adv, ret = gae(r, v, mask, gamma=1.0, lam=1.0)
    to_go = (r * mask).flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(adv, (to_go - v) * mask)
    torch.testing.assert_close(ret, to_go * mask)


def test_gae_by_hand():
    # gamma 0.9, lam 0.8 (gamma lam = 0.72); r = (0, 0, 1), V = (0.5, 0.4, 0.6), then padding
    # delta_2 = 1 - 0.6 = 0.4                 A_2 = 0.4
    # delta_1 = 0.9 * 0.6 - 0.4 = 0.14        A_1 = 0.14 + 0.72 * 0.4 = 0.428
    # delta_0 = 0.9 * 0.4 - 0.5 = -0.14       A_0 = -0.14 + 0.72 * 0.428 = 0.16816
    r = torch.tensor([[0.0, 0.0, 1.0, 5.0]])
    v = torch.tensor([[0.5, 0.4, 0.6, 3.0]])
    adv, ret = gae(r, v, torch.tensor([[1.0, 1.0, 1.0, 0.0]]), gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, torch.tensor([[0.16816, 0.428, 0.4, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.66816, 0.828, 1.0, 0.0]]))


def test_masked_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    # real tokens 1, 2, 3, 4: mean 2.5, sample var 5/3
    w = masked_whiten(x, mask)
    expected = torch.tensor([[-1.5, -0.5, 0.5], [1.5, 0.0, 0.0]]) / (5 / 3) ** 0.5
    torch.testing.assert_close(w, expected)


def test_value_loss_clipping_by_hand():
    # old 1, eps 0.2 -> v clipped into [0.8, 1.2]
    # t0: v 1.5, R 2:   (1.5-2)^2 = 0.25, (1.2-2)^2 = 0.64 -> 0.64, clipped term binds: no gradient
    # t1: v 0.9, R 0:   inside the clip: 0.81 both, not counted as clipped; gradient 0.5 * 2 * 0.9 / 4
    # t2: v 1.1, R 1.1: 0
    # t3: v 1.5, R 1.3: (0.2)^2 = 0.04 > (1.2-1.3)^2 = 0.01 -> unclipped; gradient 0.5 * 2 * 0.2 / 4
    # loss = 0.5 * (0.64 + 0.81 + 0 + 0.04) / 4 = 0.18625; padding ignored
    values = torch.tensor([[1.5, 0.9, 1.1, 1.5, 7.0]], requires_grad=True)
    old = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0]])
    ret = torch.tensor([[2.0, 0.0, 1.1, 1.3, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    loss, stats = value_loss(values, old, ret, mask, clip_eps=0.2)
    loss.backward()
    assert abs(loss.item() - 0.18625) < 1e-6
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 0.225, 0.0, 0.05, 0.0]]))
    assert abs(stats["value_clip_fraction"].item() - 0.25) < 1e-6
    assert abs(stats["value_mean"].item() - 5.0 / 4) < 1e-6
    # unclipped: 0.5 * (0.25 + 0.81 + 0 + 0.04) / 4 = 0.1375
    loss, stats = value_loss(values, old, ret, mask, clip_eps=None)
    assert abs(loss.item() - 0.1375) < 1e-6 and stats["value_clip_fraction"].item() == 0.0


def test_whitening_split_over_ranks_equals_whitening_the_batch():
    """Two ranks each whiten their shard with statistics summed over both: the batch's result."""
    torch.manual_seed(1)
    x = torch.randn(4, 6)
    mask = (torch.rand(4, 6) > 0.3).float()
    whole = masked_whiten(x, mask)
    halves = [(x[:2], mask[:2]), (x[2:], mask[2:])]

    def stats(t, m):
        return [float(m.sum()), float((t * m).sum()), float((t * t * m).sum())]

    summed = [a + b for a, b in zip(stats(*halves[0]), stats(*halves[1]))]
    parts = torch.cat([masked_whiten(t, m, reduce=lambda _: summed) for t, m in halves])
    torch.testing.assert_close(parts, whole)
    assert abs(float((whole * mask).sum())) < 1e-4  # zero mean over real tokens


def test_gae_skips_observation_tokens_of_a_multi_turn_sample():
    """Masked positions between model tokens (a tool's output) are skipped: the advantages of the
    model's tokens equal GAE over the model's tokens alone, and the outcome reaches the first turn."""
    rewards = torch.tensor([[0.0, 0.0, 9.0, 9.0, 1.0]])  # what observations hold must not matter
    values = torch.tensor([[0.2, 0.4, 5.0, 5.0, 0.6]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    alone, alone_ret = gae(rewards[:, [0, 1, 4]], values[:, [0, 1, 4]], torch.ones(1, 3), gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv[:, [0, 1, 4]], alone)
    torch.testing.assert_close(ret[:, [0, 1, 4]], alone_ret)
    assert adv[0, 2] == adv[0, 3] == 0 and adv[0, 0] != 0
