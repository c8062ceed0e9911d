"""Environments for the multi-turn mechanics test. A tiny random model never writes a tool call of
its own, so these make one out of whatever it wrote, and send it through the real built-in tool (the
calculator's parser). Some prompts get a tool that misbehaves, by row number:
1 hangs, 2 raises, 3 floods its output; the rest get two tool calls, then the episode ends."""
import time

from rewards.envs import CalculatorEnv


def _kind(row: dict) -> int:
    return int(row["id"].rsplit("-", 1)[1]) % 8


class _Forced:
    tool = None

    def __init__(self, options: dict):
        self.env = self.tool(options)

    def start(self, row: dict) -> list[dict]:
        return self.env.start(row)

    def step(self, row: dict, turns: list[dict], text: str):
        model_turns = 1 + sum(t["role"] == "assistant" for t in turns)
        if model_turns > 2:
            return None  # the episode ends after the third model turn
        kind = _kind(row) if model_turns == 2 else 0
        if kind == 1:
            time.sleep(3600)  # killed at rewards.sample_timeout_s
        if kind == 2:
            raise RuntimeError("the tool broke")
        if kind == 3:
            return "spam " * 5000  # over rollout.max_observation_tokens
        return self.env.step(row, turns, self.call(text))


class ForcedCalculator(_Forced):
    tool = CalculatorEnv

    def call(self, text: str) -> str:
        return f"<calc>{len(text)} * 7 + 1</calc>"
