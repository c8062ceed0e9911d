"""The step's phases as functions over roles and Arrow tables; loop.py calls them in order."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch

from learner.algorithms import ADVANTAGES
from learner.config import AlgorithmConfig


def _split(items: list, k: int) -> list[tuple[int, int]]:
    n = len(items)
    return [(i * n // k, (i + 1) * n // k) for i in range(k)]


def generate(engines: list, rows: list[dict], n: int, timeout_s: float, greedy: bool = False) -> pa.Table:
    """Each engine takes a contiguous share of the prompts, all at once; groups stay on one engine."""
    refs = [e.generate.remote(rows[a:b], list(range(a, b)), n, greedy)
            for e, (a, b) in zip(engines, _split(rows, len(engines))) if b > a]
    try:
        return pa.concat_tables(ray.get(refs, timeout=timeout_s))
    except ray.exceptions.GetTimeoutError:
        raise TimeoutError(f"engines did not generate {len(rows)} x {n} samples within {timeout_s}s") from None


def score(pool, rollouts: pa.Table, rows: list[dict]) -> tuple[pa.Table, int]:
    """Append the reward column; returns the table and how many scorers failed."""
    gids = rollouts.column("group_id").to_pylist()
    answers = [rows[g]["answer"] for g in gids]
    rewards, failures = pool.score(rollouts.column("prompt_id").to_pylist(),
                                   rollouts.column("completion").to_pylist(), answers)
    return rollouts.append_column("reward", pa.array(rewards, pa.float32())), failures


def with_advantages(batch: pa.Table, algo: AlgorithmConfig) -> pa.Table:
    rewards = torch.tensor(batch.column("reward").to_pylist())
    groups = torch.tensor(batch.column("group_id").to_pylist())
    adv = ADVANTAGES[algo.advantage](rewards, groups, eps=algo.adv_eps)
    return batch.append_column("advantage", pa.array(adv.tolist(), pa.float32()))


def shards(batch: pa.Table, num_ranks: int, seed: int) -> list[dict]:
    """Equal contiguous slices, one per learner rank, as plain columns."""
    cols = ("prompt_token_ids", "completion_token_ids", "logprobs", "advantage")
    out = []
    for a, b in _split(range(batch.num_rows), num_ranks):
        part = batch.slice(a, b - a)
        out.append({c: part.column(c).to_pylist() for c in cols} | {"seed": seed})
    return out


def evaluate(engines: list, pool, rows: list[dict], timeout_s: float) -> float:
    """Greedy pass@1 on held-out rows."""
    out, _ = score(pool, generate(engines, rows, 1, timeout_s, greedy=True), rows)
    return float(pc.mean(out.column("reward")).as_py())


def rollout_stats(batch: pa.Table) -> dict:
    rewards = batch.column("reward")
    lengths = pc.list_value_length(batch.column("completion_token_ids"))
    n = batch.num_rows
    return {
        "reward_mean": pc.mean(rewards).as_py(),
        "reward_std": pc.stddev(rewards, ddof=0).as_py(),
        "response_length_mean": pc.mean(lengths).as_py(),
        "generated_tokens": int(pc.sum(lengths).as_py()),
        "truncated_fraction": pc.sum(pc.equal(batch.column("finish_reason"), "length")).as_py() / n,
        "policy_version": int(pc.min(batch.column("policy_version")).as_py()),
    }


def with_token_counts(batch: pa.Table) -> pa.Table:
    """The rollouts parquet: what was generated, its reward and advantage, token counts."""
    batch = batch.append_column("prompt_tokens", pc.list_value_length(batch.column("prompt_token_ids")))
    return batch.append_column("completion_tokens", pc.list_value_length(batch.column("completion_token_ids")))
