"""EngineGroup: the rollout actors of a run as one handle; generation spread over them, and the
replacement of an engine that died (on its own placement bundle, by the `launch` it was given).

What a replacement needs besides a process (joining the weight sync, today's weights) belongs to
the driver: it passes `on_replaced`, called with the engine's index before the engine is used.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Optional

import pyarrow as pa
import ray

log = logging.getLogger("groupflow.actors")


class EngineFailure(RuntimeError):
    """An engine died and could not be replaced (or was replaced too often)."""


def split(n: int, k: int) -> list[tuple[int, int]]:
    return [(i * n // k, (i + 1) * n // k) for i in range(k)]


class Generation:
    """A generation in flight: its prompts, sampling, and the engines' refs (share by share)."""

    def __init__(self, rows: list[dict], n: int, greedy: bool, first_group: int, seed: Optional[int]):
        self.rows, self.n, self.greedy, self.first_group, self.seed = rows, n, greedy, first_group, seed
        self.pending: dict = {}  # ref -> (engine index, first row, end row)


class EngineGroup:
    def __init__(self, actors: list, launch: Optional[Callable[[int], object]] = None, max_restarts: int = 0,
                 timeout_s: float = 1800.0):
        self.actors, self.launch = list(actors), launch
        self.max_restarts, self.timeout_s = max_restarts, timeout_s
        self.restarts = 0
        self.closed = False  # after kill(): a call that finds an engine dead must not start another
        self.on_replaced: Optional[Callable[[int], None]] = None

    def __len__(self) -> int:
        return len(self.actors)

    def __iter__(self):
        return iter(self.actors)

    def __getitem__(self, i: int):
        return self.actors[i]

    def generate(self, rows: list[dict], n: int, timeout_s: float, greedy: bool = False, first_group: int = 0,
                 seed: Optional[int] = None) -> pa.Table:
        return self.collect(self.submit(rows, n, greedy, first_group, seed), timeout_s)

    def submit(self, rows: list[dict], n: int, greedy: bool = False, first_group: int = 0,
               seed: Optional[int] = None) -> "Generation":
        """Start generating: each engine takes a contiguous share of the prompts, all at once; groups
        stay on one engine. With a `seed`, each share is sampled with seed + its first group id, so a
        share redone on a replacement engine is drawn the same way. Returns at once."""
        if not rows:
            raise ValueError("nothing to generate: no prompts")
        gen = Generation(rows, n, greedy, first_group, seed)
        for i, (a, b) in enumerate(split(len(rows), len(self.actors))):
            if b > a:
                gen.pending[self._submit_share(gen, i, a, b)] = (i, a, b)
        return gen

    def _submit_share(self, gen: "Generation", i: int, a: int, b: int):
        return self.actors[i].generate.remote(gen.rows[a:b], list(range(gen.first_group + a, gen.first_group + b)),
                                              gen.n, gen.greedy, None if gen.seed is None else gen.seed + gen.first_group + a)

    def collect(self, gen: "Generation", timeout_s: float) -> pa.Table:
        """Wait for a submitted generation; a share whose engine died is redone on its replacement."""
        # a lost share is generated again on the replacement, and only that share
        tables = self._gather(gen.pending, lambda i, a, b: self._submit_share(gen, i, a, b), timeout_s,
                              f"generate {len(gen.rows)} x {gen.n} samples")
        spans = [(float(t.schema.metadata[b"generate_began"]), float(t.schema.metadata[b"generate_ended"]))
                 for t in tables.values()]
        table = pa.concat_tables([tables[a].replace_schema_metadata(None) for a in sorted(tables)])
        # when the engines began and ended this generation (wall clock): the driver's idle accounting
        return table.replace_schema_metadata({"generate_began": repr(min(s for s, _ in spans)),
                                              "generate_ended": repr(max(e for _, e in spans))})

    def continue_turns(self, requests: list[dict], timeout_s: float, greedy: bool = False,
                       seed: int | None = None) -> list[dict]:
        """The next turn of many trajectories (RolloutActor.continue_turns), spread over the engines
        in one call each; a share whose engine died is redone on its replacement. In order."""
        def submit(i: int, a: int, b: int):
            return self.actors[i].continue_turns.remote(requests[a:b], greedy, None if seed is None else seed + a)

        pending = {submit(i, a, b): (i, a, b)
                   for i, (a, b) in enumerate(split(len(requests), len(self.actors))) if b > a}
        parts = self._gather(pending, submit, timeout_s, f"continue {len(requests)} trajectories")
        return [turn for a in sorted(parts) for turn in parts[a]]

    def _gather(self, pending: dict, resubmit: Callable[[int, int, int], object], timeout_s: float,
                what: str) -> dict:
        """Wait for every share in `pending` (ref -> (engine, first row, end row)); a share whose
        engine died is submitted again by `resubmit` on the replacement, with a fresh deadline.
        Returns each share's result by its first row."""
        results: dict = {}
        deadline = time.monotonic() + timeout_s
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError(f"engines did not {what} within {timeout_s}s "
                                   f"(waiting for engines {sorted({i for i, _, _ in pending.values()})})")
            i, a, b = pending.pop(ready[0])
            try:
                results[a] = ray.get(ready[0])
            except ray.exceptions.RayActorError as e:
                self.replace(i, e)
                pending[resubmit(i, a, b)] = (i, a, b)
                deadline = time.monotonic() + timeout_s
        return results

    def replace(self, i: int, error: BaseException) -> None:
        """Start engine i again on its bundle; the driver's `on_replaced` brings it up to date. A
        replacement that dies before it is up (placed on a node that was dying) counts as another."""
        while True:
            cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            if self.closed:
                raise EngineFailure(f"engine {i} is gone: the engines were shut down") from error
            if self.launch is None:
                raise EngineFailure(f"engine {i} died: {cause}") from error
            if self.restarts >= self.max_restarts:
                raise EngineFailure(f"engine {i} died and engines.max_restarts={self.max_restarts} restarts are "
                                    f"used up; last error: {cause}") from error
            self.restarts += 1
            log.warning("engine %d died (%s): starting a replacement (%d of at most %d)", i, cause, self.restarts,
                        self.max_restarts)
            ray.kill(self.actors[i], no_restart=True)
            self.actors[i] = self.launch(i)
            try:
                ray.get(self.actors[i].ready.remote(), timeout=self.timeout_s)
                break
            except ray.exceptions.GetTimeoutError:
                raise EngineFailure(f"the replacement of engine {i} did not start within {self.timeout_s}s") from None
            except ray.exceptions.RayActorError as e:
                error = e
        if self.on_replaced is not None:
            self.on_replaced(i)

    def kill(self) -> None:
        self.closed = True
        for a in self.actors:
            ray.kill(a)
