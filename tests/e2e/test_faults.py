"""Faults on real runs of the smoke config, with real signals to real processes: `groupflow chaos` (an
engine killed mid-generation; an engine killed before a weight push; a learner rank killed mid-update,
each against the clean run's weights); a run dir that cannot be written; a disk that fills during a
checkpoint. (Preemption and --resume auto: the
`ray job stop` test in test_job_submit.py and test_preemption.py.)"""
import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e


def start(run_dir, *overrides, env=None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cluster.cli", "train", "--config", "deploy/configs/smoke.yaml",
           "--run-dir", str(run_dir), "--no-progress", "trainer.eval=false", "trainer.eval_every=0", *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})


def steps(run_dir) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.is_file() else []


def test_chaos_run_ends_on_the_clean_runs_weights(smoke, tmp_path):
    """`groupflow chaos` against the session's smoke run: an engine killed mid-generation (replaced, its
    share regenerated), an idle engine found dead by the weight push (replaced in place, the push
    redone: no restart), a learner rank killed mid-update (restart from the newest checkpoint). Every
    step is logged once, every checkpoint's counts agree with its step, and the final weights, the
    learning metrics and the rollouts are the clean run's."""
    clean, clean_rows, _ = smoke
    out = tmp_path / "chaos.json"
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "chaos", "--config", "deploy/configs/smoke.yaml",
                           "--run-dir", str(tmp_path), "--clean", str(clean), "--json", str(out),
                           "--schedule", "0:engine-generating,1:engine-idle,1:learner-training",
                           "trainer.eval=false",  # step 1's sampling, not the held-out evaluation, is hit
                           "sync.timeout_s=60"],  # a push that waits out its time-out shows below
                          cwd=ROOT, capture_output=True, text=True, timeout=1500)
    log = (tmp_path / "chaos.log").read_text() if (tmp_path / "chaos.log").is_file() else ""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + log[-6000:]
    report = json.loads(out.read_text())
    gen, idle, learner = report["faults"]
    assert (gen["title"], gen["step_in_flight"], gen["recovery"]) == \
        ("ray::RolloutActor.generate", 1, "engine replaced in place"), gen
    assert (idle["step_in_flight"], idle["recovery"]) == (2, "engine replaced in place"), idle
    assert (learner["step_in_flight"], learner["recovery"]) == (3, "restart from the newest checkpoint"), learner
    assert "weight sync v2" in log and "died" in log  # the push found the idle engine dead, named it
    assert "restarting from the newest checkpoint (1 of at most 4)" in log
    assert report["driver_exits"] == [] and report["steps_logged"] == [1, 2, 3]  # each step once
    rows = [json.loads(line) for line in (tmp_path / "chaos" / "metrics.jsonl").read_text().splitlines()]
    assert [r["restarts"] for r in rows] == [0, 0, 1] and [r["engine_restarts"] for r in rows] == [1, 2, 0]
    # the survivors of the push to the dead engine were told to give up, not left to time out
    assert rows[1]["time_sync_s"] < 60 and rows[1]["weight_pushes"] == 1, rows[1]
    # the replacement engines got the current weights before generating
    assert all(r["logprob_abs_diff_mean"] < 1e-3 for r in rows), [r["logprob_abs_diff_mean"] for r in rows]
    # exactly once: the chaos run is the clean run (fp32; the regenerated share drawn with its seed)
    assert report["rollout_steps_equal"] == report["rollout_steps"] == 3, report
    assert report["max_abs_weight_diff"] < 1e-5, report
    for key in ("reward_mean", "loss", "grad_norm"):
        assert report["max_abs_metric_diff"][key] < 1e-4, (key, report["max_abs_metric_diff"])
    for step in (2, 3):  # every checkpoint's parts agree with its step (2 minibatches: 2 optimizer steps a step)
        state = json.loads((tmp_path / "chaos" / "checkpoints" / f"step_{step:06d}" / "trainer_state.json").read_text())
        assert state["counts"] == {"policy_version": step, "optimizer_steps": 2 * step, "rows_drawn": 8 * step}


def test_a_reward_worker_lost_twice_stops_the_run_with_the_last_step_checkpointed(tmp_path):
    """Not only a preemption or a dead engine keeps the run's progress: a reward whose every call
    kills its worker (the replacement dies on the same share) stops the run (exit 1, named) with the
    last step it finished checkpointed whole and agreeing with its step, though checkpoint_every is 0."""
    run_dir, mark = tmp_path / "run", tmp_path / "slow"
    proc = start(run_dir, "trainer.steps=3", "trainer.checkpoint_every=0", "engines.num_engines=1",
                 "learner.num_ranks=1", "rewards.components=[{name: python, options: "
                 "{function: tests/e2e/slow_reward.py:kill_worker_when_marked}}]", env={"GF_SLOW_MARK": str(mark)})
    deadline = time.monotonic() + 600
    while steps(run_dir) != [1]:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-5000:]
        time.sleep(0.05)
    mark.touch()
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1, out[-5000:]
    assert "died twice on the same share" in out, out[-5000:]
    done = steps(run_dir)  # step 2's batch may have been scored before the mark: then step 3's fails
    assert done in ([1], [1, 2]), done
    assert f"writing the checkpoint of step {done[-1]} before stopping" in out, out[-5000:]
    state = json.loads((run_dir / "checkpoints" / f"step_{done[-1]:06d}" / "trainer_state.json").read_text())
    assert state["counts"] == {"policy_version": done[-1], "optimizer_steps": 2 * done[-1], "rows_drawn": 8 * done[-1]}


def test_an_unwritable_run_dir_is_named_before_anything_starts(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = start(blocker / "run")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out[-3000:]
    assert f"the run directory {blocker / 'run'} is not writable" in out
    assert "engine up" not in out  # no actor was started


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs: room for the run's initial model (29 MB), not for a full checkpoint (~105 MB)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_a_disk_that_fills_during_a_checkpoint_is_named_and_nothing_half_written_remains(small_disk):
    run_dir = small_disk / "run"
    proc = start(run_dir, "trainer.steps=2", "trainer.checkpoint_every=1")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1, out[-5000:]
    assert f"could not write the checkpoint {run_dir / 'checkpoints' / 'step_000001'}" in out, out[-5000:]
    assert "full" in out or "No space left on device" in out, out[-3000:]
    assert os.listdir(run_dir / "checkpoints") == []  # no step_000001, no .partial
    assert steps(run_dir) == [1]  # what was written before stays
