"""Start or join Ray, reserve placement groups per role, and create every actor."""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.rollout import RolloutActor
from learner.group import LearnerGroup
from rewards.pool import RewardPool

from .config import Config
from .sync.broadcast import WeightSync

log = logging.getLogger("groupflow")

ACTOR_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def start_ray(cfg: Config) -> None:
    if ray.is_initialized():
        return
    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        # Inside `ray job submit` the job's runtime_env (working_dir) must stay the actors' env.
        ray.init(address=address, log_to_driver=True)
        return
    need = (cfg.engines.num_engines * cfg.engines.cpus_per_engine
            + cfg.learner.num_ranks * cfg.learner.cpus_per_rank
            + cfg.rewards.num_workers * cfg.rewards.cpus_per_worker)
    # Logical CPUs: the phases of a synchronous step take turns on the same cores.
    num_cpus = cfg.run.num_cpus or max(os.cpu_count() or 1, math.ceil(need))
    # A local instance writes ~/.ray/auth_token otherwise, which later breaks `ray job submit`
    # against a `ray start --head` cluster on the same box. Clusters set their own auth mode.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env={"env_vars": ACTOR_ENV},
             log_to_driver=True)


def _reserve(name: str, bundles: list[dict], timeout_s: float):
    pg = placement_group(bundles, strategy="PACK", name=name)
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise TimeoutError(f"placement group {name!r} ({bundles}) could not be placed within "
                           f"{timeout_s}s; cluster resources: {ray.cluster_resources()}") from None
    return pg, [{"scheduling_strategy": PlacementGroupSchedulingStrategy(pg, i)} for i in range(len(bundles))]


@dataclass
class Roles:
    engines: list
    rewards: RewardPool
    learner: LearnerGroup
    sync: WeightSync
    pgs: list

    def shutdown(self):
        for a in self.engines:
            ray.kill(a)
        self.rewards.shutdown()
        self.learner.shutdown()
        for pg in self.pgs:
            remove_placement_group(pg)


def create_roles(cfg: Config, model_path: str) -> Roles:
    e, lc, t = cfg.engines, cfg.learner, cfg.run.timeout_s
    gpu = e.device == "cuda"
    eng_pg, eng_opts = _reserve("groupflow-engines", [
        {"CPU": e.cpus_per_engine, **({"GPU": e.tensor_parallel_size} if gpu else {})}
        for _ in range(e.num_engines)], t)
    lrn_pg, lrn_opts = _reserve("groupflow-learner", [
        {"CPU": lc.cpus_per_rank, **({"GPU": 1} if lc.device == "cuda" else {})}
        for _ in range(lc.num_ranks)], t)
    rwd_pg, rwd_opts = _reserve("groupflow-rewards", [
        {"CPU": cfg.rewards.cpus_per_worker} for _ in range(cfg.rewards.num_workers)], t)

    engines = [RolloutActor.options(num_cpus=e.cpus_per_engine,
                                    num_gpus=e.tensor_parallel_size if gpu else 0, **o)
               .remote(e, model_path, cfg.trainer.seed, i) for i, o in enumerate(eng_opts)]
    learner = LearnerGroup(lc, cfg.algorithm, model_path, cfg.local_batch, e.temperature,
                           e.max_new_tokens, lrn_opts, t)
    rewards = RewardPool(cfg.rewards, rwd_opts)
    try:
        ray.get([a.ready.remote() for a in engines], timeout=t)
    except ray.exceptions.GetTimeoutError:
        raise TimeoutError(f"rollout engines did not start within {t}s") from None
    sync = WeightSync(learner, engines, cfg.sync_backend, e.dtype, e.tensor_parallel_size,
                      cfg.sync.bucket_mb, cfg.sync.timeout_s)
    return Roles(engines, rewards, learner, sync, [eng_pg, lrn_pg, rwd_pg])
