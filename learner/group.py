"""LearnerGroup: the driver's handle on N learner ranks; every call goes to all ranks at once."""
from __future__ import annotations

import threading
import time

import ray

from .actor import LearnerActor
from .config import AlgorithmConfig, LearnerConfig


class MemberDied(RuntimeError):
    """An actor of a collective call died; `member` names it (e.g. "learner rank 1")."""

    def __init__(self, member: str, message: str):
        self.member = member
        super().__init__(message)


def wait_all(refs: list, names: list[str], timeout_s: float, what: str) -> list:
    """The results of a collective call, or an error naming who did not answer: within timeout_s, or
    as soon as a member is found dead (the others would wait for it in a collective until their own
    timeout, so nobody waits for them)."""
    name = dict(zip(refs, names))
    pending, deadline = list(refs), time.monotonic() + timeout_s
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            raise TimeoutError(f"{what}: no answer within {timeout_s:g}s from {', '.join(name[r] for r in pending)}")
        try:
            ray.get(ready[0])
        except ray.exceptions.RayActorError as e:
            raise _died(name, ready[0], e, pending, what) from None
        except ray.exceptions.RayTaskError:
            # A survivor's collective broke ("Connection reset by peer") before Ray reported the member
            # that died: give Ray a few seconds to say who, so the caller restarts rather than fails.
            done, _ = ray.wait(pending, num_returns=len(pending), timeout=10)
            for ref in done:
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    raise _died(name, ref, e, [r for r in pending if r != ref], what) from None
                except ray.exceptions.RayTaskError:
                    pass
            raise
    return ray.get(list(refs))


def _died(name: dict, ref, error: BaseException, pending: list, what: str) -> MemberDied:
    lines = [x for x in str(error).strip().splitlines() if x.strip()]
    return MemberDied(name[ref], f"{what}: {name[ref]} died ({lines[0] if lines else type(error).__name__})"
                      f"{'; still waiting: ' + ', '.join(name[r] for r in pending) if pending else ''}")


def _get(ref, timeout_s: float, what: str):
    return wait_all([ref], ["learner rank 0"], timeout_s, what)[0]


def _rank_mean(results: list[dict]) -> dict:
    return {k: sum(r[k] for r in results) / len(results) for k in results[0]}


def _token_mean(stats: list[dict]) -> dict:
    # a rank may lack a statistic (no token of its sample picked): the ranks that have it weigh in
    keys = {k for s in stats for k in s} - {"tokens", "logprob_abs_diff_sum", "logprob_tokens"}
    merged = {k: sum(s[k] * s["tokens"] for s in stats if k in s) / max(sum(s["tokens"] for s in stats if k in s), 1.0)
              for k in sorted(keys)}
    diff_n = sum(s["logprob_tokens"] for s in stats)
    merged["logprob_abs_diff_mean"] = sum(s["logprob_abs_diff_sum"] for s in stats) / max(1, diff_n)
    return merged


def _agreed(counters: list[dict], path: str) -> dict:
    """The ranks' counters, which must be one: ranks that disagree hold different training histories."""
    if any(c != counters[0] for c in counters):
        raise RuntimeError(f"the learner ranks disagree on how far they trained ({counters}) at {path}")
    return counters[0]


class LearnerGroup:
    def __init__(self, cfg: LearnerConfig, algo: AlgorithmConfig, model_path: str, local_batch: int,
                 temperature: float, max_new_tokens: int, actor_options: list[dict], timeout_s: float,
                 mode: str = "rl", ref_path: str | None = None, version: int = 0):
        self.cfg, self.timeout_s = cfg, timeout_s
        self.version = version  # the policy version on the ranks: updates applied
        self._order = threading.Lock()
        n = cfg.num_ranks
        self.ranks = [
            LearnerActor.options(num_cpus=cfg.cpus_per_rank, num_gpus=1 if cfg.device == "cuda" else 0,
                                 **opts).remote(cfg, algo, model_path, r, n, local_batch, temperature,
                                                max_new_tokens, ref_path, version)
            for r, opts in enumerate(actor_options)
        ]
        try:
            master, port = _get(self.ranks[0].address.remote(), timeout_s, "reporting rank 0's address")
            nodes = self.call("node", what="reporting the ranks' nodes")
            self.call("setup", per_rank=[(master, port, mode, nodes.count(n)) for n in nodes],
                      what="learner start-up (DeepSpeed init)")
        except BaseException:  # nobody gets this group to shut down: release its ranks now
            self.shutdown()
            raise

    def call(self, method: str, *args, what: str | None = None, per_rank: list | None = None):
        refs = self._submit(method, [per_rank[r] if per_rank else args for r in range(len(self.ranks))])
        return wait_all(refs, [f"learner rank {r}" for r in range(len(refs))], self.timeout_s, what or method)

    def start(self, method: str, *args) -> list:
        """Fire a collective call without waiting (weight sync runs alongside the engines)."""
        return self._submit(method, [args] * len(self.ranks))

    def _submit(self, method: str, args: list) -> list:
        # Collective calls must reach every rank in the same order: the rollout thread (an engine's
        # replacement joining the weight sync) and the loop may both call the ranks.
        with self._order:
            return [getattr(a, method).remote(*args[r]) for r, a in enumerate(self.ranks)]

    def prepare(self, shards: list[dict]) -> tuple[dict, list[float]]:
        """pi_old / pi_ref (/ critic) pass on every rank; returns its time and each sample's KL sum."""
        results = self.call("prepare", per_rank=[(s,) for s in shards], what="scoring the batch (pi_old, pi_ref)")
        return {"time_prepare_s": max(r["time_s"] for r in results)}, [x for r in results for x in r["kl_sum"]]

    def train(self, shards: list[dict]) -> dict:
        """The update on every rank: its metrics averaged over ranks, and the statistics of pi_old
        and pi_ref weighted by each rank's tokens."""
        results = self.call("train", per_rank=[(s,) for s in shards], what="a training step")
        scored = [r.pop("scored") for r in results]
        self.version = results[0].pop("policy_version")
        for r in results[1:]:
            r.pop("policy_version")
        return {**_rank_mean(results), **_token_mean(scored)}

    def sft_train(self, shards: list[dict]) -> dict:
        return _rank_mean(self.call("sft_train", per_rank=[(s,) for s in shards], what="an SFT step"))

    def peak_memory(self) -> list[dict]:
        return self.call("peak_memory")

    def save(self, path: str, full: bool = True) -> dict:
        """Every rank writes its part into `path` (cluster/checkpoint.py makes it atomic); returns
        the counters (policy version, optimizer steps) of what was written, which all ranks share."""
        return _agreed(self.call("save_checkpoint", path, full, what=f"saving a checkpoint into {path}"), path)

    def load(self, path: str) -> dict:
        """Restore the DeepSpeed states and RNG of a full checkpoint on every rank; returns the roles
        restored, whether every rank's RNG was, and the counters of the state loaded."""
        parts = self.call("load_checkpoint", path, what=f"loading the checkpoint {path}")
        return {**_agreed([{k: p[k] for k in ("policy_version", "optimizer_steps")} for p in parts], path),
                "restored": parts[0]["restored"], "rng": all(p["rng"] for p in parts)}

    def shutdown(self):
        for a in self.ranks:
            ray.kill(a)
