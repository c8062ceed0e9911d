"""Faults on real runs of the smoke config, with real signals to real processes: an engine killed
mid-generation; a learner rank killed mid-update; an engine killed before a weight push; a run dir that
cannot be written; a disk that fills during a checkpoint. (Preemption and --resume auto: the
`ray job stop` test in test_job_submit.py and test_preemption.py.)"""
import json
import os
import signal
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


def processes(title: str) -> list[int]:
    """Pids of Ray workers whose process title is `title` (Ray sets ray::Class.method while a call runs)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if f.read().split(b"\0")[0].decode(errors="replace").strip() == title:
                    found.append(int(entry))
        except (OSError, ValueError):
            continue
    return found


def when(title: str, proc, after_step: int, run_dir) -> int:
    """The pid of a process titled `title`, once `after_step` steps are logged."""
    deadline = time.monotonic() + 600
    while not (len(steps(run_dir)) >= after_step and processes(title)):
        assert proc.poll() is None, proc.stdout.read()[-5000:]
        assert time.monotonic() < deadline, f"no {title} after step {after_step}"
        time.sleep(0.05)
    return processes(title)[0]


def test_dead_engine_dead_learner_rank_and_a_push_to_a_dead_engine(tmp_path):
    run_dir = tmp_path / "run"
    proc = start(run_dir, "trainer.steps=5", "trainer.checkpoint_every=1", "engines.max_new_tokens=48")
    os.kill(when("ray::RolloutActor.generate", proc, 1, run_dir), signal.SIGKILL)  # step 2: replaced in place
    os.kill(when("ray::LearnerActor.train", proc, 2, run_dir), signal.SIGKILL)  # step 3: restart from step 2
    when("ray::LearnerActor.train", proc, 3, run_dir)  # step 4's update runs: an idle engine dies, so
    os.kill(processes("ray::RolloutActor")[0], signal.SIGKILL)  # the weight push finds a dead peer
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-6000:]
    assert "starting a replacement (1 of at most 3)" in out
    assert "a training step: learner rank" in out and "restarting from the newest checkpoint (1 of at most 2)" in out
    assert "weight sync v4" in out and "restarting from the newest checkpoint (2 of at most 2)" in out
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]  # each step once, the lost ones redone
    assert [r["restarts"] for r in rows] == [0, 0, 1, 2, 2]
    assert rows[1]["engine_restarts"] == 1
    # the replacement engine got the current weights before generating; every prompt kept its G samples
    assert all(r["logprob_abs_diff_mean"] < 1e-3 for r in rows), [r["logprob_abs_diff_mean"] for r in rows]
    import pyarrow.parquet as pq
    table = pq.read_table(run_dir / "rollouts" / "step_000002.parquet")
    assert table.num_rows == 32 and len(set(table.column("prompt_id").to_pylist())) == 8


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
