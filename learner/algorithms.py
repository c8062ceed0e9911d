"""GRPO as pure tensor functions: advantages, the clipped surrogate, the KL estimator.

Nothing here knows about DeepSpeed, Ray or devices; tests check every function on CPU against
numbers worked by hand. Shapes: B samples, T completion tokens (right-padded, `mask` marks real ones).
"""
from __future__ import annotations

from typing import Callable

import torch

ADVANTAGES: dict[str, Callable[..., torch.Tensor]] = {}
KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {}


def register(table: dict, name: str):
    def wrap(fn):
        table[name] = fn
        return fn
    return wrap


def _per_group(rewards: torch.Tensor, group_ids: torch.Tensor, fn) -> torch.Tensor:
    rewards = rewards.to(torch.float32)
    adv = torch.zeros_like(rewards)
    for g in torch.unique(group_ids):
        idx = group_ids == g
        adv[idx] = fn(rewards[idx])
    return adv


@register(ADVANTAGES, "grpo")
def grpo_outcome_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """A_i = (r_i - mean(r_group)) / (std(r_group) + eps), one value per sample (DeepSeekMath sec. 4.1.2).

    std is the sample standard deviation (Bessel-corrected), as TRL and verl compute it. A group whose
    rewards are all equal gets zero advantages: it carries no signal, and must not carry NaN.
    """
    def one(r):
        std = r.std(unbiased=True) if r.numel() > 1 else torch.zeros((), dtype=r.dtype)
        return (r - r.mean()) / (std + eps)
    return _per_group(rewards, group_ids, one)


@register(ADVANTAGES, "dr_grpo")
def dr_grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Dr.GRPO: A_i = r_i - mean(r_group), no division by the std (which favours easy/hard groups)."""
    return _per_group(rewards, group_ids, lambda r: r - r.mean())


@register(ADVANTAGES, "rloo")
def rloo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RLOO: A_i = r_i - mean_{j != i} r_j = G/(G-1) (r_i - mean(r_group)); zero for a group of one."""
    def one(r):
        G = r.numel()
        return (r - r.mean()) * (G / (G - 1)) if G > 1 else torch.zeros_like(r)
    return _per_group(rewards, group_ids, one)


@register(KL_ESTIMATORS, "k1")
def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """log(pi_theta / pi_ref): unbiased, can be negative per token."""
    return logp - ref_logp


@register(KL_ESTIMATORS, "k2")
def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """0.5 * log(pi_theta / pi_ref)^2: biased, low variance, >= 0."""
    return 0.5 * (logp - ref_logp) ** 2


@register(KL_ESTIMATORS, "k3")
def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token D_KL(pi_theta || pi_ref) ~ pi_ref/pi_theta - log(pi_ref/pi_theta) - 1 (unbiased, >= 0)."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1.0


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


AGGREGATIONS: dict[str, Callable[..., torch.Tensor]] = {}


@register(AGGREGATIONS, "seq-mean-token-mean")
def agg_seq_mean_token_mean(x: torch.Tensor, mask: torch.Tensor, norm_len: int) -> torch.Tensor:
    """The GRPO paper's 1/G sum_i 1/|o_i| sum_t: every sequence weighs the same."""
    return masked_mean(x, mask, dim=1).mean()


@register(AGGREGATIONS, "token-mean")
def agg_token_mean(x: torch.Tensor, mask: torch.Tensor, norm_len: int) -> torch.Tensor:
    """DAPO: every token weighs the same, so long sequences count more."""
    return masked_mean(x, mask)


@register(AGGREGATIONS, "seq-mean-token-sum-norm")
def agg_seq_mean_token_sum_norm(x: torch.Tensor, mask: torch.Tensor, norm_len: int) -> torch.Tensor:
    """Dr.GRPO: sum over tokens divided by a constant (the generation budget), mean over sequences."""
    return ((x * mask.to(x.dtype)).sum(1) / norm_len).mean()


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    beta: float,
    kl_estimator: str = "k3",
    clip_eps_high: float | None = None,
    aggregation: str = "seq-mean-token-mean",
    norm_len: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO objective of DeepSeekMath eq. 3, negated to a loss.

    loss = 1/B sum_i 1/|o_i| sum_t [ -min(rho A_i, clip(rho, 1-eps, 1+eps) A_i) + beta * KL_t ]
    with rho = pi_theta / pi_old per token. `advantages` is [B] (outcome) or [B, T] (per token).
    `clip_eps_high` (DAPO's clip-higher) widens the upper bound; `aggregation` picks how tokens are
    averaged (AGGREGATIONS). Returns the loss and detached statistics for logging.
    """
    mask = mask.to(logp.dtype)
    adv = advantages if advantages.dim() == 2 else advantages[:, None].expand_as(logp)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = torch.exp(logp - old_logp)
    surr = ratio * adv
    surr_clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high) * adv
    per_token = -torch.minimum(surr, surr_clipped)
    stats: dict[str, torch.Tensor] = {}
    if ref_logp is not None:
        kl = KL_ESTIMATORS[kl_estimator](logp, ref_logp)
        stats["kl"] = masked_mean(kl.detach(), mask)
        if beta:
            per_token = per_token + beta * kl
    # The clipped branch is the one taken (strictly), so the token gets no surrogate gradient.
    clipped = (surr_clipped < surr).to(logp.dtype)
    loss = AGGREGATIONS[aggregation](per_token, mask, norm_len or mask.size(1))
    stats["clip_fraction"] = masked_mean(clipped, mask)
    stats["ratio_mean"] = masked_mean(ratio.detach(), mask)
    return loss, stats


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log pi(target) at each position from [B, T, V] logits, in float32."""
    logits = logits.float()
    return torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


@torch.no_grad()
def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of pi at each position (logged, never differentiated)."""
    logits = logits.float()
    logz = torch.logsumexp(logits, dim=-1)
    return logz - (torch.softmax(logits, dim=-1) * logits).sum(-1)
