"""Start or join Ray, reserve placement groups per role, and create every actor."""
from __future__ import annotations

import logging
import math
import os
from contextlib import ExitStack
from dataclasses import dataclass

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.group import EngineGroup
from actors.rollout import RolloutActor
from learner.group import LearnerGroup
from rewards.pool import RewardPool
from rewards.tasks import DEFAULT_REWARD

from .config import Config, RolePlacement, RunConfig
from .generator import Generator
from .weight_sync import WeightSync

log = logging.getLogger("groupflow")

METRICS_INTERVAL_MS = 1000
ACTOR_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def start_ray(run: RunConfig, cpus_needed: float) -> None:
    if ray.is_initialized():
        return
    address = run.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        # Inside `ray job submit` the job's runtime_env (working_dir) must stay the actors' env.
        ray.init(address=address, log_to_driver=True)
        return
    # Logical CPUs: the phases of a synchronous step take turns on the same cores.
    num_cpus = run.num_cpus or max(os.cpu_count() or 1, math.ceil(cpus_needed))
    # A local instance writes ~/.ray/auth_token otherwise, which later breaks `ray job submit`
    # against a `ray start --head` cluster on the same box. Clusters set their own auth mode.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # metrics reach the endpoint every second (Ray's default, 10 s, would miss a short run's last steps)
    ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env={"env_vars": ACTOR_ENV},
             log_to_driver=True, _metrics_export_port=run.metrics_export_port,
             _system_config={"metrics_report_interval_ms": METRICS_INTERVAL_MS})


def _reserve(name: str, bundles: list[dict], where: RolePlacement, timeout_s: float):
    bundles = [{**b, **where.resources} for b in bundles]
    pg = placement_group(bundles, strategy=where.strategy, name=name)
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise TimeoutError(f"placement group {name!r} ({where.strategy}, {bundles}) could not be placed "
                           f"within {timeout_s}s; cluster resources: {ray.cluster_resources()}") from None
    return pg, [{"scheduling_strategy": PlacementGroupSchedulingStrategy(pg, i)} for i in range(len(bundles))]


@dataclass
class Roles:
    engines: EngineGroup
    generator: Generator
    rewards: RewardPool
    learner: LearnerGroup
    sync: WeightSync
    pgs: list
    loaded: dict | None = None  # what the learner loaded from the checkpoint resumed (LearnerGroup.load)

    def shutdown(self):
        self.engines.kill()
        self.rewards.shutdown()
        self.learner.shutdown()
        for pg in self.pgs:
            remove_placement_group(pg)


def env_spec(cfg: Config) -> dict | None:
    """The environment the reward workers' subprocesses build (rewards/envs.py), if rollouts are conversations."""
    r = cfg.rollout
    return {"env": r.env, "options": r.env_options} if r.multi_turn else None


def _engine_bundles(cfg: Config) -> list[dict]:
    e = cfg.engines
    return [{"CPU": e.cpus_per_engine, **({"GPU": e.tensor_parallel_size} if e.device == "cuda" else {})}
            for _ in range(e.num_engines)]


def _reward_bundles(cfg: Config) -> list[dict]:
    return [{"CPU": cfg.rewards.cpus_per_worker} for _ in range(cfg.rewards.num_workers)]


def _launch_engine(cfg: Config, model_path: str, opts: dict, rank: int, version: int = 0):
    e = cfg.engines
    return RolloutActor.options(num_cpus=e.cpus_per_engine,
                                num_gpus=e.tensor_parallel_size if e.device == "cuda" else 0, **opts
                                ).remote(e, model_path, cfg.trainer.seed, rank, version)


def _launch_engines(cfg: Config, model_path: str, opts: list[dict], version: int = 0) -> list:
    return [_launch_engine(cfg, model_path, o, i, version) for i, o in enumerate(opts)]


def _wait_engines(engines: list, timeout_s: float) -> None:
    try:
        ray.get([a.ready.remote() for a in engines], timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise TimeoutError(f"rollout engines did not start within {timeout_s}s") from None


def create_engines(cfg: Config, model_path: str) -> tuple[EngineGroup, object]:
    """Rollout engines alone (evaluation, pruning): started and ready; the caller kills them and
    removes the placement group."""
    pg, opts = _reserve("groupflow-engines", _engine_bundles(cfg), cfg.placement.engines, cfg.run.timeout_s)
    engines = _launch_engines(cfg, model_path, opts)
    try:
        _wait_engines(engines, cfg.run.timeout_s)
    except BaseException:
        for a in engines:
            ray.kill(a)
        remove_placement_group(pg)
        raise
    return EngineGroup(engines, timeout_s=cfg.run.timeout_s), pg


def create_reward_pool(cfg: Config) -> tuple[RewardPool, object]:
    """The configured reward (the task's default when rewards.components is empty), every scorer built."""
    pg, opts = _reserve("groupflow-rewards", _reward_bundles(cfg), cfg.placement.rewards, cfg.run.timeout_s)
    pool = RewardPool(cfg.rewards, opts, DEFAULT_REWARD[cfg.rewards.task.name], env_spec(cfg))
    try:
        pool.ready(cfg.run.timeout_s)
    except BaseException:
        pool.shutdown()
        remove_placement_group(pg)
        raise
    return pool, pg


def create_roles(cfg: Config, model_path: str, ref_path: str | None = None, resume: str | None = None,
                 version: int = 0) -> Roles:
    """Every role of a run; with `resume`, the learner continues that checkpoint's DeepSpeed states
    and the engines start at policy `version`."""
    # All groups reserved first, then every actor launched, so engines and learner start together.
    # A failure on the way releases what was started: a restart would wait for its resources.
    lc, t = cfg.learner, cfg.run.timeout_s
    where = cfg.placement
    with ExitStack() as undo:
        eng_pg, eng_opts = _reserve("groupflow-engines", _engine_bundles(cfg), where.engines, t)
        undo.callback(remove_placement_group, eng_pg)
        lrn_pg, lrn_opts = _reserve("groupflow-learner", [
            {"CPU": lc.cpus_per_rank, **({"GPU": 1} if lc.device == "cuda" else {})}
            for _ in range(lc.num_ranks)], where.learner, t)
        undo.callback(remove_placement_group, lrn_pg)
        rwd_pg, rwd_opts = _reserve("groupflow-rewards", _reward_bundles(cfg), where.rewards, t)
        undo.callback(remove_placement_group, rwd_pg)

        e = cfg.engines
        engines = _launch_engines(cfg, model_path, eng_opts, version)
        undo.callback(lambda: [ray.kill(a) for a in engines])
        learner = LearnerGroup(lc, cfg.algorithm, model_path, cfg.local_batch, e.temperature,
                               e.max_new_tokens, lrn_opts, t, ref_path=ref_path, version=version)
        undo.callback(learner.shutdown)
        rewards = RewardPool(cfg.rewards, rwd_opts, DEFAULT_REWARD[cfg.rewards.task.name], env_spec(cfg))
        undo.callback(rewards.shutdown)
        loaded = learner.load(resume) if resume is not None else None
        if loaded is not None and loaded["restored"] == []:
            log.warning("%s has no DeepSpeed states (an older checkpoint): optimizer moments start afresh", resume)
        _wait_engines(engines, t)
        rewards.ready(t)  # a reward that cannot be built stops the run now, not at the first batch
        # A replacement starts on the dead engine's bundle from the run's original weights (the checkpoint
        # resumed may have been pruned since) and gets the learner's by a push before it generates.
        start = ref_path if cfg.sync.enabled and ref_path else model_path
        group = EngineGroup(engines, lambda i: _launch_engine(cfg, start, eng_opts[i], i, version),
                            e.max_restarts, t)
        undo.callback(group.kill)  # replacements too
        sync = WeightSync(learner, group, cfg.sync_backend, e.dtype, e.tensor_parallel_size,
                          cfg.sync.bucket_mb, cfg.sync.timeout_s, version)
        if cfg.sync.enabled:  # a replacement joins the weight sync and gets today's weights before it generates
            group.on_replaced = lambda i: sync.rejoin()
        generator = Generator(group, rewards, cfg.rollout, e.max_model_len, t)
        undo.pop_all()  # started: the run owns them now (Roles.shutdown)
    return Roles(group, generator, rewards, learner, sync, [eng_pg, lrn_pg, rwd_pg], loaded)
