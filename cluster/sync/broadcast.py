"""WeightSync: one group spanning learner rank 0 and every engine worker; a push per step."""
from __future__ import annotations

import time

import ray

from .base import SyncPlan, TensorSpec, plan_buckets


class WeightSync:
    def __init__(self, learner, engines: list, backend: str, engine_dtype: str, tp_size: int,
                 bucket_mb: float, timeout_s: float):
        self.learner, self.engines, self.timeout_s = learner, engines, timeout_s
        world = 1 + len(engines) * tp_size
        host, port = ray.get(learner.ranks[0].address.remote(), timeout=timeout_s)
        refs = learner.start("init_weight_sync", host, port, world, backend, timeout_s)
        refs += [e.init_weight_sync.remote(host, port, 1 + i * tp_size, world, backend, timeout_s)
                 for i, e in enumerate(engines)]
        self._wait(refs, f"the weight-sync group ({backend}, {world} members at {host}:{port})")
        specs = ray.get(learner.ranks[0].sync_specs.remote(), timeout=timeout_s)
        self.specs = [TensorSpec(n, tuple(s)) for n, s in specs]
        self.plan: SyncPlan = plan_buckets(self.specs, engine_dtype, bucket_mb)

    def replan(self, bucket_mb: float) -> None:
        self.plan = plan_buckets(self.specs, self.plan.dtype, bucket_mb)

    def _wait(self, refs, what: str):
        try:
            return ray.get(refs, timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"timed out after {self.timeout_s}s waiting for {what}") from None

    def push(self, version: int) -> dict:
        """Learner ranks gather and rank 0 broadcasts while every engine receives and reloads."""
        start = time.monotonic()
        refs = self.learner.start("broadcast_weights", self.plan)
        refs += [e.load_weights.remote(self.plan, version) for e in self.engines]
        self._wait(refs, f"weight sync v{version} ({len(self.plan.buckets)} buckets)")
        return {"time_sync_s": time.monotonic() - start, "sync_bytes": self.plan.total_bytes}

    def raw_broadcast(self) -> float:
        """The same bytes as one flat buffer on the same group, nothing gathered, packed or loaded:
        the floor `groupflow bench sync` measures a push against."""
        numel = sum(s.numel for s in self.specs)
        start = time.monotonic()
        refs = [self.learner.ranks[0].raw_broadcast.remote(numel, self.plan.dtype)]
        refs += [e.raw_receive.remote(numel, self.plan.dtype) for e in self.engines]
        self._wait(refs, f"a raw broadcast of {numel} elements")
        return time.monotonic() - start
