"""A rollout as a conversation: the model takes a turn, the environment (rewards/envs.py) answers,
the model goes on, until the episode ends or a limit does.

Rounds of batched generation: every open trajectory of the batch takes its next turn in the same
engine call, and the environment steps of a round run in parallel in the reward workers'
subprocesses. Token ids stay exactly as sampled; an observation is tokenized once and appended (the
chat template is never re-applied to the history). Each sample carries a loss mask (1: tokens the
model sampled; 0: observation and template tokens) and where each model turn ends.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa

from actors.group import EngineGroup
from actors.rollout import ROLLOUT_SCHEMA
from rewards.config import RolloutConfig

MULTI_TURN_SCHEMA = ROLLOUT_SCHEMA.append(pa.field("loss_mask", pa.list_(pa.int8())))
for _f in (pa.field("turn_ends", pa.list_(pa.int32())), pa.field("turns", pa.int32()),
           pa.field("stop_reason", pa.string()), pa.field("env_reward", pa.float32()),
           pa.field("tool_calls", pa.int32()), pa.field("tool_errors", pa.int32()),
           pa.field("transcript", pa.string())):
    MULTI_TURN_SCHEMA = MULTI_TURN_SCHEMA.append(_f)
STOP_REASONS = ("done", "max_turns", "total_tokens", "turn_tokens", "observation_tokens", "env_timeout",
                "env_raised", "env_crashed", "env_invalid")


def start_rows(pool, rows: list[dict]) -> list[dict]:
    """Each row with its episode's first messages (the environment's start()); an environment that
    cannot start an episode is broken: the run stops naming it."""
    out = pool.env([{"op": "start", "row": r} for r in rows])
    started = []
    for row, (kind, value) in zip(rows, out):
        if kind != "ok":
            raise RuntimeError(f"rollout.env: start() of prompt {row['id']} failed ({kind}): {value}")
        started.append({**row, "messages": value})
    return started


@dataclass
class Trajectory:
    group: int
    prompt: list[int]
    version: int
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    turn_ends: list[int] = field(default_factory=list)
    turns: list[dict] = field(default_factory=list)  # {"role": "assistant" | "observation", "content"}
    last: dict = field(default_factory=dict)  # the latest model turn: text, offsets, finish_reason
    stop_reason: str | None = None
    env_reward: float = 0.0
    tool_calls: int = 0
    tool_errors: int = 0

    def add_turn(self, turn: dict, version: int) -> None:
        self.ids += turn["token_ids"]
        self.logprobs += turn["logprobs"]
        self.mask += [1] * len(turn["token_ids"])
        self.turn_ends.append(len(self.ids))
        self.turns.append({"role": "assistant", "content": turn["text"]})
        self.last, self.version = turn, min(self.version, version)

    def add_observation(self, text: str, ids: list[int]) -> None:
        self.ids += ids
        self.logprobs += [0.0] * len(ids)  # not sampled: no engine logprob, masked out of the loss
        self.mask += [0] * len(ids)
        self.turns.append({"role": "observation", "content": text})


def converse(engines: EngineGroup, pool, rows: list[dict], first: pa.Table, cfg: RolloutConfig,
             max_model_len: int, timeout_s: float, greedy: bool = False, seed: int | None = None
             ) -> tuple[pa.Table, dict]:
    """Continue the first turns in `first` (generated from `rows` started by start_rows; `rows[i]` is
    group first_group + i) until every trajectory ends. Returns the samples (MULTI_TURN_SCHEMA, in
    `first`'s order; `completion` is the last model turn's text, `transcript` the whole exchange)
    and the environment's failure counts (also readable from `stop_reason`)."""
    cols = first.to_pydict()
    trajs = []
    for i in range(first.num_rows):
        t = Trajectory(cols["group_id"][i], cols["prompt_token_ids"][i], cols["policy_version"][i])
        t.add_turn({"token_ids": cols["completion_token_ids"][i], "logprobs": cols["logprobs"][i],
                    "text": cols["completion"][i], "offsets": cols["completion_offsets"][i],
                    "finish_reason": cols["finish_reason"][i]}, cols["policy_version"][i])
        trajs.append(t)
    group0 = min(cols["group_id"]) if trajs else 0
    failures: Counter = Counter()
    for turn in range(1, cfg.max_turns + 1):
        for t in trajs:  # a turn cut by its token budget ends the trajectory (unless configured not to)
            if t.stop_reason is None and t.last["finish_reason"] == "length" and cfg.truncated_turn == "end":
                t.stop_reason = "turn_tokens"
        open_ = [t for t in trajs if t.stop_reason is None]
        if not open_:
            break
        steps = pool.env([{"op": "step", "row": rows[t.group - group0], "turns": t.turns[:-1],
                           "text": t.last["text"]} for t in open_])
        going = []
        for t, (kind, value) in zip(open_, steps):
            if kind != "ok":  # a tool that hung, raised or died ends this trajectory only
                t.stop_reason = f"env_{kind}"
                failures[kind] += 1
                continue
            t.env_reward += value["reward"]
            if value["tool_ok"] is not None:
                t.tool_calls += 1
                t.tool_errors += not value["tool_ok"]
            if value["observation"] is None:
                t.stop_reason = "done"
            elif turn == cfg.max_turns:
                t.stop_reason = "max_turns"
            else:
                going.append((t, value["observation"]))
        if not going:
            break
        budget = [min(cfg.max_total_tokens, max_model_len - len(t.prompt)) - len(t.ids) for t, _ in going]
        requests = [{"context": t.prompt + t.ids, "observation": obs, "budget": b, "cap": cfg.max_observation_tokens}
                    for (t, obs), b in zip(going, budget)]
        outs = engines.continue_turns(requests, timeout_s, greedy, None if seed is None else seed + 7919 * turn)
        for (t, obs), out in zip(going, outs):
            if out["skipped"]:  # a flood of output, or no room left: ends cleanly, nothing half-appended
                t.stop_reason = "observation_tokens" if out["observation_cut"] else "total_tokens"
                continue
            t.add_observation(obs, out["observation_ids"])
            t.add_turn(out, out["policy_version"])
    table = pa.table({
        "prompt_id": cols["prompt_id"], "group_id": cols["group_id"],
        "prompt_token_ids": [t.prompt for t in trajs], "completion_token_ids": [t.ids for t in trajs],
        "logprobs": [t.logprobs for t in trajs], "completion": [t.last["text"] for t in trajs],
        "completion_offsets": [t.last["offsets"] for t in trajs],
        "finish_reason": [t.last["finish_reason"] for t in trajs], "policy_version": [t.version for t in trajs],
        "loss_mask": [t.mask for t in trajs], "turn_ends": [t.turn_ends for t in trajs],
        "turns": [len(t.turn_ends) for t in trajs], "stop_reason": [t.stop_reason or "done" for t in trajs],
        "env_reward": [t.env_reward for t in trajs], "tool_calls": [t.tool_calls for t in trajs],
        "tool_errors": [t.tool_errors for t in trajs],
        "transcript": ["\n".join(x["content"] for x in t.turns) for t in trajs],
    }, schema=MULTI_TURN_SCHEMA)
    return table, {f"env_failures_{k}": failures[k] for k in ("timeout", "raised", "crashed", "invalid")}
