"""Tasks on real rows: the arithmetic generator and GSM8K from deploy/data/gsm8k."""
import json
from typing import get_args

import pytest

from rewards.config import TaskConfig
from rewards.tasks import TASKS, ArithmeticTask, GSM8KTask, Task, last_number
from tests.conftest import GSM8K


def test_arithmetic_is_deterministic_and_held_out():
    a = ArithmeticTask(TaskConfig(eval_size=50), seed=3)
    b = ArithmeticTask(TaskConfig(eval_size=50), seed=3)
    assert a.eval_prompts() == b.eval_prompts()
    assert a.next_prompts(20) == b.next_prompts(20)
    held = {r["messages"][-1]["content"] for r in a.eval_prompts()}
    train = {r["messages"][-1]["content"] for r in a._train}
    assert len(held) == 50 and not held & train
    row = a.eval_prompts()[0]
    x, op, y = row["messages"][-1]["content"].removeprefix("What is ").rstrip("?").split()
    assert row["answer"] == {"+": int(x) + int(y), "-": int(x) - int(y)}[op]


def test_epochs_reshuffle_from_the_seed():
    t = ArithmeticTask(TaskConfig(eval_size=10, max_operand=4, operations=["+"]), seed=0)
    n = len(t._train)
    first, second = t.next_prompts(n), t.next_prompts(n)
    assert sorted(r["id"] for r in first) == sorted(r["id"] for r in second)
    assert [r["id"] for r in first] != [r["id"] for r in second]


@pytest.mark.parametrize("text, answer, reward", [
    ("12 + 13 = 25", 25, 1.0), ("The answer is 1,234.", 1234, 1.0), ("-8", -8, 1.0),
    ("It is 7, not 8", 7, 0.0), ("no number here", 3, 0.0), ("3.50", 3.5, 1.0),
])
def test_score(text, answer, reward):
    assert Task.score(text, answer) == reward


def test_gsm8k_loads_real_rows_and_scores_their_answers():
    t = GSM8KTask(TaskConfig(name="gsm8k", data_path=GSM8K, eval_size=100), seed=0)
    assert len(t._train) + len(t.eval_prompts()) == 7473
    with open(GSM8K) as f:
        first = json.loads(f.readline())
    row = next(r for r in t._train if r["id"] == "gsm8k-1")
    assert row["messages"][-1]["content"] == first["question"]
    worked = first["answer"].split("####")[-1].strip()
    assert t.score(f"So the total is {worked}.", row["answer"]) == 1.0
    assert last_number(first["answer"]) == row["answer"]


def test_gsm8k_malformed_row_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"question": "q", "answer": "x #### 3"}\n{"question": "q"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        GSM8KTask(TaskConfig(name="gsm8k", data_path=f, eval_size=1), seed=0)


def test_every_configurable_task_has_a_class():
    # Reward workers look the scorer up by the configured name.
    assert set(get_args(TaskConfig.model_fields["name"].annotation)) == set(TASKS)
