"""Tool-use traces for a cold start (`groupflow traces`): conversations in which the model calls its
tool correctly and answers from the result, written as jsonl for `groupflow sft` (data.messages_field).
The first messages are the environment's own start(), so SFT sees the prompts RL will."""
from __future__ import annotations

import json
import re
from pathlib import Path

from .envs import make_env

QUESTION = re.compile(r"What is (.+)\?")


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.10g}"


def calculator_trace(env, row: dict) -> dict:
    """question -> <calc>expression</calc> -> <result>value</result> (the calculator's own) -> value."""
    m = QUESTION.search(next(x["content"] for x in reversed(row["messages"]) if x["role"] == "user"))
    if m is None:
        raise ValueError(f"row {row['id']}: no 'What is ...?' question to make a calculator call of")
    messages = env.start(row)
    call = f"<calc>{m.group(1)}</calc>"
    step = env.step(row, [], call)
    if not step or not step.get("tool_ok"):
        raise ValueError(f"row {row['id']}: the calculator could not evaluate {m.group(1)!r}")
    return {"id": row["id"], "messages": messages + [
        {"role": "assistant", "content": call}, {"role": "user", "content": step["observation"]},
        {"role": "assistant", "content": _number(row["answer"])}]}


def write_traces(task, env_name: str, count: int, out: Path) -> int:
    """`count` traces from the task's training prompts (never its held-out ones) into `out`."""
    if env_name != "calculator":
        raise ValueError(f"traces are made for the calculator environment, not {env_name!r}")
    env = make_env(env_name, {})
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = task.train_prompts(count)
    with out.open("w") as f:
        for row in rows:
            f.write(json.dumps(calculator_trace(env, row)) + "\n")
    return len(rows)
