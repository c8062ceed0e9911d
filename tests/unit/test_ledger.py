"""Exactly once, as counts: a checkpoint of step s is written and loaded only when the learner's policy
version, its optimizer steps and the data cursor all say s (cluster/ledger.py)."""
import pytest

from cluster.checkpoint import CheckpointError
from cluster.config import load_config
from cluster.ledger import Ledger, rows_drawn

ROWS = 100  # rows of the training set in the cursors below


def cursor(drawn: int) -> dict:
    """A data cursor (rewards/tasks.py state()) after `drawn` rows."""
    epoch, at = (0, 0) if drawn == 0 else (1 + (drawn - 1) // ROWS, (drawn - 1) % ROWS + 1)
    return {"seed": 0, "epoch": epoch, "cursor": at, "data": {"rows": ROWS, "ids_sha256": "x"}}


def cfg(*overrides):  # 8 prompts a step, 2 minibatches x 1 epoch = 2 optimizer steps a step
    return load_config(None, ["trainer.prompts_per_step=8", "learner.minibatches=2", *overrides])


def test_rows_drawn_counts_across_epochs():
    for n in (0, 1, 8, 99, 100, 101, 250):
        assert rows_drawn(cursor(n)) == n


def test_each_step_of_a_fresh_run_agrees():
    ledger = Ledger(cfg(), 0, None)
    for s in (1, 2, 5):
        assert ledger.agree(s, {"policy_version": s, "optimizer_steps": 2 * s}, cursor(8 * s)) == \
            {"policy_version": s, "optimizer_steps": 2 * s, "rows_drawn": 8 * s}


@pytest.mark.parametrize("learner, drawn, named", [
    ({"policy_version": 2, "optimizer_steps": 4}, 8, "policy_version is 2 where step 1 means 1"),  # step 2 trained, labelled 1
    ({"policy_version": 2, "optimizer_steps": 6}, 16, "optimizer_steps is 6 where step 2 means 4"),  # a step trained twice
    ({"policy_version": 2, "optimizer_steps": 4}, 24, "rows_drawn is 24 where step 2 means 16"),  # a batch drawn and lost
])
def test_a_checkpoint_whose_parts_disagree_is_refused(learner, drawn, named):
    step = 1 if "step 1" in named else 2
    with pytest.raises(CheckpointError, match=named):
        Ledger(cfg(), 0, None).agree(step, learner, cursor(drawn))


def test_dynamic_sampling_may_draw_more_rows_never_fewer():
    ledger = Ledger(cfg("algorithm.dynamic_sampling.enabled=true"), 0, None)
    ledger.agree(1, {"policy_version": 1, "optimizer_steps": 2}, cursor(20))
    with pytest.raises(CheckpointError, match="rows_drawn is 7"):
        ledger.agree(1, {"policy_version": 1, "optimizer_steps": 2}, cursor(7))


def test_a_resumed_run_counts_from_its_checkpoint_even_after_a_config_change():
    counts = {"policy_version": 3, "optimizer_steps": 6, "rows_drawn": 24}
    ledger = Ledger(cfg("learner.minibatches=4", "trainer.prompts_per_step=16"), 3, counts)
    ledger.check_loaded("ckpt", {"policy_version": 3, "optimizer_steps": 6, "rng": True}, cursor(24))
    assert ledger.agree(5, {"policy_version": 5, "optimizer_steps": 14}, cursor(56))["optimizer_steps"] == 14


@pytest.mark.parametrize("counts, loaded, drawn, named", [
    ({"policy_version": 2, "optimizer_steps": 4, "rows_drawn": 16}, {"optimizer_steps": 4}, 16, "policy_version is 2"),
    ({"policy_version": 3, "optimizer_steps": 6, "rows_drawn": 24}, {"optimizer_steps": 8}, 24, "optimizer_steps is 8"),
    ({"policy_version": 3, "optimizer_steps": 6, "rows_drawn": 24}, {"optimizer_steps": 6}, 32, "rows_drawn is 32"),
    ({"policy_version": 3, "optimizer_steps": 6, "rows_drawn": 24}, {"optimizer_steps": 6, "rng": False}, 24, "RNG"),
])
def test_a_loaded_checkpoint_whose_parts_disagree_is_never_trained_on(counts, loaded, drawn, named):
    with pytest.raises(CheckpointError, match=named):
        Ledger(cfg(), 3, counts).check_loaded("ckpt", {"policy_version": 3, **loaded}, cursor(drawn))


def test_a_checkpoint_older_than_the_ledger_is_loaded_as_before():
    Ledger(cfg(), 3, None).check_loaded("ckpt", {"policy_version": 3, "optimizer_steps": 0, "rng": False}, cursor(1))
