"""Tasks: where prompts come from and how a completion is scored.

A task row is a plain dict {"id", "messages", "answer", "metadata"}; it crosses to engines and
reward workers as data. The engine applies the model's chat template to "messages". Rewards are
scored by the reward pool (rewards/builtin.py, DEFAULT_REWARD below); `Task.score` is the task's own
quick check, kept for tests and scripts.

The training order is a deterministic shuffle per epoch from the seed; `state()` / `load_state()`
carry the data cursor through a checkpoint so a resumed run continues with exactly the next prompt.
"""
from __future__ import annotations

import logging
import math
import random
import re
from pathlib import Path
from typing import Any, Callable, Optional

from .config import TaskConfig
from .data import Fields, Malformed, chat_token_counter, fingerprint, load_rows
from .numbers import last_number, numbers_equal, parse_number  # noqa: F401 - re-exported

log = logging.getLogger("groupflow.rewards")

CountTokens = Callable[[list[dict]], int]


def last_boxed(text: str) -> str | None:
    r"""The contents of the last \boxed{...}, braces balanced (so \boxed{\frac{1}{2}} works)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j].strip()
    return None


class Task:
    """A prompt source plus its scorer. Subclasses implement `_load`."""

    system_prompt: str = ""

    def __init__(self, cfg: TaskConfig, seed: int, count_tokens: Optional[CountTokens] = None):
        self.cfg = cfg
        self.seed = seed
        if cfg.system_prompt is not None:
            self.system_prompt = cfg.system_prompt
        self.skipped: dict[str, int] = {"malformed": 0, "too_long": 0}
        train, held = self._load()
        if cfg.max_prompt_tokens is not None:
            if count_tokens is None:
                raise ValueError("rewards.task.max_prompt_tokens needs a token counter: "
                                 "make_task(cfg, seed, tokenizer_path=<model dir>)")
            train = self._fit(train, count_tokens)
            held = None if held is None else self._fit(held, count_tokens)
        if held is None:  # hold out the tail, after dropping, so eval_size rows really are held out
            if len(train) <= cfg.eval_size:
                raise ValueError(f"rewards.task.eval_size={cfg.eval_size} leaves no training rows "
                                 f"out of {len(train)} usable rows")
            train, held = train[:-cfg.eval_size], train[-cfg.eval_size:]
        if not train:
            raise ValueError("no training rows are left after dropping malformed and too-long rows")
        self._train, self._eval = train, held[: cfg.eval_size]
        self._fingerprint = fingerprint(self._train)
        self._epoch, self._cursor, self._order = 0, 0, []
        if any(self.skipped.values()):
            log.info("task %s: skipped %s", cfg.name, self.skipped)

    def _load(self) -> tuple[list[dict], Optional[list[dict]]]:
        """(train rows, held-out rows); held-out None: the base class holds out the last eval_size."""
        raise NotImplementedError

    def _fit(self, rows: list[dict], count_tokens: CountTokens) -> list[dict]:
        kept = [r for r in rows if count_tokens(r["messages"]) <= self.cfg.max_prompt_tokens]
        self.skipped["too_long"] += len(rows) - len(kept)
        return kept

    def _row(self, rid: str, question: str, answer: Any, system: Optional[str] = None,
             metadata: Optional[dict] = None) -> dict:
        messages = [{"role": "user", "content": question}]
        system = system or self.system_prompt
        if system:
            messages.insert(0, {"role": "system", "content": system})
        return {"id": rid, "messages": messages, "answer": answer, "metadata": metadata or {}}

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(len(self._train)))
        random.Random(self.seed * 1000 + epoch).shuffle(order)
        return order

    def next_prompts(self, n: int) -> list[dict]:
        """The next n training rows, reshuffled deterministically from the seed at every epoch."""
        out = []
        while len(out) < n:
            if self._cursor >= len(self._order):
                self._order = self._shuffled(self._epoch)
                self._epoch, self._cursor = self._epoch + 1, 0
            out.append(self._train[self._order[self._cursor]])
            self._cursor += 1
        return out

    def eval_prompts(self) -> list[dict]:
        return list(self._eval)

    def train_prompts(self, n: Optional[int] = None) -> list[dict]:
        """The first n training rows (all with None) in data order, unshuffled: for evaluation and
        pruning, which must not move the training cursor."""
        return list(self._train[:n])

    def state(self) -> dict:
        """The data cursor, JSON-ready for a checkpoint: `epoch` counts the shuffles drawn so far."""
        return {"seed": self.seed, "epoch": self._epoch, "cursor": self._cursor, "data": dict(self._fingerprint)}

    def load_state(self, state: dict) -> None:
        """Continue exactly where `state()` was taken; refuses a state saved on other data or seed."""
        if state.get("data") != self._fingerprint:
            saved = state.get("data") or {}
            raise ValueError(
                f"the checkpoint's data cursor was saved on other training data ({saved.get('rows')} rows, "
                f"ids sha256 {str(saved.get('ids_sha256'))[:12]}) than this run has ({self._fingerprint['rows']} "
                f"rows, ids sha256 {self._fingerprint['ids_sha256'][:12]}); resume with the same data and "
                "rewards.task settings")
        if state.get("seed") != self.seed:
            raise ValueError(f"the checkpoint's data order was drawn with trainer.seed={state.get('seed')}, "
                             f"this run has trainer.seed={self.seed}")
        epoch, cursor = int(state["epoch"]), int(state["cursor"])
        if epoch < 0 or not 0 <= cursor <= (len(self._train) if epoch else 0):
            raise ValueError(f"invalid data cursor in checkpoint: epoch={epoch}, cursor={cursor}")
        self._order = self._shuffled(epoch - 1) if epoch else []
        self._epoch, self._cursor = epoch, cursor

    @staticmethod
    def score(completion: str, answer: float) -> float:
        return 1.0 if numbers_equal(last_number(completion), answer) else 0.0


class ArithmeticTask(Task):
    """Generated sums and differences; the held-out split never shares a problem with training."""

    system_prompt = "Reply with only the final number."

    def __init__(self, cfg: TaskConfig, seed: int, train_size: int = 20000,
                 count_tokens: Optional[CountTokens] = None):
        self.train_size = train_size
        super().__init__(cfg, seed, count_tokens)

    def _load(self):
        cfg, rng = self.cfg, random.Random(self.seed)
        seen: set[tuple] = set()
        rows: list[dict] = []
        while len(rows) < self.train_size + cfg.eval_size:
            a, b = rng.randint(0, cfg.max_operand), rng.randint(0, cfg.max_operand)
            op = rng.choice(cfg.operations)
            if (a, op, b) in seen:
                if len(seen) >= (cfg.max_operand + 1) ** 2 * len(cfg.operations):
                    break
                continue
            seen.add((a, op, b))
            value = {"+": a + b, "-": a - b, "*": a * b}[op]
            rows.append(self._row(f"arith-{len(rows)}", f"What is {a} {op} {b}?", float(value)))
        return rows[cfg.eval_size:], rows[: cfg.eval_size]


class DatasetTask(Task):
    """Rows from a jsonl/parquet/Arrow file or folder, fields mapped by the config (rewards/data.py).

    Answers stay text; `score` compares numbers when the gold answer is one, else \\boxed{} contents.
    """

    id_prefix: Optional[str] = None

    def _parse_answer(self, text: str) -> Any:
        return text

    def _read(self, path: Path) -> list[dict]:
        cfg = self.cfg
        fields = Fields(prompt=cfg.prompt_field, answer=cfg.answer_field, system=cfg.system_prompt_field,
                        id=cfg.id_field, metadata=tuple(cfg.metadata_fields), answer_after=cfg.answer_after)
        recs, skipped = load_rows(path, cfg.format, fields, on_malformed=cfg.on_malformed,
                                  id_prefix=self.id_prefix, parse_answer=self._parse_answer)
        self.skipped["malformed"] += skipped["malformed"]
        return [self._row(r["id"], r["prompt"], r["answer"], r["system"], r["metadata"]) for r in recs]

    def _load(self):
        train = self._read(Path(self.cfg.data_path))
        return train, None if self.cfg.eval_path is None else self._read(Path(self.cfg.eval_path))

    @staticmethod
    def score(completion: str, answer: Any) -> float:
        if answer is None:
            raise ValueError("this dataset has no gold answers (answer_field is null); configure a reward "
                             "that does not need one")
        if isinstance(answer, str):
            gold = last_boxed(answer) or answer.strip()
            number = parse_number(gold)
            if number is None:  # a symbolic answer: compare boxed contents, spaces and $ aside
                pred = last_boxed(completion)
                norm = lambda s: re.sub(r"[\s$]", "", s)  # noqa: E731
                return 1.0 if pred is not None and norm(pred) == norm(gold) else 0.0
            answer = number
        boxed = last_boxed(completion)
        pred = parse_number(boxed) if boxed is not None else last_number(completion)
        return 1.0 if numbers_equal(pred, answer) else 0.0


class GSM8KTask(DatasetTask):
    """GSM8K in its own layout: {"question", "answer": "... #### 18"}; a preset of DatasetTask
    (the config fills in its fields) whose answer is the number after the last ####."""

    system_prompt = "Solve the problem. End with 'The answer is N.'"
    id_prefix = "gsm8k"
    score = staticmethod(Task.score)

    def _parse_answer(self, text: str) -> float:
        value = parse_number(text)
        if value is None or not math.isfinite(value):  # float() also takes "nan" and "inf"
            raise Malformed(f"no number after #### (got {text[:40]!r})")
        return value


TASKS = {"arithmetic": ArithmeticTask, "gsm8k": GSM8KTask, "dataset": DatasetTask}


# The reward a task scores with when rewards.components is empty.
DEFAULT_REWARD = {"arithmetic": "last_number", "gsm8k": "math", "dataset": "math"}


def make_task(cfg: TaskConfig, seed: int, tokenizer_path: Optional[str | Path] = None) -> Task:
    """The configured task; with max_prompt_tokens set, prompts are measured with this model's chat template."""
    count = chat_token_counter(tokenizer_path) if cfg.max_prompt_tokens and tokenizer_path else None
    return TASKS[cfg.name](cfg, seed, count_tokens=count)
