"""The step's phases as functions over roles and Arrow tables; loop.py calls them in order."""
from __future__ import annotations

import time
from collections import defaultdict

import pyarrow as pa
import pyarrow.compute as pc
import torch

from actors.group import EngineGroup, Generation, split
from learner.algorithms import ADVANTAGES, overlong_penalty, process_advantages
from learner.config import AlgorithmConfig


def step_seed(seed: int, step: int) -> int:
    """The sampling seed of a step: a resumed run draws what the uninterrupted one would have."""
    return (seed * 1_000_003 + step * 10_007) % 2**62


def generate(engines: EngineGroup, rows: list[dict], n: int, timeout_s: float, greedy: bool = False,
             first_group: int = 0, seed: int | None = None) -> pa.Table:
    """n samples per row, spread over the engines (EngineGroup.generate)."""
    return engines.generate(rows, n, timeout_s, greedy, first_group, seed)


def prompt_text(row: dict) -> str:
    """The last user turn of a task row: what a reward sees as the prompt."""
    return next((m["content"] for m in reversed(row["messages"]) if m["role"] == "user"), "")


def score(pool, rollouts: pa.Table, rows: list[dict]) -> tuple[pa.Table, dict]:
    """Append the reward (and per-component, per-step) columns; returns the table and failure counts.

    `rows[group_id]` is the task row each sample answers.
    """
    cols = {c: rollouts.column(c).to_pylist() for c in
            ("prompt_id", "group_id", "completion", "completion_token_ids", "completion_offsets")}
    samples = []
    for pid, g, text, ids, offsets in zip(*cols.values()):
        row = rows[g]
        samples.append({"id": pid, "prompt": prompt_text(row), "completion": text, "answer": row["answer"],
                        "metadata": {**row.get("metadata", {}), "token_offsets": offsets},
                        "completion_token_ids": ids})
    out = pool.score(samples)
    rewards = out["rewards"]
    if "env_reward" in rollouts.column_names:  # an environment's per-turn rewards add to the task's
        rewards = [r + e for r, e in zip(rewards, rollouts.column("env_reward").to_pylist())]
    table = rollouts.append_column("reward", pa.array(rewards, pa.float32()))
    for name, values in out["components"].items():
        table = table.append_column(f"reward_{name}", pa.array(values, pa.float32()))
    if out.get("steps") is not None:
        steps = [s or [] for s in out["steps"]]
        table = table.append_column("step_rewards", pa.array([[float(r) for r, _ in s] for s in steps],
                                                             pa.list_(pa.float32())))
        table = table.append_column("step_ends", pa.array([[int(e) for _, e in s] for s in steps],
                                                          pa.list_(pa.int32())))
    # worker_replaced counts actors, not samples: summed failure totals leave it out
    return table, {**out["failures"], "worker_replaced": out["workers_replaced"]}


def failed_samples(failures: dict) -> int:
    """Samples whose reward failed, by any kind; `worker_replaced` counts actors and is left out."""
    return sum(v for k, v in failures.items() if k != "worker_replaced")


def _group_rewards(batch: pa.Table) -> dict[int, list[float]]:
    groups: dict[int, list[float]] = defaultdict(list)
    for g, r in zip(batch.column("group_id").to_pylist(), batch.column("reward").to_pylist()):
        groups[g].append(r)
    return groups


def _span(table: pa.Table) -> tuple[float, float]:
    meta = table.schema.metadata or {}
    return float(meta[b"generate_began"]), float(meta[b"generate_ended"])


def collect(generator, pool, task, first: Generation, prompts: int, group_size: int,
            algo: AlgorithmConfig, seed: int | None = None) -> tuple[pa.Table, dict]:
    """Wait for a submitted generation of `prompts` groups and score it. With dynamic sampling (DAPO),
    groups whose rewards are all equal carry no signal: drop them and generate for fresh prompts, at
    most max_rounds rounds; if still short, the dropped groups fill the batch so its shape stays fixed.

    stats: time_generate_s (the engines' time, all rounds), time_reward_s, generation_rounds, reward
    failures, and generate_began/generate_ended (wall clock) for the driver's idle accounting."""
    ds = algo.dynamic_sampling
    rows: list[dict] = list(first.rows)
    tables, failures = [], defaultdict(int)
    stats = {"time_generate_s": 0.0, "time_reward_s": 0.0, "generation_rounds": 0}
    informative: list[int] = []
    gen = first
    for _ in range(ds.max_rounds if ds.enabled else 1):
        if gen is None:  # a refill round
            new = task.next_prompts(prompts - len(informative))
            gen = generator.submit(new, group_size, first_group=len(rows), seed=seed)
            rows += gen.rows  # as submitted: with an environment's first messages
        rollouts = generator.collect(gen)
        gen = None
        began, ended = _span(rollouts)
        stats.setdefault("generate_began", began)
        stats["generate_ended"] = ended
        t1 = time.monotonic()
        table, fails = score(pool, rollouts.replace_schema_metadata(None), rows)
        stats["time_generate_s"] += ended - began
        stats["time_reward_s"] += time.monotonic() - t1
        stats["generation_rounds"] += 1
        for k, v in fails.items():
            failures[k] += v
        tables.append(table)
        informative += [g for g, r in _group_rewards(table).items() if max(r) > min(r)]
        if len(informative) >= prompts:
            break
    batch = pa.concat_tables(tables, promote_options="default")
    if ds.enabled:
        flat = [g for g in _group_rewards(batch) if g not in set(informative)]
        chosen = (informative + flat)[:prompts]
        stats["pruned_groups"] = len(_group_rewards(batch)) - len(informative)
        stats["zero_variance_groups_kept"] = max(0, prompts - len(informative))
        # keep the chosen groups, renumbered 0..prompts-1 so rows[] follows the batch
        renumber = {g: i for i, g in enumerate(chosen)}
        keep = pc.is_in(batch.column("group_id"), pa.array(chosen, pa.int32()))
        batch = batch.filter(keep)
        batch = batch.set_column(batch.schema.get_field_index("group_id"), "group_id",
                                 pa.array([renumber[g] for g in batch.column("group_id").to_pylist()], pa.int32()))
        batch = batch.sort_by("group_id")
    stats["reward_failures"] = failed_samples(failures)
    stats.update({f"reward_failures_{k}": v for k, v in failures.items()})
    return batch, stats


def with_advantages(batch: pa.Table, algo: AlgorithmConfig, kl_sums: list[float], max_new_tokens: int) -> pa.Table:
    """Shape the rewards (overlong penalty, KL in the reward) and compute advantages.

    ppo computes its advantages on the learner (GAE needs the critic); the others here, per group.
    Under process supervision a scalar shaping term is a step ending at the last token.
    """
    rewards = torch.tensor(batch.column("reward").to_pylist(), dtype=torch.float32)
    lengths = torch.tensor(pc.list_value_length(batch.column("completion_token_ids")).to_pylist())
    shaping = torch.zeros_like(rewards)
    if algo.overlong.buffer:
        shaping += overlong_penalty(lengths, max_new_tokens, algo.overlong.buffer, algo.overlong.factor)
    if algo.kl_place == "reward" and algo.name != "ppo":
        shaping -= algo.beta * torch.tensor(kl_sums, dtype=torch.float32)
    batch = batch.append_column("shaped_reward", pa.array((rewards + shaping).tolist(), pa.float32()))
    if algo.name == "ppo":
        return batch
    groups = torch.tensor(batch.column("group_id").to_pylist())
    if algo.supervision == "outcome":
        adv = ADVANTAGES[algo.baseline](rewards + shaping, groups, eps=algo.adv_eps)
        return batch.append_column("advantage", pa.array(adv.tolist(), pa.float32()))
    # A batch where no sample returned steps (all scalars, or all failed): each reward is one step
    # ending at the last token, the same rule the reward pool applies within a sample.
    n = batch.num_rows
    last = [max(0, int(L) - 1) for L in lengths]
    if "step_rewards" in batch.column_names:
        step_rewards = batch.column("step_rewards").to_pylist()
        step_ends = batch.column("step_ends").to_pylist()
    else:
        step_rewards, step_ends = [None] * n, [None] * n
    for i in range(n):
        if not step_rewards[i]:
            step_rewards[i], step_ends[i] = [float(rewards[i])], [last[i]]
    for i, s in enumerate(shaping.tolist()):
        if s:
            step_rewards[i] = step_rewards[i] + [s]
            step_ends[i] = step_ends[i] + [last[i]]
    adv = process_advantages(step_rewards, step_ends, groups, max(1, int(lengths.max())), eps=algo.adv_eps)
    per_token = [adv[i, : int(lengths[i])].tolist() for i in range(len(lengths))]
    batch = batch.append_column("advantage", pa.array(adv[:, 0].tolist(), pa.float32()))
    return batch.append_column("advantage_tokens", pa.array(per_token, pa.list_(pa.float32())))


PREPARE_COLUMNS = ("prompt_token_ids", "completion_token_ids", "logprobs", "finish_reason", "loss_mask")


def shards(batch: pa.Table, num_ranks: int, seed: int, columns=PREPARE_COLUMNS, batch_id: int = 0) -> list[dict]:
    """Equal contiguous slices, one per learner rank, as plain columns; `batch_id` names the batch
    (the learner keeps each prepared batch's state under it until it trains on it)."""
    cols = [c for c in columns if c in batch.column_names]
    out = []
    for a, b in split(batch.num_rows, num_ranks):
        part = batch.slice(a, b - a)
        out.append({c: part.column(c).to_pylist() for c in cols} | {"seed": seed, "batch_id": batch_id})
    return out


def train_shards(batch: pa.Table, num_ranks: int, seed: int, algo: AlgorithmConfig, batch_id: int = 0) -> list[dict]:
    extra = ("shaped_reward",) if algo.name == "ppo" else ("advantage", "advantage_tokens")
    out = shards(batch, num_ranks, seed, PREPARE_COLUMNS + extra, batch_id)
    for s in out:
        if "shaped_reward" in s:
            s["reward"] = s.pop("shaped_reward")
        if algo.supervision == "outcome":
            s.pop("advantage_tokens", None)
    return out


def rollout_stats(batch: pa.Table, trained_at: int | None = None) -> dict:
    """The batch's statistics; with `trained_at`, the policy version its update starts from, the
    policy lag of its samples (0 when generated by that very policy)."""
    rewards = batch.column("reward")
    lengths = pc.list_value_length(batch.column("completion_token_ids"))
    n = batch.num_rows
    stats = {
        "reward_mean": pc.mean(rewards).as_py(),
        "reward_std": pc.stddev(rewards, ddof=0).as_py(),
        "response_length_mean": pc.mean(lengths).as_py(),
        "generated_tokens": int(pc.sum(lengths).as_py()),
        "truncated_fraction": pc.sum(pc.equal(batch.column("finish_reason"), "length")).as_py() / n,
        "policy_version": int(pc.min(batch.column("policy_version")).as_py()),
    }
    if trained_at is not None:  # how many updates old the policy that generated each sample is
        lag = pc.subtract(pa.scalar(trained_at, pa.int32()), batch.column("policy_version"))
        stats.update(policy_lag_min=pc.min(lag).as_py(), policy_lag_mean=pc.mean(lag).as_py(),
                     policy_lag_max=pc.max(lag).as_py())
    for name in batch.column_names:
        if name.startswith("reward_"):
            stats[f"{name}_mean"] = pc.mean(batch.column(name)).as_py()
    if "loss_mask" in batch.column_names:
        stats.update(conversation_stats(batch))
    return stats


def conversation_stats(batch: pa.Table) -> dict:
    """Multi-turn batches: turns, tool calls and their success, why trajectories ended, and the
    model's own tokens (generated_tokens counts those; observations are not generated)."""
    from .multiturn import STOP_REASONS

    n = batch.num_rows
    calls, errors = pc.sum(batch.column("tool_calls")).as_py(), pc.sum(batch.column("tool_errors")).as_py()
    reasons = batch.column("stop_reason").to_pylist()
    model_tokens = sum(sum(m) for m in batch.column("loss_mask").to_pylist())
    out = {"turns_mean": pc.mean(batch.column("turns")).as_py(), "turns_max": pc.max(batch.column("turns")).as_py(),
           "tool_calls_per_sample": calls / n, "tool_call_success_rate": (calls - errors) / calls if calls else 0.0,
           "generated_tokens": model_tokens, "observation_tokens": int(pc.sum(pc.list_value_length(
               batch.column("completion_token_ids"))).as_py()) - model_tokens,
           "env_reward_mean": pc.mean(batch.column("env_reward")).as_py(),
           "env_failures": sum(r.startswith("env_") for r in reasons)}
    out.update({f"stop_{r}_fraction": reasons.count(r) / n for r in STOP_REASONS})
    return out


def with_token_counts(batch: pa.Table) -> pa.Table:
    """The rollouts parquet: what was generated, its reward and advantage, token counts."""
    batch = batch.append_column("prompt_tokens", pc.list_value_length(batch.column("prompt_token_ids")))
    return batch.append_column("completion_tokens", pc.list_value_length(batch.column("completion_token_ids")))
