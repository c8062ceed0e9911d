"""Exact divergences between the policy and the reference over the full vocabulary, per token.

GRPO's k3 only estimates KL(pi_theta || pi_ref) from the sampled token; with both models' logits at
hand the divergence can be summed over the vocabulary instead. Positions are processed in chunks
(checkpointed under autograd, see algorithms.over_positions) so the [chunk, V] float32 temporaries
stay bounded. Temperature is the caller's business: pass logits already divided by it.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .algorithms import masked_mean, over_positions, register

DIVERGENCES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {}


def _logprobs(logits: torch.Tensor) -> torch.Tensor:
    # A -inf log-prob (masked vocabulary) becomes a finite floor: p = 0 there, so p * (log p - log q)
    # is an exact 0 and neither the value nor the gradient sees inf - inf.
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.clamp(min=torch.finfo(logp.dtype).min)


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p (log p - log q)."""
    return (logp.exp() * (logp - logq)).sum(-1)


def _js(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """JS(p, q) = 1/2 KL(p || M) + 1/2 KL(q || M), M = (p + q) / 2, in nats (<= ln 2)."""
    logm = torch.logaddexp(logp, logq) - math.log(2.0)
    return 0.5 * (_kl(logp, logm) + _kl(logq, logm))


def _tv(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """TV(p, q) = 1/2 sum_v |p - q|, in [0, 1]."""
    return 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)


# Functions of log-probs; the registry below wraps them as functions of logits.
_ON_LOGPROBS = {
    "reverse_kl": _kl,                               # KL(pi_theta || pi_ref): what k3 estimates
    "forward_kl": lambda lp, lq: _kl(lq, lp),        # KL(pi_ref || pi_theta): mass-covering
    "js": _js,
    "tv": _tv,
}


def _on_logits(fn):
    def per_position(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
        return fn(_logprobs(logits), _logprobs(ref_logits))
    per_position.__doc__ = fn.__doc__
    return per_position


for _name, _fn in _ON_LOGPROBS.items():
    register(DIVERGENCES, _name)(_on_logits(_fn))


def per_token_divergence(name: str, logits: torch.Tensor, ref_logits: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """DIVERGENCES[name] at every position of [B, T, V] logits: [B, T], differentiable w.r.t. logits.

    The reference side is detached: it is a fixed target, never trained.
    """
    return over_positions(DIVERGENCES[name], logits, ref_logits.detach(), chunk=chunk)


@torch.no_grad()
def exact_divergences(
    logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor, chunk: int = 256,
) -> dict[str, torch.Tensor]:
    """Masked token means of all four divergences, for logging: keys "div_<name>".

    One log_softmax per side per chunk serves all four (stacked as [n, 4]).
    """
    def all_four(lg: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        lp, lq = _logprobs(lg), _logprobs(ref)
        return torch.stack([fn(lp, lq) for fn in _ON_LOGPROBS.values()], dim=-1)

    per = over_positions(all_four, logits, ref_logits, chunk=chunk)
    m = mask.to(per.dtype)
    return {f"div_{name}": masked_mean(per[..., k], m) for k, name in enumerate(_ON_LOGPROBS)}
