"""PPO with a critic (InstructGPT-style) as pure tensor functions: shaped rewards, GAE, value loss.

Same conventions as learner/algorithms.py: B samples, T completion tokens right-padded, `mask`
[B, T] marks real tokens, everything CPU-testable and free of DeepSpeed/Ray.
"""
from __future__ import annotations

import torch

from .algorithms import masked_mean


def kl_shaped_rewards(outcome: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """r_t = -beta * KL_t at every real token, plus the outcome reward at each sample's last real token.

    Rewards are constants to the policy, so the result is detached. A sample without real tokens
    gets no reward at all.
    """
    mask = mask.to(torch.float32)
    rewards = -beta * kl.detach().float() * mask
    pos = torch.arange(mask.size(1), device=mask.device).expand_as(mask)
    last = torch.where(mask > 0, pos, torch.full_like(pos, -1)).amax(1)    # -1: no real token
    has = last >= 0
    rewards[has.nonzero(as_tuple=True)[0], last[has]] += outcome.detach().float()[has]
    return rewards


@torch.no_grad()
def gae(
    token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016), backwards over tokens:

        delta_t = r_t + gamma V_{t+1} - V_t,   A_t = delta_t + gamma lam A_{t+1}
    with V and A taken as 0 after the last real token. Masked positions between real ones (the
    observations of a multi-turn sample) are skipped: t+1 is the next token the model sampled.
    Returns (advantages, returns = A + V), both 0 at masked positions. Targets, not differentiated:
    computed without grad.
    """
    mask = mask.to(torch.float32)
    r, v = token_rewards.float() * mask, values.float() * mask
    adv = torch.zeros_like(r)
    next_v = next_a = torch.zeros_like(r[:, 0])
    for t in range(r.size(1) - 1, -1, -1):
        delta = r[:, t] + gamma * next_v - v[:, t]
        a = (delta + gamma * lam * next_a) * mask[:, t]
        adv[:, t] = a
        # A masked t hands on what it was handed: zeros after the last real token (right padding),
        # the next model turn's value and advantage across an observation.
        real = mask[:, t] > 0
        next_v, next_a = torch.where(real, v[:, t], next_v), torch.where(real, a, next_a)
    return adv, (adv + v) * mask


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, reduce=None) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the real tokens (sample var, as TRL); padding stays 0.

    `reduce` sums [count, sum, sum of squares] over data-parallel ranks, so the statistics are the
    whole batch's; without it they are this tensor's.
    """
    mask = mask.to(x.dtype)
    stats = [float(mask.sum()), float((x * mask).sum()), float((x * x * mask).sum())]
    n, total, squares = reduce(stats) if reduce is not None else stats
    mean = total / max(n, 1.0)
    var = max(squares - n * mean * mean, 0.0) / max(n - 1.0, 1.0)
    return (x - mean) * (var + eps) ** -0.5 * mask


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
    clip_eps: float | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """0.5 * max((v - R)^2, (clip(v, v_old - eps, v_old + eps) - R)^2), masked token mean.

    The clipped term keeps the critic from moving far from the values the advantages were computed
    with; clip_eps=None is the plain squared error. Stats: fraction of tokens where the clipped term
    is (strictly) the larger, and the mean value.
    """
    mask = mask.to(values.dtype)
    err = (values - returns) ** 2
    stats: dict[str, torch.Tensor] = {"value_mean": masked_mean(values.detach(), mask)}
    if clip_eps is None:
        stats["value_clip_fraction"] = torch.zeros((), dtype=values.dtype)
        return 0.5 * masked_mean(err, mask), stats
    clipped_v = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    err_clipped = (clipped_v - returns) ** 2
    stats["value_clip_fraction"] = masked_mean((err_clipped > err).to(values.dtype), mask)
    return 0.5 * masked_mean(torch.maximum(err, err_clipped), mask), stats
