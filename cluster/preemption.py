"""SIGTERM / SIGINT (a preemption, `ray job stop`, Ctrl-C): end the run at a step boundary.

The first signal asks the loop to stop after the step in flight. If that step's update has not
begun within `grace_s`, the step is dropped (its generation and scoring are redone after a resume).
An update that has begun is finished, never abandoned half-applied. A second signal stops at once
(the checkpoints already written are whole: see checkpoint.py).
The loop then writes a checkpoint of the last finished step and the CLI exits with 128 + signal.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Callable, TypeVar

T = TypeVar("T")

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name} at a step boundary")


class Preemption:
    """A context that owns the driver's SIGTERM/SIGINT handlers while a run is in it."""

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.signum: int | None = None
        self._droppable = False
        self._expired = False
        self._timer: threading.Timer | None = None
        self._old: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():  # handlers live in the main thread only
            self._old = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for s, old in self._old.items():
            signal.signal(s, old)

    def _handle(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum = signum
            print(f"groupflow: {signal.Signals(signum).name}: stopping after the step in flight "
                  f"(dropped if its update has not begun within {self.grace_s:g}s), then a checkpoint",
                  flush=True)
            self._timer = threading.Timer(self.grace_s, self._expire)
            self._timer.daemon = True
            self._timer.start()
            return
        # A second signal: stop now, as its default action would. Raising here instead would surface
        # inside a Ray call as a SystemError, and checkpoints are never half-written anyway.
        print(f"groupflow: second {signal.Signals(signum).name}: stopping at once", flush=True)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def _expire(self) -> None:
        self._expired = True

    def droppable(self, fn: Callable[[], T]) -> T:
        """fn() is the part of a step that can be dropped whole (before the update begins): it runs
        in a thread while this one waits, so a preemption past its grace can leave it behind."""
        if self._expired:
            raise Preempted(self.signum)
        box: dict = {}

        def run():
            try:
                box["value"] = fn()
            except BaseException as e:  # re-raised in the caller's thread
                box["error"] = e
        worker = threading.Thread(target=run, name="groupflow-step", daemon=True)
        worker.start()
        while worker.is_alive():
            if self._expired:
                raise Preempted(self.signum)
            worker.join(0.2)
        if "error" in box:
            raise box["error"]
        return box["value"]
