"""Reward workers: Ray actors that score completions in parallel; a scorer that raises is contained."""
from __future__ import annotations

import logging
import time

import ray

from .config import RewardsConfig
from .tasks import TASKS

log = logging.getLogger("groupflow.rewards")


@ray.remote
class RewardWorker:
    def __init__(self, task_name: str, failure_reward: float, rank: int):
        self.scorer = TASKS[task_name].score
        self.failure_reward = failure_reward
        self.rank = rank

    def score(self, ids: list[str], completions: list[str], answers: list[float]) -> dict:
        rewards, failures = [], 0
        for rid, text, answer in zip(ids, completions, answers):
            try:
                rewards.append(float(self.scorer(text, answer)))
            except Exception as e:  # a broken scorer costs one sample, never the run
                failures += 1
                rewards.append(self.failure_reward)
                log.warning("[reward %d] scorer raised on %s: %r", self.rank, rid, e)
        return {"rewards": rewards, "failures": failures}


class RewardPool:
    """Splits a batch across the workers and gathers the rewards back in order."""

    def __init__(self, cfg: RewardsConfig, actor_options: list[dict]):
        self.cfg = cfg
        self.workers = [
            RewardWorker.options(name=None, num_cpus=cfg.cpus_per_worker, **opts).remote(
                cfg.task.name, cfg.failure_reward, rank)
            for rank, opts in enumerate(actor_options)
        ]

    def score(self, ids: list[str], completions: list[str], answers: list[float]) -> tuple[list[float], int]:
        n, k = len(completions), len(self.workers)
        bounds = [(i * n // k, (i + 1) * n // k) for i in range(k)]
        refs = [w.score.remote(ids[a:b], completions[a:b], answers[a:b])
                for w, (a, b) in zip(self.workers, bounds)]
        start = time.monotonic()
        try:
            parts = ray.get(refs, timeout=self.cfg.timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"reward workers did not score {n} completions within "
                               f"rewards.timeout_s={self.cfg.timeout_s}s") from None
        log.debug("scored %d completions in %.2fs", n, time.monotonic() - start)
        rewards = [r for p in parts for r in p["rewards"]]
        return rewards, sum(p["failures"] for p in parts)

    def shutdown(self):
        for w in self.workers:
            ray.kill(w)
