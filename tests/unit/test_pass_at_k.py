"""pass@k (Chen et al. 2021) against values worked by hand, and the prune band and export."""
import json
import math
from itertools import combinations

import pytest

from cluster.evaluate import pass_at_k
from cluster.prune import export_row, in_band
from rewards.config import TaskConfig
from rewards.data import Fields, load_rows
from rewards.tasks import make_task
from tests.conftest import GSM8K


@pytest.mark.parametrize("n,c,k,expected", [
    (4, 1, 1, 0.25),             # one of four correct, one draw
    (4, 1, 4, 1.0),              # all four drawn: the correct one is among them
    (5, 2, 2, 1 - 3 / 10),       # 1 - C(3,2)/C(5,2) = 0.7
    (5, 0, 3, 0.0),              # nothing correct
    (5, 5, 1, 1.0),
    (10, 3, 5, 1 - 21 / 252),    # 1 - C(7,5)/C(10,5)
])
def test_pass_at_k_by_hand(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_equals_the_fraction_of_k_subsets_holding_a_correct_sample():
    samples = [1, 0, 0, 1, 0, 0]  # n=6, c=2
    for k in range(1, 7):
        subsets = list(combinations(samples, k))
        assert pass_at_k(6, 2, k) == pytest.approx(sum(map(any, subsets)) / len(subsets))


def test_pass_at_k_is_stable_for_large_n():
    # C(1000, 500) overflows a float; the product form does not.
    assert pass_at_k(1000, 1, 500) == pytest.approx(0.5)
    assert 0.0 < pass_at_k(1000, 3, 10) < 1.0 and not math.isnan(pass_at_k(1000, 3, 10))


@pytest.mark.parametrize("n,c,k", [(4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_band_is_open_unless_asked():
    assert [in_band(r, 0.0, 1.0) for r in (0.0, 0.25, 1.0)] == [False, True, False]
    assert in_band(0.0, 0.0, 1.0, inclusive_low=True) and in_band(1.0, 0.0, 1.0, inclusive_high=True)
    assert not in_band(0.75, 0.25, 0.75) and in_band(0.75, 0.25, 0.75, inclusive_high=True)


def test_kept_rows_read_back_as_the_same_prompts(tmp_path):
    """kept.jsonl is data: arithmetic as a dataset task, gsm8k in its own layout."""
    arith = make_task(TaskConfig(eval_size=2), seed=0)
    rows = arith.train_prompts(3)
    path = tmp_path / "arith.jsonl"
    path.write_text("".join(json.dumps(export_row(arith.cfg, r, 0.5)) + "\n" for r in rows))
    back, _ = load_rows(path, "jsonl", Fields(prompt="prompt", answer="answer", system="system", id="id"))
    assert [b["id"] for b in back] == [r["id"] for r in rows]
    assert [float(b["answer"]) for b in back] == [r["answer"] for r in rows]
    assert {b["system"] for b in back} == {arith.system_prompt}

    gsm = make_task(TaskConfig(name="gsm8k", data_path=GSM8K, eval_size=2), seed=0)
    rows = gsm.train_prompts(3)
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(export_row(gsm.cfg, r, 0.5)) + "\n" for r in rows))
    again = make_task(TaskConfig(name="gsm8k", data_path=path, eval_size=1), seed=0)
    both = again.train_prompts() + again.eval_prompts()
    assert [b["messages"] for b in both] == [r["messages"] for r in rows]
    assert [b["answer"] for b in both] == [r["answer"] for r in rows]


def test_solved_means_correct_not_a_high_summed_reward():
    import pyarrow as pa

    from cluster.evaluate import count_solved
    # sample 0: right answer, no format (1 + 0); sample 1: wrong answer, good format (0 + 1)
    scored = pa.table({"group_id": [0, 0], "reward": [1.0, 1.0], "reward_math": [1.0, 0.0],
                       "reward_format": [0.0, 1.0]})
    assert count_solved(scored, 1) == [1]
    assert count_solved(scored.drop_columns(["reward_math"]), 1) == [2]  # no correctness column: the total
