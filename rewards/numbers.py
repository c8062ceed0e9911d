"""Number extraction shared by the tasks and the built-in rewards.

Standard library only: scoring processes import it through rewards.builtin, and must not pay for
pydantic and pyarrow (rewards.tasks) in every process. rewards.tasks re-exports these names.
"""
from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def parse_number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").strip())
    except ValueError:
        return None


def last_number(text: str) -> float | None:
    """The last number in a completion: the usual answer extraction for short math answers."""
    found = _NUMBER.findall(text)
    return parse_number(found[-1]) if found else None


def numbers_equal(pred: float | None, answer: float) -> bool:
    return pred is not None and abs(pred - answer) < 1e-6
