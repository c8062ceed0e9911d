"""GRPO as pure tensor functions: advantages, the clipped surrogate, the KL estimator.

Nothing here knows about DeepSpeed, Ray or devices; tests check every function on CPU against
numbers worked by hand. Shapes: B samples, T completion tokens (right-padded, `mask` marks real ones).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

ADVANTAGES: dict[str, Callable[..., torch.Tensor]] = {}
KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {}


def register(table: dict, name: str):
    def wrap(fn):
        table[name] = fn
        return fn
    return wrap


def _per_group(rewards: torch.Tensor, group_ids: torch.Tensor, fn) -> torch.Tensor:
    """fn per group; a group whose rewards are all equal gets exact zeros (no signal), not the mean's
    roundoff over (std + eps): three rewards of 0.9 in float32 gave ~0.05, a spurious gradient."""
    rewards = rewards.to(torch.float32)
    adv = torch.zeros_like(rewards)
    for g in torch.unique(group_ids):
        idx = group_ids == g
        r = rewards[idx]
        if bool(r.max() != r.min()):
            adv[idx] = fn(r)
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


def process_advantages(
    step_rewards: list[list[float]], step_ends: list[list[int]], group_ids: torch.Tensor, length: int,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Process supervision (DeepSeekMath sec. 4.1.3): [B, length] per-token advantages.

    Sample i has steps k with reward r_ik ending at token step_ends[i][k] (0-based, ascending; ends
    past the completion are clamped to length - 1). Every step reward of a group is normalized by the
    group's pooled step rewards, r~ = (r - mean) / (std + eps) (sample std as in "grpo"), and
        A_it = sum_{k : end_ik >= t} r~_ik
    so tokens after the last step, and samples without steps, get 0.
    """
    B = len(step_rewards)
    adv = torch.zeros(B, length, dtype=torch.float32)
    gids = group_ids.tolist()
    for g in set(gids):
        members = [i for i in range(B) if gids[i] == g]
        pooled = torch.tensor([r for i in members for r in step_rewards[i]], dtype=torch.float64)
        # Equal rewards carry no signal: exact zeros, not (roundoff of the mean) / eps.
        if pooled.numel() == 0 or bool(pooled.max() == pooled.min()):
            continue
        std = pooled.std(unbiased=True) if pooled.numel() > 1 else pooled.new_zeros(())
        normed = ((pooled - pooled.mean()) / (std + eps)).tolist()
        pos = 0
        for i in members:
            n = len(step_rewards[i])
            if len(step_ends[i]) != n:
                raise ValueError(f"sample {i}: {n} step rewards but {len(step_ends[i])} step ends")
            if n:
                ends = torch.tensor(step_ends[i], dtype=torch.long).clamp(0, length - 1)
                at_end = torch.zeros(length, dtype=torch.float64)
                at_end.index_add_(0, ends, torch.tensor(normed[pos:pos + n], dtype=torch.float64))
                # Reverse cumsum: token t collects every step that ends at or after it.
                adv[i] = at_end.flip(0).cumsum(0).flip(0).to(torch.float32)
            pos += n
    return adv


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

# Each aggregation is a sum over units (tokens or sequences) divided by how many there are. `denom`
# overrides that count: with gradient accumulation and data parallelism the learner passes the
# minibatch's global count / (accumulation steps x ranks), so the update equals one pass over the minibatch.


def _nonempty(mask: torch.Tensor) -> torch.Tensor:
    return (mask.sum(1) > 0).to(mask.dtype)


def aggregation_units(name: str, mask: torch.Tensor) -> float:
    """How many units `name` averages over in `mask`: tokens for token-mean, else sequences with a token."""
    return float(mask.sum()) if name == "token-mean" else float(_nonempty(mask).sum())


@register(AGGREGATIONS, "seq-mean-token-mean")
def agg_seq_mean_token_mean(x: torch.Tensor, mask: torch.Tensor, norm_len: int, denom: float | None = None) -> torch.Tensor:
    """The GRPO paper's 1/G sum_i 1/|o_i| sum_t: every sequence weighs the same (empty ones not counted)."""
    total = masked_mean(x, mask, dim=1).sum()
    return total / (denom if denom is not None else _nonempty(mask).sum().clamp(min=1.0))


@register(AGGREGATIONS, "token-mean")
def agg_token_mean(x: torch.Tensor, mask: torch.Tensor, norm_len: int, denom: float | None = None) -> torch.Tensor:
    """DAPO: every token weighs the same, so long sequences count more."""
    total = (x * mask.to(x.dtype)).sum()
    return total / (denom if denom is not None else mask.sum().clamp(min=1.0))


@register(AGGREGATIONS, "seq-mean-token-sum-norm")
def agg_seq_mean_token_sum_norm(x: torch.Tensor, mask: torch.Tensor, norm_len: int, denom: float | None = None) -> torch.Tensor:
    """Dr.GRPO: sum over tokens divided by a constant (the generation budget), mean over sequences."""
    total = ((x * mask.to(x.dtype)).sum(1) / norm_len).sum()
    return total / (denom if denom is not None else _nonempty(mask).sum().clamp(min=1.0))


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
    *,
    dual_clip: float | None = None,
    ratio_level: str = "token",
    is_weights: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    divergence: torch.Tensor | None = None,
    denom: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO objective of DeepSeekMath eq. 3, negated to a loss.

    loss = 1/B sum_i 1/|o_i| sum_t [ -w_t min(rho A_i, clip(rho, 1-eps, 1+eps) A_i) + beta * KL_t - c_H H_t ]
    with rho = pi_theta / pi_old per token. `advantages` is [B] (outcome) or [B, T] (per token).
    `clip_eps_high` (DAPO's clip-higher) widens the upper bound; `aggregation` picks how tokens are
    averaged (AGGREGATIONS). Returns the loss and detached statistics for logging. Options (all off
    by default):

    - dual_clip = c > 1 (Dual-clip PPO, Ye et al. 2020): for A < 0 the per-token loss is capped,
      min(-min(rho A, clip(rho) A), -c A), so a huge ratio on a bad token cannot blow up the step.
    - ratio_level = "sequence" (GSPO, Zheng et al. 2025): rho is the length-normalized sequence
      ratio s_i = exp(1/|o_i| sum_t (logp - old_logp)), clipped as a whole. Written in the GSPO-token
      form s_it = sg[s_i] * pi_t / sg[pi_t]: its value is s_i at every token, its gradient flows per
      token. Sequence ratios sit near 1, so clip_eps is tiny there (the paper uses 3e-4 / 4e-4).
    - is_weights [B, T] (truncated importance sampling, see tis_weights): multiply the policy-gradient
      term only, not the KL or entropy terms; detached here.
    - entropy [B, T] (differentiable, see `entropy`) with entropy_coef: a bonus -c_H * H_t per token.
    - denom: the count of units (tokens or sequences, see aggregation_units) to divide by instead of
      this batch's own; the learner passes the minibatch's global count / (accumulation steps x ranks).
    - divergence [B, T]: a precomputed per-token divergence (learner/divergences.py) that replaces the
      sampled KL estimator in the loss; stats["kl"] still reports the estimator when ref_logp is given.
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    mask = mask.to(logp.dtype)
    adv = advantages if advantages.dim() == 2 else advantages[:, None].expand_as(logp)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    # Padding may hold anything (even -inf); keep it out of the sequence mean.
    log_ratio = torch.where(mask > 0, logp - old_logp, torch.zeros_like(logp))
    if ratio_level == "token":
        ratio = torch.exp(log_ratio)
    elif ratio_level == "sequence":
        seq_log_ratio = masked_mean(log_ratio, mask, dim=1).detach()
        # logp - sg[logp] is 0 in value and 1 in gradient: value s_i, gradient s_i per token.
        grad_only = torch.where(mask > 0, logp - logp.detach(), torch.zeros_like(logp))
        ratio = torch.exp(seq_log_ratio[:, None] + grad_only)
    else:
        raise ValueError(f"ratio_level must be 'token' or 'sequence', got {ratio_level!r}")
    surr = ratio * adv
    surr_clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high) * adv
    per_token = -torch.minimum(surr, surr_clipped)
    stats: dict[str, torch.Tensor] = {}
    if dual_clip is not None:
        cap = -dual_clip * adv
        # Strictly above the cap: the token takes the constant branch and gets no gradient.
        dual = ((adv < 0) & (per_token > cap)).to(logp.dtype)
        per_token = torch.where(adv < 0, torch.minimum(per_token, cap), per_token)
        stats["dual_clip_fraction"] = masked_mean(dual, mask)
    if is_weights is not None:
        per_token = per_token * is_weights.detach().to(per_token.dtype)
    if ref_logp is not None:
        with torch.set_grad_enabled(torch.is_grad_enabled() and divergence is None):
            kl = KL_ESTIMATORS[kl_estimator](logp, ref_logp)
        stats["kl"] = masked_mean(kl.detach(), mask)
        if beta and divergence is None:
            per_token = per_token + beta * kl
    if divergence is not None:
        stats["divergence"] = masked_mean(divergence.detach(), mask)
        if beta:
            per_token = per_token + beta * divergence
    if entropy is not None:
        stats["entropy"] = masked_mean(entropy.detach(), mask)
        if entropy_coef:
            per_token = per_token - entropy_coef * entropy
    # The clipped branch is the one taken (strictly), so the token gets no surrogate gradient.
    clipped = (surr_clipped < surr).to(logp.dtype)
    loss = AGGREGATIONS[aggregation](per_token, mask, norm_len or mask.size(1), denom)
    stats["clip_fraction"] = masked_mean(clipped, mask)
    stats["ratio_mean"] = masked_mean(ratio.detach(), mask)
    return loss, stats


def tis_weights(old_logp: torch.Tensor, engine_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance sampling (Yao et al. 2025): w = min(pi_old / pi_engine, cap), detached.

    The rollout engine (vLLM) samples from pi_engine, which differs numerically from the learner's
    pi_old; w corrects the policy gradient for that mismatch, and the cap bounds its variance.
    """
    w = torch.exp(old_logp.detach().float() - engine_logp.detach().float())
    return w.clamp(max=cap)


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment, a reward added per sample:

    0 for L <= max_len - buffer; (max_len - buffer - L) / buffer * factor inside the buffer;
    -factor for L > max_len.
    """
    L = lengths.to(torch.float32)
    start = max_len - buffer
    ramp = (start - L) / max(buffer, 1) * factor
    out = torch.where(L <= start, torch.zeros_like(L), ramp)
    return torch.where(L > max_len, torch.full_like(L, -factor), out)


def over_positions(fn, *tensors: torch.Tensor, chunk: int) -> torch.Tensor:
    """fn over [..., V] tensors chunk by chunk of the flattened positions: returns [..., *rest].

    fn maps [n, V] tensors to [n, *rest]. With autograd on, each chunk is checkpointed: a chunk's float32
    softmax temporaries are recomputed in backward instead of being kept for all positions at once.
    """
    lead = tensors[0].shape[:-1]
    flat = [t.reshape(-1, t.size(-1)) for t in tensors]
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in flat)
    outs = []
    for s in range(0, flat[0].size(0), chunk):
        parts = [t[s:s + chunk] for t in flat]
        if grad:
            outs.append(checkpoint(fn, *parts, use_reentrant=False, preserve_rng_state=False))
        else:
            outs.append(fn(*parts))
    if not outs:
        return flat[0].new_zeros(lead, dtype=torch.float32)
    return torch.cat(outs).reshape(*lead, *outs[0].shape[1:])


def _entropy_rows(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1)
    # Clamping -inf (masked vocabulary) to a finite floor keeps 0 * log 0 = 0, also in the gradient.
    return -(logp.exp() * logp.clamp(min=torch.finfo(logp.dtype).min)).sum(-1)


def entropy(logits: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """H_t = -sum_v pi(v) log pi(v) at each position of [..., V] logits: differentiable, float32."""
    return over_positions(_entropy_rows, logits, chunk=chunk)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log pi(target) at each position from [B, T, V] logits, in float32."""
    logits = logits.float()
    return torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


@torch.no_grad()
def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of pi at each position (logged, never differentiated)."""
    return entropy(logits)
