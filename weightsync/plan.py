"""Bucket plans: which parameters travel together in one flat buffer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Protocol

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class SyncPlan:
    """Buckets of parameters, in send order, and the dtype they travel in (the engine's)."""
    buckets: tuple[tuple[TensorSpec, ...], ...]
    dtype: str

    @property
    def total_bytes(self) -> int:
        return sum(s.numel for b in self.buckets for s in b) * DTYPES[self.dtype].itemsize


def plan_buckets(specs: Iterable[TensorSpec], dtype: str, bucket_mb: float) -> SyncPlan:
    """Greedy coalescing in model order; a tensor larger than a bucket travels alone."""
    limit = max(1, int(bucket_mb * 2**20) // DTYPES[dtype].itemsize)
    buckets, cur, cur_n = [], [], 0
    for s in specs:
        if cur and cur_n + s.numel > limit:
            buckets.append(tuple(cur))
            cur, cur_n = [], 0
        cur.append(s)
        cur_n += s.numel
    if cur:
        buckets.append(tuple(cur))
    return SyncPlan(tuple(buckets), dtype)


def pack(tensors: list[torch.Tensor], dtype: torch.dtype, device) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).to(device=device, dtype=dtype) for t in tensors])


def unpack(flat: torch.Tensor, bucket: tuple[TensorSpec, ...]) -> Iterator[tuple[str, torch.Tensor]]:
    offset = 0
    for s in bucket:
        yield s.name, flat[offset: offset + s.numel].view(s.shape)
        offset += s.numel


class WeightTransport(Protocol):
    """One group spanning the sender (rank 0) and every receiver."""

    def broadcast(self, flat: torch.Tensor) -> None:
        """Rank 0 sends `flat`; the others receive into it in place."""

    def start_broadcast(self, flat: torch.Tensor) -> Callable[[], None]:
        """The same, started: returns the call that waits for it."""
