"""WeightSync: one group spanning learner rank 0 and every engine worker; a push per step."""
from __future__ import annotations

import time

import ray

from learner.group import MemberDied, wait_all

from weightsync.plan import SyncPlan, TensorSpec, plan_buckets
from weightsync.torch_dist import abort


class WeightSync:
    def __init__(self, learner, engines, backend: str, engine_dtype: str, tp_size: int,
                 bucket_mb: float, timeout_s: float, version: int = 0):
        # `version`: what the engines hold (they start from the run's starting weights)
        self.learner, self.engines, self.timeout_s = learner, engines, timeout_s
        self.backend, self.tp_size, self.version = backend, tp_size, version
        self._form()
        specs = ray.get(learner.ranks[0].sync_specs.remote(), timeout=timeout_s)
        self.specs = [TensorSpec(n, tuple(s)) for n, s in specs]
        self.plan: SyncPlan = plan_buckets(self.specs, engine_dtype, bucket_mb)

    def _form(self) -> None:
        """A group of learner rank 0 and every engine worker, on a fresh port (a new group each time)."""
        world, t = 1 + len(self.engines) * self.tp_size, self.timeout_s
        host, port = self._store = ray.get(self.learner.ranks[0].address.remote(), timeout=t)
        refs = self.learner.start("init_weight_sync", host, port, world, self.backend, t)
        refs += [e.init_weight_sync.remote(host, port, 1 + i * self.tp_size, world, self.backend, t)
                 for i, e in enumerate(self.engines)]
        self._wait(refs, f"the weight-sync group ({self.backend}, {world} members at {host}:{port})",
                   self._members())

    def rejoin(self) -> dict:
        """An engine was replaced: form the group again with it and push the learner's weights."""
        self._form()
        return self.push()

    def replan(self, bucket_mb: float) -> None:
        self.plan = plan_buckets(self.specs, self.plan.dtype, bucket_mb)

    def _wait(self, refs, what: str, members: list[str] | None = None):
        try:
            return wait_all(refs, members or [f"member {i}" for i in range(len(refs))], self.timeout_s, what)
        except ray.exceptions.RayTaskError as e:  # a broken connection: is a peer gone?
            for i, engine in enumerate(self.engines):
                try:
                    ray.get(engine.ready.remote(), timeout=10)
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                    raise MemberDied(f"engine {i}", f"{what}: engine {i} is gone ({type(e.cause).__name__}: "
                                     f"{str(e.cause).splitlines()[0][:200]})") from None
            raise

    def _members(self) -> list[str]:
        return [f"learner rank {r}" for r in range(len(self.learner.ranks))] + \
            [f"engine {i}" for i in range(len(self.engines))]

    def push(self) -> dict:
        """Learner ranks gather and rank 0 broadcasts while every engine receives and reloads. The
        learner sends its policy version with the weights; an engine busy generating loads them after
        that call (an actor runs one call at a time), so no sample mixes two versions.

        An engine found dead (idle before the push, or receiving it) is replaced in place: the
        survivors are told through the group's store to give up the broadcast (gloo breaks the
        sender's pairs to the dead engine, but a receiver may wait on it until sync.timeout_s:
        measured, 600 s), then the replacement joins a new group and the push is redone to all
        (EngineGroup.replace -> on_replaced -> rejoin). Learner state is never in doubt."""
        start = time.monotonic()
        refs = self.learner.start("broadcast_weights", self.plan)
        refs += [e.load_weights.remote(self.plan) for e in self.engines]
        try:
            self.version = self._wait(refs, f"weight sync v{self.learner.version} ({len(self.plan.buckets)} "
                                      "buckets)", self._members())[0]
        except MemberDied as e:
            if not e.member.startswith("engine"):
                raise
            abort(*self._store)
            ray.wait(refs, num_returns=len(refs), timeout=self.timeout_s)  # the survivors' calls end
            self.engines.replace(int(e.member.split()[1]), e)  # on_replaced: rejoin, push again (sets version)
        return {"time_sync_s": time.monotonic() - start, "sync_bytes": self.plan.total_bytes,
                "sync_version": self.version}

    def raw_broadcast(self) -> float:
        """The same bytes as one flat buffer on the same group, nothing gathered, packed or loaded:
        the floor `groupflow bench sync` measures a push against."""
        numel = sum(s.numel for s in self.specs)
        start = time.monotonic()
        refs = [self.learner.ranks[0].raw_broadcast.remote(numel, self.plan.dtype)]
        refs += [e.raw_receive.remote(numel, self.plan.dtype) for e in self.engines]
        self._wait(refs, f"a raw broadcast of {numel} elements")
        return time.monotonic() - start

