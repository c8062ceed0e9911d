"""A run's checkpoints: `checkpoints/step_N`, each whole or absent, and `final` naming the last one.

Every learner rank writes its part (HF export, DeepSpeed shards with the optimizer moments, RNG) into
a temp dir beside the target; the driver adds trainer_state.json, flushes, renames, and syncs the
directory, so the rename survives a power loss. Only names starting `step_` are listed, and a dir is
only ever renamed to one when whole, so a writer or pruner killed at any point leaves no listed
half checkpoint:
- a killed write leaves `.step_N.partial`, removed by the next write of step N;
- an overwrite moves the old `step_N` aside to `.step_N.old` before renaming the new one in; killed
  between the two, `complete_steps` renames `.step_N.old` back (and removes it once stale);
- pruning renames `step_N` to `.step_N.deleting` before deleting it; the next write or prune
  removes what a killed delete left.
One process at a time writes a run dir's checkpoints, and `complete_steps` counts as one: it repairs.
On several hosts the run dir must be storage every learner node sees (as for any DeepSpeed run).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

from .metrics import atomic_write

STATE = "trainer_state.json"  # written last: a directory without it is not a checkpoint
_STEP = re.compile(r"step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the message names the path and the cause."""


def ensure_writable(run_dir: Path) -> None:
    """Fail before anything starts when the run dir cannot be written, naming it and why."""
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        probe = Path(run_dir) / ".groupflow-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"the run directory {run_dir} is not writable: "
                              f"{e.strerror or e} ({e.filename or run_dir})") from None


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def complete_steps(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every complete checkpoint, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if root.is_dir():
        _recover(root)
    found = []
    for d in root.iterdir() if root.is_dir() else ():
        m = _STEP.match(d.name)
        if m and not d.is_symlink() and (d / STATE).is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


def latest(run_dir: Path) -> Path | None:
    steps = complete_steps(run_dir)
    return steps[-1][1] if steps else None


def _recover(root: Path) -> None:
    """Finish what a killed writer or pruner left in `root` (see the module's docstring)."""
    for d in root.glob(".*.deleting"):
        shutil.rmtree(d, ignore_errors=True)
    for old in root.glob(".step_*.old"):
        target = root / old.name[1:-len(".old")]
        if not _STEP.match(target.name) or not (old / STATE).is_file():
            continue
        if not os.path.lexists(target):  # killed between the two renames: this is step N
            os.replace(old, target)
            _fsync_dir(root)
        elif (target / STATE).is_file():
            _remove(old)


def _remove(d: Path) -> None:
    """Delete `d` out of sight: renamed to a name no reader lists first, so a killed delete is no
    half checkpoint; what a killed rmtree leaves goes on the next write or prune."""
    gone = d.with_name(f".{d.name.lstrip('.')}.deleting")
    shutil.rmtree(gone, ignore_errors=True)
    try:
        os.replace(d, gone)
    except FileNotFoundError:
        return
    _fsync_dir(d.parent)
    shutil.rmtree(gone, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    """A rename (or a new entry) is durable only once its directory is synced."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_state(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / STATE).read_text())


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def write(learner, target: Path, trainer_state: dict | Callable[[dict], dict], full: bool = True) -> Path:
    """Write a checkpoint to `target` atomically (see the module's docstring). `trainer_state` may be
    a function of what the learner reports it wrote (its counters): raising there writes nothing."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.partial")
    old = target.with_name(f".{target.name}.old")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _recover(target.parent)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a writer that was killed
        tmp.mkdir()
        written = learner.save(str(tmp), full)
        state = trainer_state(written) if callable(trainer_state) else trainer_state
        (tmp / STATE).write_text(json.dumps(state, indent=2))
        _fsync_tree(tmp)
        for d, _, _ in os.walk(tmp):  # the parts' entries, not only their data
            _fsync_dir(d)
        if target.exists():  # moved aside, not deleted first: killed here, _recover restores it
            _remove(old)
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        _remove(old)
    except Exception as e:
        cause = _root_cause(e)
        try:  # writers say "file write failed" where the reason is a full disk: say so
            free = shutil.disk_usage(target.parent).free
            if free < 2**20:
                cause += f" (the disk holding it is full: {free} bytes free)"
        except OSError:
            pass
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write the checkpoint {target}: {cause}; "
                              "the earlier checkpoints are untouched") from e
    return target


def _root_cause(e: BaseException) -> str:
    """The OSError behind a Ray task error (a full disk on a learner rank), else the error itself."""
    while not isinstance(e, OSError) and (getattr(e, "cause", None) or e.__cause__) is not None:
        e = getattr(e, "cause", None) or e.__cause__
    lines = str(e).strip().splitlines()
    return lines[-1] if lines else type(e).__name__


def mark_final(run_dir: Path, ckpt: Path) -> Path:
    """`checkpoints/final` -> the last step's checkpoint (a relative symlink, replaced atomically)."""
    final = Path(run_dir) / "checkpoints" / "final"
    if final.is_dir() and not final.is_symlink():  # a real directory from an older layout
        shutil.rmtree(final)
    link = final.with_name(".final.link")
    link.unlink(missing_ok=True)
    link.symlink_to(Path(ckpt).name)
    os.replace(link, final)
    _fsync_dir(final.parent)
    return final


def prune(run_dir: Path, keep: int) -> list[Path]:
    """Remove all but the newest `keep` complete checkpoints (0 keeps all); returns what went."""
    steps = complete_steps(run_dir)
    gone = [d for _, d in steps[:-keep]] if keep and len(steps) > keep else []
    for d in gone:
        _remove(d)
    return gone


def rewind(run_dir: Path, step: int) -> None:
    """Resuming into the same run dir at `step`: the later steps' metrics and rollouts go, so every
    step is then recorded exactly once. Later checkpoints are never deleted: refuse instead."""
    later = [d for s, d in complete_steps(run_dir) if s > step]
    if later:
        raise CheckpointError(f"{run_dir} holds checkpoints after step {step} ({later[-1].name}): "
                              "resume from the newest (--resume auto) or into another run dir")
    metrics = Path(run_dir) / "metrics.jsonl"
    if metrics.is_file():
        kept = [line for line in metrics.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        atomic_write(metrics, lambda p: p.write_text("".join(line + "\n" for line in kept)))
    for f in (Path(run_dir) / "rollouts").glob("step_*.parquet"):
        m = _STEP.match(f.stem)
        if m and int(m.group(1)) > step:
            f.unlink()
