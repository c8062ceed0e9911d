"""Tasks: where prompts come from and how a completion is scored.

A task row is a plain dict {"id", "messages", "answer"}; it crosses to engines and reward workers as
data. `score` is a pure function of (completion text, answer) so reward workers can run it anywhere.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

from .config import TaskConfig

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


class Task:
    """A prompt source plus its scorer. Subclasses fill `_train` and `_eval` with rows."""

    system_prompt: str = ""

    def __init__(self, cfg: TaskConfig, seed: int):
        self.cfg = cfg
        self.seed = seed
        if cfg.system_prompt is not None:
            self.system_prompt = cfg.system_prompt
        self._train: list[dict] = []
        self._eval: list[dict] = []
        self._epoch, self._cursor, self._order = 0, 0, []

    def _row(self, rid: str, question: str, answer: float) -> dict:
        messages = [{"role": "user", "content": question}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return {"id": rid, "messages": messages, "answer": answer}

    def next_prompts(self, n: int) -> list[dict]:
        """The next n training rows, reshuffled deterministically from the seed at every epoch."""
        out = []
        while len(out) < n:
            if self._cursor >= len(self._order):
                self._order = list(range(len(self._train)))
                random.Random(self.seed * 1000 + self._epoch).shuffle(self._order)
                self._epoch, self._cursor = self._epoch + 1, 0
            out.append(self._train[self._order[self._cursor]])
            self._cursor += 1
        return out

    def eval_prompts(self) -> list[dict]:
        return list(self._eval)

    @staticmethod
    def score(completion: str, answer: float) -> float:
        return 1.0 if numbers_equal(last_number(completion), answer) else 0.0


class ArithmeticTask(Task):
    """Generated sums and differences; the held-out split never shares a problem with training."""

    system_prompt = "Reply with only the final number."

    def __init__(self, cfg: TaskConfig, seed: int, train_size: int = 20000):
        super().__init__(cfg, seed)
        rng = random.Random(seed)
        seen: set[tuple] = set()
        rows: list[dict] = []
        while len(rows) < train_size + cfg.eval_size:
            a, b = rng.randint(0, cfg.max_operand), rng.randint(0, cfg.max_operand)
            op = rng.choice(cfg.operations)
            if (a, op, b) in seen:
                if len(seen) >= (cfg.max_operand + 1) ** 2 * len(cfg.operations):
                    break
                continue
            seen.add((a, op, b))
            value = {"+": a + b, "-": a - b, "*": a * b}[op]
            rows.append(self._row(f"arith-{len(rows)}", f"What is {a} {op} {b}?", float(value)))
        self._eval, self._train = rows[: cfg.eval_size], rows[cfg.eval_size:]


class GSM8KTask(Task):
    """GSM8K in its own layout: {"question", "answer": "... #### 18"}; the last rows are held out."""

    system_prompt = "Solve the problem. End with 'The answer is N.'"

    def __init__(self, cfg: TaskConfig, seed: int):
        super().__init__(cfg, seed)
        rows = []
        path = Path(cfg.data_path)
        with path.open() as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    answer = parse_number(rec["answer"].split("####")[-1])
                    if answer is None:
                        raise ValueError("no number after ####")
                except (ValueError, KeyError, AttributeError) as e:
                    raise ValueError(f"{path}:{lineno}: malformed GSM8K row ({e})") from None
                rows.append(self._row(f"gsm8k-{lineno}", rec["question"], answer))
        self._eval, self._train = rows[-cfg.eval_size:], rows[: -cfg.eval_size]


TASKS = {"arithmetic": ArithmeticTask, "gsm8k": GSM8KTask}


def make_task(cfg: TaskConfig, seed: int) -> Task:
    return TASKS[cfg.name](cfg, seed)
