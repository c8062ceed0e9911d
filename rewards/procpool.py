"""Scoring subprocesses with a hard wall-clock limit per call; a reward that hangs or dies costs one sample.

Why not signal-based timeouts: they only work in a process's main thread, and Ray runs actor methods
elsewhere (math-verify's own timeout silently returns 0 there). Why not ProcessPoolExecutor: one dead
process breaks the whole executor. So each slot is one fresh interpreter (never fork a threaded Ray
worker) talking over a socket pair; the parent kills (SIGKILL) and replaces a slot that overruns its
deadline or exits. This module imports nothing heavy: it is also the children's entry point.
"""
from __future__ import annotations

import math
import numbers
import operator
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from multiprocessing.connection import Connection, Pipe, wait
from pathlib import Path

STARTUP_TIMEOUT_S = 120.0  # importing the rewards (sympy, math-verify) can take a while on a busy box
ROOT = Path(__file__).resolve().parents[1]


def check_result(value, n_tokens: int) -> float | list[tuple[float, int]]:
    """A scorer's return as a finite float or per-step [(reward, end_token_index)]; raises if neither."""
    if isinstance(value, (list, tuple)):
        steps = []
        for reward, end in value:
            reward, end = float(reward), operator.index(end)
            if not math.isfinite(reward) or end < 0 or (n_tokens and end >= n_tokens):
                raise ValueError(f"bad step ({reward}, {end}) for {n_tokens} tokens")
            steps.append((reward, end))
        if not steps:
            raise ValueError("empty step list")
        return steps
    if not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"not a finite number: {value!r}"[:200])
    return float(value)


def _exit_with_parent(parent: int) -> None:
    # If the Ray worker is SIGKILLed nobody reaps us: leave as soon as we are reparented.
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


def child_main(fd: int) -> None:
    conn = Connection(fd)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    specs = conn.recv()
    try:
        from rewards.builtin import REWARD_FUNCTIONS

        scorers = [REWARD_FUNCTIONS[s["name"]](dict(s.get("options") or {})) for s in specs]
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            comp, prompt, completion, metadata = conn.recv()
        except EOFError:  # the parent closed us
            return
        try:
            value = scorers[comp](prompt, completion, metadata)
        except Exception as e:  # SystemExit and friends end the process: counted as "crashed"
            conn.send(("raised", f"{type(e).__name__}: {e}"[:500]))
            continue
        try:
            conn.send(("ok", check_result(value, len(metadata.get("completion_token_ids") or ()))))
        except (TypeError, ValueError) as e:
            conn.send(("invalid", str(e)[:500]))


class _Slot:
    """One child process and its end of the socket pair."""

    def __init__(self, specs: list[dict]):
        ours, theirs = Pipe()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        # subprocess execs right after forking, which is safe in a process with threads. Its own
        # process group, so a kill also ends whatever the reward started (a shell, a compiler).
        self.proc = subprocess.Popen([sys.executable, "-m", "rewards.procpool", str(theirs.fileno())],
                                     pass_fds=(theirs.fileno(),), env=env, start_new_session=True)
        theirs.close()
        self.conn = ours
        self.conn.send(specs)
        self.starting = True
        self.job: int | None = None
        self.deadline = time.monotonic() + STARTUP_TIMEOUT_S

    def kill(self) -> int:
        """SIGKILLs the group (leftovers too, if it already exited) and returns the exit code."""
        if self.proc.returncode is None:  # not reaped yet, so the group id cannot have been reused
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.conn.close()
        return self.proc.wait()


class ScorerPool:
    """`processes` children, each holding one scorer per spec {"name", "options"} built once."""

    def __init__(self, specs: list[dict], processes: int, sample_timeout_s: float):
        self.specs, self.sample_timeout_s = specs, sample_timeout_s
        self.slots = [_Slot(specs) for _ in range(processes)]

    def pids(self) -> list[int]:
        return [s.proc.pid for s in self.slots]

    def run(self, jobs: list[tuple[int, str, str, dict]]) -> list[tuple[str, object]]:
        """Each job (spec index, prompt, completion, metadata) -> ("ok", value) or (kind, detail), in order.

        Kinds: "raised" (the scorer raised), "invalid" (not a finite float / step list), "timeout" (no
        answer within sample_timeout_s: the process is killed), "crashed" (the process exited).
        """
        results: list = [None] * len(jobs)
        todo = deque(range(len(jobs)))
        while todo or any(s.starting or s.job is not None for s in self.slots):
            for s in self.slots:
                if not s.starting and s.job is None and todo:
                    self._send(s, todo.popleft(), jobs, todo)
            busy = [s for s in self.slots if s.starting or s.job is not None]
            ready = wait([s.conn for s in busy], max(0.0, min(s.deadline for s in busy) - time.monotonic()))
            for i, s in enumerate(self.slots):
                if s in busy:
                    self._poll(i, s, s.conn in ready, results)
        return results

    def wait_ready(self) -> list[int]:
        """Block until every child has built its scorers; returns their pids."""
        self.run([])
        return self.pids()

    def _send(self, s: _Slot, j: int, jobs: list, todo: deque) -> None:
        try:
            s.conn.send(jobs[j])
        except OSError:  # died while idle (OOM killer): the job was never tried, so retry it elsewhere
            todo.appendleft(j)
            self._replace(self.slots.index(s))
            return
        s.job, s.deadline = j, time.monotonic() + self.sample_timeout_s

    def _poll(self, i: int, s: _Slot, readable: bool, results: list) -> None:
        if readable:
            try:
                msg = s.conn.recv()
            except (EOFError, OSError):
                code = s.kill()
                starting = s.starting
                self._replace(i)  # keeps the pool usable even when we raise below
                if starting:
                    raise RuntimeError(f"reward process exited with code {code} while building the "
                                       f"scorers {[x['name'] for x in self.specs]}") from None
                results[s.job] = ("crashed", f"process exited with code {code}")
                return
            if s.starting:
                if msg[0] == "error":
                    self._replace(i)
                    raise RuntimeError(f"building the reward scorers failed:\n{msg[1]}")
                s.starting = False
            else:
                results[s.job], s.job = msg, None
        elif time.monotonic() >= s.deadline:
            if s.starting:
                self._replace(i)
                raise RuntimeError(f"reward process did not start within {STARTUP_TIMEOUT_S}s")
            results[s.job] = ("timeout", f"no result within {self.sample_timeout_s}s")
            self._replace(i)

    def _replace(self, i: int) -> None:
        self.slots[i].kill()
        self.slots[i] = _Slot(self.specs)

    def shutdown(self) -> None:
        for s in self.slots:
            s.kill()

    def __del__(self):
        try:
            self.shutdown()
        except Exception:  # interpreter teardown: the children exit on their own with the parent
            pass


if __name__ == "__main__":
    child_main(int(sys.argv[1]))
