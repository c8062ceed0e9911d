"""An example process reward for `rewards.components: [{name: python, options: {function:
deploy/rewards/steps.py:line_steps}}]` with `algorithm.supervision: process`.

Each line of the completion is a reasoning step; a step earns 1.0 when it states the gold answer.
The reward returns [(reward, end_token), ...]: metadata["token_offsets"][t] is the character offset
where completion token t ends, so a step ending at character c ends at the first token reaching c.
"""
from __future__ import annotations

import bisect
import re

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def line_steps(prompt: str, completion: str, metadata: dict) -> list[tuple[float, int]]:
    offsets = metadata.get("token_offsets") or []
    if not offsets:
        return []
    answer = metadata.get("answer")
    steps, start = [], 0
    for line in completion.splitlines(keepends=True):
        start += len(line)
        if not line.strip():
            continue
        hit = any(answer is not None and abs(float(x) - float(answer)) < 1e-6 for x in NUMBER.findall(line))
        end_token = min(bisect.bisect_left(offsets, start), len(offsets) - 1)
        steps.append((1.0 if hit else 0.0, end_token))
    return steps
