"""Checkpoint files on a real filesystem: atomic writes (also when the writer is killed), newest
complete, pruning, rewinding a run dir for a resume."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from cluster import checkpoint
from tests.conftest import ROOT


class FileLearner:
    """Stands in for the learner ranks: writes parts into the directory it is given."""

    def __init__(self, fail: Exception | None = None):
        self.fail = fail

    def save(self, path: str, full: bool = True) -> None:
        (checkpoint.Path(path) / "model.safetensors").write_bytes(b"w" * 1000)
        if self.fail:
            raise self.fail


def test_write_then_latest_prune_and_final(tmp_path):
    for step in (1, 2, 3):
        checkpoint.write(FileLearner(), checkpoint.step_dir(tmp_path, step), {"step": step})
    assert [s for s, _ in checkpoint.complete_steps(tmp_path)] == [1, 2, 3]
    assert checkpoint.latest(tmp_path).name == "step_000003"
    assert checkpoint.read_state(checkpoint.latest(tmp_path)) == {"step": 3}
    gone = checkpoint.prune(tmp_path, keep=2)
    assert [d.name for d in gone] == ["step_000001"]
    final = checkpoint.mark_final(tmp_path, checkpoint.step_dir(tmp_path, 3))
    assert os.readlink(final) == "step_000003" and (final / "trainer_state.json").is_file()
    checkpoint.mark_final(tmp_path, checkpoint.step_dir(tmp_path, 2))  # replaced, not duplicated
    assert os.readlink(final) == "step_000002"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["final", "step_000002", "step_000003"]


def test_a_failed_write_names_the_path_and_cause_and_leaves_nothing(tmp_path):
    checkpoint.write(FileLearner(), checkpoint.step_dir(tmp_path, 1), {"step": 1})
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.write(FileLearner(OSError(28, "No space left on device")), checkpoint.step_dir(tmp_path, 2),
                         {"step": 2})
    assert "step_000002" in str(e.value) and "No space left on device" in str(e.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000001"]
    assert checkpoint.latest(tmp_path).name == "step_000001"


def test_a_killed_writer_leaves_the_previous_checkpoint_whole(tmp_path):
    """SIGKILL while the parts are being written: no step_2, step_1 intact, the next write cleans up."""
    checkpoint.write(FileLearner(), checkpoint.step_dir(tmp_path, 1), {"step": 1})
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from cluster import checkpoint

        class Slow:
            def save(self, path, full=True):
                for i in range(1000):
                    (Path(path) / f"part_{{i}}").write_bytes(b"x" * 100000)
                    if i == 5:
                        print("writing", flush=True)
                    time.sleep(0.05)

        checkpoint.write(Slow(), checkpoint.step_dir(Path({str(tmp_path)!r}), 2), {{"step": 2}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == [".step_000002.partial", "step_000001"], names
    assert checkpoint.latest(tmp_path).name == "step_000001"
    assert checkpoint.read_state(checkpoint.latest(tmp_path)) == {"step": 1}
    checkpoint.write(FileLearner(), checkpoint.step_dir(tmp_path, 2), {"step": 2})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000001", "step_000002"]


def test_rewind_drops_later_steps_and_refuses_to_drop_checkpoints(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)))
    (tmp_path / "rollouts").mkdir()
    for s in (1, 2, 3):
        (tmp_path / "rollouts" / f"step_{s:06d}.parquet").write_bytes(b"")
    checkpoint.write(FileLearner(), checkpoint.step_dir(tmp_path, 2), {"step": 2})
    checkpoint.rewind(tmp_path, 2)
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert sorted(p.name for p in (tmp_path / "rollouts").iterdir()) == ["step_000001.parquet", "step_000002.parquet"]
    with pytest.raises(checkpoint.CheckpointError, match="after step 1"):
        checkpoint.rewind(tmp_path, 1)


def test_an_unwritable_run_dir_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(checkpoint.CheckpointError, match=f"{blocker / 'run'} is not writable"):
        checkpoint.ensure_writable(blocker / "run")


class Crash(BaseException):
    """A process killed at this point (no `except Exception` handler runs)."""


def names(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def test_a_pruner_killed_mid_delete_never_leaves_a_listed_half_checkpoint(tmp_path, monkeypatch):
    """rmtree killed after the parts but before trainer_state.json: step 1 must not be listed."""
    for step in (1, 2, 3):
        checkpoint.write(FileLearner(), checkpoint.step_dir(tmp_path, step), {"step": step})
    rmtree = checkpoint.shutil.rmtree

    def killed_rmtree(path, ignore_errors=False):
        if os.path.isdir(path):
            for f in checkpoint.Path(path).iterdir():
                if f.name != checkpoint.STATE:
                    f.unlink()
            raise Crash

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_rmtree)
    with pytest.raises(Crash):
        checkpoint.prune(tmp_path, keep=2)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", rmtree)
    assert [s for s, _ in checkpoint.complete_steps(tmp_path)] == [2, 3]
    assert all((d / "model.safetensors").is_file() for _, d in checkpoint.complete_steps(tmp_path))
    assert checkpoint.prune(tmp_path, keep=2) == []  # and the leftover goes
    assert names(tmp_path) == ["step_000002", "step_000003"]


def test_a_deleting_leftover_is_not_listed_and_the_next_write_removes_it(tmp_path):
    """A pruner killed between its rename and its rmtree leaves `.step_N.deleting`."""
    for step in (1, 2):
        checkpoint.write(FileLearner(), checkpoint.step_dir(tmp_path, step), {"step": step})
    os.rename(checkpoint.step_dir(tmp_path, 1), tmp_path / "checkpoints" / ".step_000001.deleting")
    assert [s for s, _ in checkpoint.complete_steps(tmp_path)] == [2]
    checkpoint.write(FileLearner(), checkpoint.step_dir(tmp_path, 3), {"step": 3})
    assert names(tmp_path) == ["step_000002", "step_000003"]


def test_a_writer_killed_between_the_renames_of_an_overwrite_loses_nothing(tmp_path):
    """Killed after step_N -> .step_N.old, before .step_N.partial -> step_N: step N is restored."""
    for step in (1, 2):
        checkpoint.write(FileLearner(), checkpoint.step_dir(tmp_path, step), {"step": step})
    root = tmp_path / "checkpoints"
    os.rename(root / "step_000002", root / ".step_000002.old")
    (root / ".step_000002.partial").mkdir()
    (root / ".step_000002.partial" / "model.safetensors").write_bytes(b"p")
    assert checkpoint.latest(tmp_path) == root / "step_000002"
    assert checkpoint.read_state(root / "step_000002") == {"step": 2}
    assert names(tmp_path) == [".step_000002.partial", "step_000001", "step_000002"]
    checkpoint.write(FileLearner(), root / "step_000002", {"step": 2, "again": True})  # overwrite works
    assert names(tmp_path) == ["step_000001", "step_000002"]
    assert checkpoint.read_state(checkpoint.latest(tmp_path)) == {"step": 2, "again": True}


def test_a_stale_old_copy_beside_its_checkpoint_is_removed(tmp_path):
    """Killed after both renames, before the old copy went: step_N is the newer one and stays."""
    checkpoint.write(FileLearner(), checkpoint.step_dir(tmp_path, 1), {"step": 1, "new": True})
    root = tmp_path / "checkpoints"
    (root / ".step_000001.old").mkdir()
    (root / ".step_000001.old" / checkpoint.STATE).write_text(json.dumps({"step": 1}))
    assert [s for s, _ in checkpoint.complete_steps(tmp_path)] == [1]
    assert names(tmp_path) == ["step_000001"]
    assert checkpoint.read_state(checkpoint.latest(tmp_path)) == {"step": 1, "new": True}


def test_fsync_dir_syncs_a_real_directory_and_refuses_a_file(tmp_path):
    checkpoint._fsync_dir(tmp_path)
    (tmp_path / "f").write_text("")
    with pytest.raises(NotADirectoryError):
        checkpoint._fsync_dir(tmp_path / "f")


def test_renames_are_followed_by_a_sync_of_their_directory(tmp_path, monkeypatch):
    """write, prune and mark_final sync checkpoints/ once their rename is in it."""
    synced = []
    sync = checkpoint._fsync_dir
    monkeypatch.setattr(checkpoint, "_fsync_dir", lambda d: (synced.append(sorted(os.listdir(d))), sync(d)))
    for step in (1, 2):
        checkpoint.write(FileLearner(), checkpoint.step_dir(tmp_path, step), {"step": step})
    assert synced[-1] == ["step_000001", "step_000002"]
    checkpoint.write(FileLearner(), checkpoint.step_dir(tmp_path, 2), {"step": 2})
    assert ["step_000001", "step_000002"] in synced  # the overwrite's renames
    checkpoint.prune(tmp_path, keep=1)
    assert ["step_000002"] in synced or [".step_000001.deleting", "step_000002"] in synced
    checkpoint.mark_final(tmp_path, checkpoint.step_dir(tmp_path, 2))
    assert synced[-1] == ["final", "step_000002"]
