"""Reward workers: Ray actors that score a batch in parallel, each through its own pool of subprocesses.

A sample is {"id", "prompt", "completion", "answer", "metadata", "completion_token_ids"}. Each reward
component is scored on its own; a sample's reward is sum(weight * component). A component that raises,
returns garbage, hangs past rewards.sample_timeout_s or kills its process gives the whole sample
rewards.failure_reward; the sample is counted once, by its first failing component's kind, and the
failure logged with the prompt id. A worker actor that dies is replaced and its share scored again once.
Shares are strided (samples[i::k]), so one group of slow or hanging samples spreads over the workers.
"""
from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections import Counter, defaultdict
from typing import Callable

import ray

from .config import RewardComponent, RewardsConfig
from .envs import ENV_SPEC
from .model_reward import RewardModelActor
from .procpool import SANDBOX_UID_BASE, ScorerPool, check_result

log = logging.getLogger("groupflow.rewards")

BATCH_NAMES = ("http",)  # builtin.BATCH_REWARD_FUNCTIONS: one call per worker share, not per sample
FAILURE_KINDS = ("raised", "timeout", "crashed", "invalid")  # per failed sample, first failing component
LOGGED_PER_KIND = 3  # per component and batch: a reward broken on every sample must not flood the log


def component_keys(components: list[RewardComponent]) -> list[str]:
    """Metric names: the reward's name, numbered (python_1, python_2) when it appears more than once."""
    names = [c.name for c in components]
    seen: Counter = Counter()
    keys = []
    for n in names:
        seen[n] += 1
        keys.append(n if names.count(n) == 1 else f"{n}_{seen[n]}")
    return keys


def scorer_metadata(sample: dict) -> dict:
    """The `metadata` argument of score(prompt, completion, metadata): the row's metadata plus the basics."""
    return {**(sample.get("metadata") or {}), "answer": sample.get("answer"), "id": sample["id"],
            "completion_token_ids": list(sample.get("completion_token_ids") or ())}


class _Background(threading.Thread):
    """A batch reward runs beside the subprocess pool; if it hangs we stop waiting (threads can't be killed)."""

    def __init__(self, fn, arg):
        super().__init__(daemon=True)
        self.fn, self.arg, self.value, self.error = fn, arg, None, None
        self.start()

    def run(self):
        try:
            self.value = self.fn(self.arg)
        except Exception as e:
            self.error = e


def _batch_results(job: _Background, samples: list[dict], deadline: float) -> list[tuple[str, object]]:
    job.join(max(0.0, deadline - time.monotonic()))
    n = len(samples)
    if job.is_alive():
        return [("timeout", "no reply before 80% of rewards.timeout_s")] * n
    if job.error is not None:
        return [("raised", f"{type(job.error).__name__}: {job.error}"[:500])] * n
    if not isinstance(job.value, (list, tuple)) or len(job.value) != n:
        return [("invalid", f"expected {n} rewards, got {job.value!r}"[:500])] * n
    out = []
    for v, s in zip(job.value, samples):
        try:
            out.append(("ok", check_result(v, len(s.get("completion_token_ids") or ()))))
        except (TypeError, ValueError) as e:
            out.append(("invalid", str(e)))
    return out


@ray.remote
class RewardWorker:
    """Scores one share of a batch: per-sample rewards in subprocesses, batch (http) rewards in a thread."""

    def __init__(self, specs: list[dict], processes: int, sample_timeout_s: float, batch_timeout_s: float,
                 rank: int, env: dict | None = None):
        logging.basicConfig(level=logging.INFO, format=f"[reward worker {rank}] %(message)s")
        self.specs, self.rank, self.batch_timeout_s = specs, rank, batch_timeout_s
        self.per_sample = [s for s in specs if s["name"] not in BATCH_NAMES]
        self.batched = [s for s in specs if s["name"] in BATCH_NAMES]
        # a multi-turn environment steps in the same subprocesses, as the spec after the rewards
        extra = [{"key": ENV_SPEC, "name": ENV_SPEC, "options": env}] if env else []
        self.procs = (ScorerPool(self.per_sample + extra, processes, sample_timeout_s,
                                 SANDBOX_UID_BASE + rank * processes) if self.per_sample or extra else None)
        self._batch_scorers: dict | None = None

    def _batch_fns(self) -> dict:
        if self._batch_scorers is None:
            from .builtin import BATCH_REWARD_FUNCTIONS

            self._batch_scorers = {s["key"]: BATCH_REWARD_FUNCTIONS[s["name"]](dict(s["options"]))
                                   for s in self.batched}
        return self._batch_scorers

    def ready(self) -> list[int]:
        """Builds every scorer now, so a broken reward fails at start; returns the subprocess pids."""
        self._batch_fns()
        return self.procs.wait_ready() if self.procs else []

    def pids(self) -> list[int]:
        return self.procs.pids() if self.procs else []

    def score(self, samples: list[dict]) -> dict[str, list[tuple[str, object]]]:
        """{component key: [("ok", float | steps) or (failure kind, detail)] in sample order}."""
        # Hung samples must not fail the whole batch: what is unscored by this deadline fails as
        # "timeout", a little before the pool's rewards.timeout_s would. The http reward fits its
        # requests and retries into the same budget.
        deadline = time.monotonic() + 0.8 * self.batch_timeout_s
        jobs = {s["key"]: _Background(functools.partial(fn, deadline=deadline), samples)
                for s, fn in zip(self.batched, self._batch_fns().values())}
        out = {}
        if self.procs:
            k = len(self.per_sample)
            metas = [scorer_metadata(s) for s in samples]  # once per sample, shared by its components
            res = self.procs.run([(j, s["prompt"], s["completion"], meta)
                                  for s, meta in zip(samples, metas) for j in range(k)], deadline)
            out = {spec["key"]: res[j::k] for j, spec in enumerate(self.per_sample)}
        for s in self.batched:
            out[s["key"]] = _batch_results(jobs[s["key"]], samples, deadline)
        return out

    def env(self, jobs: list[dict]) -> list[tuple[str, object]]:
        """Environment starts and steps ({"op": ...}, see envs.EnvCaller), each in a subprocess:
        ("ok", messages | step) or (failure kind, detail), in order."""
        deadline = time.monotonic() + 0.8 * self.batch_timeout_s
        return self.procs.run([(len(self.per_sample), "", "", job) for job in jobs], deadline)

    def shutdown(self) -> None:
        if self.procs:
            self.procs.shutdown()


def combine(samples: list[dict], keys: list[str], weights: dict[str, float],
            results: dict[str, list[tuple[str, object]]], failure_reward: float) -> dict:
    """Weighted sum per sample; per-step rewards merged by end token (a scalar is one step at the last token)."""
    rewards, steps, comps = [], [], {k: [] for k in keys}
    failures: Counter = Counter()
    logged: Counter = Counter()
    for i, sample in enumerate(samples):
        last = max(len(sample.get("completion_token_ids") or ()) - 1, 0)
        merged: dict[int, float] = defaultdict(float)
        total, failed, has_steps = 0.0, None, False
        for k in keys:
            kind, value = results[k][i]
            if kind != "ok":
                failed = failed or kind
                comps[k].append(failure_reward)
                logged[k, kind] += 1
                if logged[k, kind] <= LOGGED_PER_KIND:
                    log.warning("reward %s %s on prompt %s: %s", k, kind, sample.get("id"), value)
                continue
            if isinstance(value, list):
                has_steps = True
                comps[k].append(math.fsum(r for r, _ in value))
                for r, end in value:
                    merged[end] += weights[k] * r
            else:
                comps[k].append(value)
                merged[last] += weights[k] * value
            total += weights[k] * comps[k][-1]
        if failed:
            failures[failed] += 1
        rewards.append(failure_reward if failed else total)
        steps.append([(merged[e], e) for e in sorted(merged)] if has_steps and not failed else None)
    for (k, kind), n in logged.items():
        if n > LOGGED_PER_KIND:
            log.warning("reward %s %s on %d more samples of this batch", k, kind, n - LOGGED_PER_KIND)
    return {"rewards": rewards, "components": comps,
            "steps": steps if any(s is not None for s in steps) else None,
            "failures": {kind: failures[kind] for kind in FAILURE_KINDS}}


class RewardPool:
    """Splits a batch across the workers (and the reward models) and gathers the rewards back in order."""

    def __init__(self, cfg: RewardsConfig, actor_options: list[dict], default_component: str = "math",
                 env: dict | None = None):
        self.closed = False  # after shutdown(): a dead worker is not replaced
        self.cfg, self.env_spec = cfg, env  # env: {"env": name or path:Class, "options": {...}} or None
        components = cfg.components or [RewardComponent(name=default_component)]
        self.keys = component_keys(components)
        self.weights = {k: c.weight for k, c in zip(self.keys, components)}
        self.specs = [{"key": k, "name": c.name, "options": c.options}
                      for k, c in zip(self.keys, components) if c.name != "model"]
        self.model_options = {k: c.options for k, c in zip(self.keys, components) if c.name == "model"}
        self.actor_options = list(actor_options)
        self.workers = ([self._new_worker(r) for r in range(len(self.actor_options))]
                        if self.specs or env else [])
        self.models = {k: self._new_model(k) for k in self.model_options}

    def _new_worker(self, rank: int):
        c = self.cfg
        return RewardWorker.options(num_cpus=c.cpus_per_worker, **self.actor_options[rank]).remote(
            self.specs, c.processes_per_worker, c.sample_timeout_s, c.timeout_s, rank, self.env_spec)

    def _new_model(self, key: str):
        o = self.model_options[key]
        gpus = o.get("num_gpus", 1 if str(o.get("device", "cpu")).startswith("cuda") else 0)
        return RewardModelActor.options(num_cpus=o.get("num_cpus", self.cfg.cpus_per_worker),
                                        num_gpus=gpus).remote(o)

    def ready(self, timeout_s: float) -> None:
        """Waits until every scorer is built (subprocesses, reward models); raises what broke."""
        refs = [w.ready.remote() for w in self.workers] + [m.ready.remote() for m in self.models.values()]
        try:
            ray.get(refs, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"reward workers were not ready within {timeout_s}s") from None

    def _submit(self, role: str, idx, samples: list[dict]):
        if role == "model":
            return self.models[idx].score.remote([s["prompt"] for s in samples], [s["completion"] for s in samples])
        return self.workers[idx].score.remote(samples)

    def score(self, samples: list[dict]) -> dict:
        """{"rewards": [float], "components": {key: [float]}, "steps": [steps | None] | None,
        "failures": {kind: failed samples}, "workers_replaced": int}; raises TimeoutError past
        rewards.timeout_s. workers_replaced counts actors, not samples: do not add it to failures."""
        n, k = len(samples), len(self.workers)
        results = {key: [None] * n for key in self.keys}
        shares = [("model", key, slice(0, n)) for key in self.models]
        shares += [("worker", i, slice(i, n, k)) for i in range(min(k, n))]
        parts, replaced = self._gather([(role, idx, lambda role=role, idx=idx, share=share:
                                         self._submit(role, idx, samples[share])) for role, idx, share in shares],
                                       f"score {n} completions")
        for (role, idx, share), part in zip(shares, parts):
            if isinstance(part, ray.exceptions.RayTaskError):  # a reward model's call raised
                part = {idx: [("raised", str(part.cause)[:500])] * n}
            if role == "model":
                part = part if isinstance(part, dict) else {idx: [_model_value(v) for v in part]}
            want = len(range(n)[share])
            for key, values in part.items():
                if len(values) != want:  # a slice assignment would silently shift every later sample
                    raise RuntimeError(f"reward {role} {idx} returned {len(values)} results for "
                                       f"{key!r}, expected {want}")
                results[key][share] = values
        out = combine(samples, self.keys, self.weights, results, self.cfg.failure_reward)
        out["workers_replaced"] = replaced
        for kind, count in {**out["failures"], "worker_replaced": replaced}.items():
            if count:
                _failures().inc(count, tags={"kind": kind})
        return out

    def env(self, jobs: list[dict]) -> list[tuple[str, object]]:
        """Environment starts or steps spread over the workers (strided), run in their subprocesses;
        a worker that dies is replaced and its share run again once. In job order."""
        n, k = len(jobs), len(self.workers)
        parts, _ = self._gather([("worker", i, lambda i=i: self.workers[i].env.remote(jobs[i::k]))
                                 for i in range(min(k, n))], f"run {n} environment steps")
        out: list = [None] * n
        for i, part in enumerate(parts):
            out[i::k] = part
        return out

    def _gather(self, shares: list[tuple[str, object, Callable[[], object]]], what: str) -> tuple[list, int]:
        """Submit each share (role, index, submit) and wait for all within rewards.timeout_s. A share
        whose actor died is run again once, on a replacement; a second death of the same share is an
        error, and so is a worker's call that raised. Returns each share's result in order (a reward
        model's call that raised: its RayTaskError) and how many actors were replaced."""
        pending = {submit(): (j, False) for j, (_, _, submit) in enumerate(shares)}
        results: list = [None] * len(shares)
        replaced = 0
        deadline = time.monotonic() + self.cfg.timeout_s
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                raise TimeoutError(f"reward workers did not {what} within rewards.timeout_s={self.cfg.timeout_s}s")
            j, retried = pending.pop(done[0])
            role, idx, submit = shares[j]
            try:
                results[j] = ray.get(done[0])
            except ray.exceptions.RayActorError as e:
                if retried or self.closed:
                    raise RuntimeError(f"reward {role} {idx} died {'after shutdown' if self.closed else 'twice'} "
                                       f"on the same share (trying to {what})") from e
                log.warning("reward %s %s died (%s); replacing it and running its share again",
                            role, idx, type(e).__name__)
                actors = self.models if role == "model" else self.workers
                ray.kill(actors[idx])  # if merely unreachable
                actors[idx] = self._new_model(idx) if role == "model" else self._new_worker(idx)
                replaced += 1
                pending[submit()] = (j, True)
            except ray.exceptions.RayTaskError as e:
                if role != "model":  # a bug or a reward that cannot be built: not a per-sample failure
                    raise
                results[j] = e  # a reward model's failed call fails its samples (score() says how)
        return results, replaced

    def shutdown(self):
        self.closed = True
        # Workers kill their subprocesses first; orphans would also leave on their own, within a second.
        try:
            ray.get([w.shutdown.remote() for w in self.workers], timeout=10)
        except Exception:  # a worker already dead or stuck: ray.kill below still ends it
            pass
        for actor in [*self.workers, *self.models.values()]:
            ray.kill(actor)


_FAILURES = None


def _failures():
    """groupflow_reward_failed_samples{kind} on Ray's metrics endpoint: failed samples (and replaced workers)."""
    global _FAILURES
    if _FAILURES is None:
        from ray.util.metrics import Counter
        _FAILURES = Counter("groupflow_reward_failed_samples", "failed reward samples by kind; replaced workers",
                            ("run", "role", "rank", "kind"))
        _FAILURES.set_default_tags({"run": ray.get_runtime_context().get_job_id(), "role": "rewards", "rank": "0"})
    return _FAILURES


def _model_value(v) -> tuple[str, object]:
    if isinstance(v, str):  # the error that failed this sample's chunk (model_reward.RewardModel.score)
        return "raised", v
    try:
        return "ok", check_result(v, 0)
    except (TypeError, ValueError) as e:
        return "invalid", str(e)
