"""The rollout schedule (cluster/pipeline.next_move), worked by hand for sync and async runs."""
import pytest

from cluster.config import ASYNC_TIS_CAP, ConfigError, load_config
from cluster.pipeline import next_move


def simulate(steps: int, k: int) -> list[dict]:
    """The loop's calls in order: take(s) (submitting s first if nothing is in flight), feed, update,
    feed. Returns per batch: the engine version that generated it, its lag, and pushes before it."""
    engine = learner = 0
    pending, nxt, pushes, out = None, 1, 0, []

    def feed():
        nonlocal engine, pending, nxt, pushes
        if pending is not None or nxt > steps:
            return
        push, submit = next_move(nxt, engine, learner, k)
        if push:
            engine, pushes = learner, pushes + 1
        if submit:
            pending, nxt = (nxt, engine), nxt + 1

    for step in range(1, steps + 1):
        if pending is None:
            feed()
        batch, generated_by = pending
        pending = None
        assert batch == step
        out.append({"batch": batch, "generated_by": generated_by, "lag": learner - generated_by, "pushes": pushes})
        feed()
        learner += 1  # the update
        feed()
    return out


def test_sync_generates_every_batch_with_the_newest_weights():
    runs = simulate(5, 0)
    assert [r["generated_by"] for r in runs] == [0, 1, 2, 3, 4]
    assert [r["lag"] for r in runs] == [0] * 5
    assert runs[-1]["pushes"] == 4  # after every update but the last (the evaluation pushes that one)


def test_async_one_step_off():
    runs = simulate(5, 1)
    # batch 2 is generated while step 1 trains, by the starting weights; then a push every step
    assert [r["generated_by"] for r in runs] == [0, 0, 1, 2, 3]
    assert [r["lag"] for r in runs] == [0, 1, 1, 1, 1]
    assert [r["pushes"] for r in runs] == [0, 0, 1, 2, 3]


def test_async_staleness_two_pushes_every_other_step():
    runs = simulate(7, 2)
    assert [r["generated_by"] for r in runs] == [0, 0, 0, 2, 2, 4, 4]
    assert [r["lag"] for r in runs] == [0, 1, 2, 1, 2, 1, 2]
    assert max(r["lag"] for r in runs) <= 2
    assert runs[-1]["pushes"] == 2


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_lag_never_exceeds_the_bound(k):
    runs = simulate(20, k)
    assert max(r["lag"] for r in runs) == k
    assert all(r["lag"] >= 0 for r in runs)


def test_async_config():
    cfg = load_config(None, ["trainer.mode=async"])
    assert cfg.algorithm.tis_cap == ASYNC_TIS_CAP  # the ratio needs the behaviour-policy weight
    assert load_config(None, ["trainer.mode=async", "algorithm.tis_cap=5"]).algorithm.tis_cap == 5
    assert load_config(None, []).algorithm.tis_cap is None
    with pytest.raises(ConfigError, match="sync.enabled"):
        load_config(None, ["trainer.mode=async", "sync.enabled=false"])
    with pytest.raises(ConfigError, match="max_staleness"):
        load_config(None, ["trainer.mode=async", "trainer.max_staleness=0"])
