"""Exactly once: what a checkpoint of step s must say, so that no step is trained twice or lost.

A checkpoint's parts are written by different hands: the learner's DeepSpeed shards (its optimizer
step count), the learner's policy version, the driver's data cursor and step number. They must tell
one history. Each is checked twice: before a checkpoint is renamed into place (a disagreeing one is
never written) and after a resume loads it (a disagreeing one is never trained on).

- policy version == step: one update per trainer step;
- optimizer steps == those of the checkpoint resumed + (steps since) x epochs x minibatches;
- rows drawn by the data cursor == prompts_per_step per step (at least that with dynamic sampling,
  which draws more to refill).
"""
from __future__ import annotations

from pathlib import Path

from .checkpoint import CheckpointError


def rows_drawn(cursor: dict) -> int:
    """Training rows a task's data cursor (rewards/tasks.py `state()`) has handed out."""
    epoch, rows = int(cursor["epoch"]), int(cursor["data"]["rows"])
    return (epoch - 1) * rows + int(cursor["cursor"]) if epoch else 0


class Ledger:
    def __init__(self, cfg, step: int, counts: dict | None):
        """`step`, `counts`: where this run (re)starts, and the counts its checkpoint recorded (None
        for a fresh run, or a checkpoint older than this ledger: then only the version is checked)."""
        self.updates_per_step = cfg.learner.epochs * cfg.learner.minibatches
        self.prompts_per_step = cfg.trainer.prompts_per_step
        self.refills = cfg.algorithm.dynamic_sampling.enabled
        self.step = step
        self.base = counts if counts is not None else (
            {"policy_version": 0, "optimizer_steps": 0, "rows_drawn": 0} if step == 0 else None)

    def expected(self, step: int) -> dict:
        """What the learner and the cursor must hold after `step` (None: unknown, not checked)."""
        n = step - self.step
        if self.base is None:
            return {"policy_version": step, "optimizer_steps": None, "rows_drawn": None}
        return {"policy_version": step,
                "optimizer_steps": self.base["optimizer_steps"] + n * self.updates_per_step,
                "rows_drawn": self.base["rows_drawn"] + n * self.prompts_per_step}

    def _compare(self, step: int, found: dict, what: str) -> None:
        wrong = []
        for key, want in self.expected(step).items():
            have = found.get(key)
            if want is None or have is None:
                continue
            if have != want and not (key == "rows_drawn" and self.refills and have > want):
                wrong.append(f"{key} is {have} where step {step} means {want}")
        if wrong:
            raise CheckpointError(f"{what}: its parts disagree ({'; '.join(wrong)}): a step would be trained "
                                  "twice or lost, so it is refused")

    def agree(self, step: int, learner: dict, cursor: dict) -> dict:
        """The counts a checkpoint of `step` records, once the learner's (what its ranks wrote) and the
        data cursor are found to agree with `step`; else CheckpointError, and nothing is written."""
        counts = {"policy_version": learner["policy_version"], "optimizer_steps": learner["optimizer_steps"],
                  "rows_drawn": rows_drawn(cursor)}
        self._compare(step, counts, f"the checkpoint of step {step}")
        return counts

    def check_loaded(self, ckpt: Path, learner: dict | None, cursor: dict) -> None:
        """After a resume: the checkpoint's recorded counts, what the learner loaded from its shards and
        the restored data cursor must all be those of its step."""
        what = f"the checkpoint {ckpt}"
        if self.base is None:  # older than this ledger: nothing recorded to check against
            return
        self._compare(self.step, self.base, what)
        if learner is not None:
            self._compare(self.step, {k: learner[k] for k in ("policy_version", "optimizer_steps")}, what)
            if not learner.get("rng", True):
                raise CheckpointError(f"{what}: a learner rank's RNG state is missing: it is not whole")
        self._compare(self.step, {"rows_drawn": rows_drawn(cursor)}, what)
