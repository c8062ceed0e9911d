"""Attention for the shared-prefix layout that computes only what the block mask lets through.

A packed row is [prompt, c_1, ..., c_G]: the prompt attends causally to itself, each completion to
the prompt and causally to itself. A dense masked attention over the row costs L^2 per head for a
row of length L; most of it is masked out (completion j never sees completion k). Here the prompt
block is one causal attention, and the completions of a micro-batch are one batched attention, each
against [prompt keys, its own keys]: about G * c * (P + c) instead of (P + G * c)^2. Exact (the same
softmax over the same keys), so logprobs and gradients equal the dense mask's (tests/unit/test_batch.py).

Registered with transformers as an attention implementation; without the `gf_segments` keyword
(one sample per row, the critic, evaluation) it is plain SDPA.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

NAME = "groupflow_packed"


@dataclass
class Segments:
    """Where each completion of a packed micro-batch sits, as flat indices into [rows * length]."""
    prompt_len: int           # the longest prompt: the causal block [0, prompt_len) holds every prompt
    queries: torch.Tensor     # [M, C] flat positions of completion m's tokens (padding: 0)
    keys: torch.Tensor        # [M, P + C] flat positions of its prompt's tokens, then its own (padding: 0)
    allowed: torch.Tensor     # [M, 1, C, P + C] bool: which keys each query sees
    written: torch.Tensor     # [T] flat positions of every real completion token, in [M, C] order
    valid: torch.Tensor       # [M, C] bool: real completion tokens

    def to(self, device) -> "Segments":
        return Segments(self.prompt_len, *(t.to(device) for t in (self.queries, self.keys, self.allowed,
                                                                    self.written, self.valid)))


def segments(prompt_lens: list[int], spans: list[tuple[int, int, int]], length: int) -> Segments:
    """prompt_lens[r]: row r's prompt length; spans: (row, start, length) of each non-empty completion."""
    P, C, M = max(prompt_lens), max((n for _, _, n in spans), default=1), len(spans)
    queries = torch.zeros(M, C, dtype=torch.long)
    keys = torch.zeros(M, P + C, dtype=torch.long)
    allowed = torch.zeros(M, 1, C, P + C, dtype=torch.bool)
    valid = torch.zeros(M, C, dtype=torch.bool)
    causal = torch.ones(C, C, dtype=torch.bool).tril()
    for m, (r, start, n) in enumerate(spans):
        p = prompt_lens[r]
        queries[m, :n] = r * length + torch.arange(start, start + n)
        keys[m, :p] = r * length + torch.arange(p)
        keys[m, P: P + n] = r * length + torch.arange(start, start + n)
        allowed[m, 0, :n, :p] = True
        allowed[m, 0, :n, P: P + n] = causal[:n, :n]
        allowed[m, 0, n:, 0] = True  # padding queries see one key: finite, and their output is dropped
        valid[m, :n] = True
    return Segments(P, queries, keys, allowed, queries[valid], valid)


def _flat(x: torch.Tensor) -> torch.Tensor:
    """[R, H, L, D] -> [R * L, H, D]."""
    R, H, L, D = x.shape
    return x.transpose(1, 2).reshape(R * L, H, D)


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     gf_segments: Segments | None = None, **kwargs):
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    # models with a sliding window, logit soft-capping or attention sinks take the dense mask: exact
    if gf_segments is None or any(kwargs.get(k) is not None for k in ("sliding_window", "softcap", "s_aux")):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    R, H, L, D = query.shape
    seg, P = gf_segments, gf_segments.prompt_len
    # prompts: causal over the first P positions; a row's positions past its own prompt are
    # completion tokens, recomputed below
    head = F.scaled_dot_product_attention(query[:, :, :P], key[:, :, :P], value[:, :, :P], is_causal=True,
                                          dropout_p=dropout, scale=scaling)
    out = torch.cat([head, query.new_zeros(R, H, L - P, D)], dim=2) if L > P else head
    q, k, v = _flat(query)[seg.queries], _flat(key)[seg.keys], _flat(value)[seg.keys]  # [M, C|K, H, D]
    comp = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_mask=seg.allowed, dropout_p=dropout, scale=scaling)
    flat = _flat(out).index_put((seg.written,), comp.transpose(1, 2)[seg.valid])
    return flat.reshape(R, L, H, D), None  # transformers expects [R, L, H, D]


def register() -> str:
    """Make NAME loadable with from_pretrained(attn_implementation=NAME); idempotent."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(NAME, packed_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
