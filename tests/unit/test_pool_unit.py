"""Reward composition and validation without Ray: weighted sums, merged steps, failure accounting."""
import math

import pytest
from pydantic import ValidationError

from rewards.config import RewardComponent, RewardsConfig
from rewards.pool import combine, component_keys
from rewards.procpool import check_result


def test_component_keys_number_repeated_names():
    comps = [RewardComponent(name=n) for n in ("math", "format", "math")]
    assert component_keys(comps) == ["math_1", "format", "math_2"]


@pytest.mark.parametrize("value, expected", [
    (1, 1.0), (True, 1.0), (0.5, 0.5), ([(1, 0), (0.5, 2)], [(1.0, 0), (0.5, 2)])])
def test_check_result_accepts_numbers_and_steps(value, expected):
    assert check_result(value, 3) == expected


@pytest.mark.parametrize("value", [None, "1.0", math.nan, math.inf, [], [(1.0, 3)], [(1.0, -1)],
                                   [(1.0, 0.5)], [(math.nan, 0)], {"r": 1}])
def test_check_result_rejects_garbage(value):
    with pytest.raises((TypeError, ValueError)):
        check_result(value, 3)


def test_combine_weighted_steps_and_failures():
    samples = [{"id": f"q{i}", "completion_token_ids": [0] * 5} for i in range(3)]
    results = {"a": [("ok", 1.0), ("ok", 2.0), ("timeout", "slow")],
               "b": [("ok", [(0.5, 1), (1.5, 4)]), ("ok", 4.0), ("ok", 1.0)]}
    out = combine(samples, ["a", "b"], {"a": 1.0, "b": 0.5}, results, failure_reward=-2.0)
    assert out["rewards"] == [1.0 + 0.5 * 2.0, 2.0 + 0.5 * 4.0, -2.0]
    assert out["components"] == {"a": [1.0, 2.0, -2.0], "b": [2.0, 4.0, 1.0]}
    assert out["steps"] == [[(0.25, 1), (0.75 + 1.0, 4)], None, None]
    assert out["failures"]["timeout"] == 1 and sum(out["failures"].values()) == 1


def test_combine_without_steps_reports_none():
    samples = [{"id": "q0", "completion_token_ids": []}]
    out = combine(samples, ["a"], {"a": 2.0}, {"a": [("ok", 0.5)]}, 0.0)
    assert out == {"rewards": [1.0], "components": {"a": [0.5]}, "steps": None,
                   "failures": {k: 0 for k in ("raised", "timeout", "crashed", "invalid", "worker_replaced")}}


def test_component_options_are_checked(tmp_path):
    fn = tmp_path / "r.py"
    fn.write_text("def f(p, c, m):\n    return 1.0\n")
    RewardComponent(name="python", options={"function": f"{fn}:f"})
    for bad, named in [({"name": "python", "options": {"function": f"{fn}"}}, "file.py:function"),
                       ({"name": "python", "options": {"function": f"{tmp_path}/nope.py:f"}}, "nope.py"),
                       ({"name": "http", "options": {}}, "options.url"),
                       ({"name": "model", "options": {"path": str(tmp_path)}}, "config.json"),
                       ({"name": "nonsense"}, "name")]:
        with pytest.raises(ValidationError, match=named):
            RewardsConfig(components=[bad])
    with pytest.raises(ValidationError, match="sample_timeout_s"):
        RewardsConfig(sample_timeout_s=0)
