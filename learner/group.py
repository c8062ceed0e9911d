"""LearnerGroup: the driver's handle on N learner ranks; every call goes to all ranks at once."""
from __future__ import annotations

import ray

from .actor import LearnerActor
from .config import AlgorithmConfig, LearnerConfig


def _get(refs, timeout_s: float, what: str):
    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise TimeoutError(f"learner ranks did not finish {what} within {timeout_s}s") from None


class LearnerGroup:
    def __init__(self, cfg: LearnerConfig, algo: AlgorithmConfig, model_path: str, local_batch: int,
                 temperature: float, max_new_tokens: int, actor_options: list[dict], timeout_s: float):
        self.cfg, self.timeout_s = cfg, timeout_s
        n = cfg.num_ranks
        self.ranks = [
            LearnerActor.options(num_cpus=cfg.cpus_per_rank, num_gpus=1 if cfg.device == "cuda" else 0,
                                 **opts).remote(cfg, algo, model_path, r, n, local_batch, temperature,
                                                                      max_new_tokens)
            for r, opts in enumerate(actor_options)
        ]
        master, port = _get(self.ranks[0].address.remote(), timeout_s, "reporting rank 0's address")
        self.call("setup", master, port, what="learner start-up (DeepSpeed init)")

    def call(self, method: str, *args, what: str | None = None, per_rank: list | None = None):
        refs = [getattr(a, method).remote(*(per_rank[r] if per_rank else args))
                for r, a in enumerate(self.ranks)]
        return _get(refs, self.timeout_s, what or method)

    def start(self, method: str, *args) -> list:
        """Fire a collective call without waiting (weight sync runs alongside the engines)."""
        return [getattr(a, method).remote(*args) for a in self.ranks]

    def train(self, shards: list[dict]) -> dict:
        results = self.call("train", per_rank=[(s,) for s in shards], what="a training step")
        merged = {k: sum(r[k] for r in results) / len(results) for k in results[0]}
        diff_n = sum(r["logprob_tokens"] for r in results)
        merged["logprob_abs_diff_mean"] = sum(r["logprob_abs_diff_sum"] for r in results) / max(1, diff_n)
        for k in ("logprob_abs_diff_sum", "logprob_tokens"):
            merged.pop(k)
        return merged

    def save(self, path: str) -> str:
        return self.call("save_checkpoint", path, what=f"saving {path}")[0]

    def shutdown(self):
        for a in self.ranks:
            ray.kill(a)
