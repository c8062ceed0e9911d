"""Scoring subprocesses with a hard wall-clock limit per call; a reward that hangs or dies costs one sample.

Why not signal-based timeouts: they only work in a process's main thread, and Ray runs actor methods
elsewhere (math-verify's own timeout silently returns 0 there). Why not ProcessPoolExecutor: one dead
process breaks the whole executor. So each slot is one fresh interpreter (never fork a threaded Ray
worker) talking over a socket pair; the parent kills (SIGKILL) and replaces a slot that overruns its
deadline or exits. This module imports nothing heavy: it is also the children's entry point.
"""
from __future__ import annotations

import glob
import logging
import math
import numbers
import operator
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from multiprocessing.connection import Connection, Pipe, wait
from pathlib import Path

STARTUP_TIMEOUT_S = 120.0  # importing the rewards (sympy, math-verify) can take a while on a busy box
RESTARTS = 3  # consecutive failed restarts of one slot before the pool gives up (the first build: none)
# Code sandboxes run as uid SANDBOX_UID_BASE + worker rank * processes + slot: RLIMIT_NPROC counts
# per uid, so each slot needs its own or one sample's fork bomb starves the sandboxes beside it.
# The range must hold no real users (see rewards/sandbox.py, GROUPFLOW_SANDBOX_UID).
SANDBOX_UID_BASE = 60000
ROOT = Path(__file__).resolve().parents[1]
SLOT_DIR_PREFIX = "groupflow-slot-"
log = logging.getLogger("groupflow.rewards")


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
    """If the Ray worker is SIGKILLed nobody reaps us: die with it.

    PR_SET_PDEATHSIG is the kernel's way and works even while a scorer holds the GIL (a sympy hang),
    which starves the watcher thread. Linux only; it fires when the spawning *thread* exits, and the
    pool is driven from the actor's long-lived task thread. The thread stays as the fallback.
    """
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before prctl: the signal will never come
        os._exit(0)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


def child_main(fd: int, parent: int) -> None:
    _exit_with_parent(parent)
    conn = Connection(fd)
    specs = conn.recv()
    try:
        from rewards.builtin import REWARD_FUNCTIONS
        from rewards.envs import ENV_SPEC, EnvCaller

        scorers = [EnvCaller(dict(s["options"])) if s["name"] == ENV_SPEC else
                   REWARD_FUNCTIONS[s["name"]](dict(s.get("options") or {})) for s in specs]
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
        if isinstance(scorers[comp], EnvCaller):  # an environment's start or step, checked by it
            conn.send(("ok", value))
            continue
        try:
            conn.send(("ok", check_result(value, len(metadata.get("completion_token_ids") or ()))))
        except (TypeError, ValueError) as e:
            conn.send(("invalid", str(e)[:500]))


def _sweep_orphan_dirs() -> None:
    """Removes slot dirs whose owner is gone: a SIGKILLed worker never runs _Slot.kill()."""
    for path in glob.glob(os.path.join(tempfile.gettempdir(), SLOT_DIR_PREFIX + "*")):
        try:
            os.kill(int(os.path.basename(path)[len(SLOT_DIR_PREFIX):].split("-")[0]), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (ValueError, OSError):  # not ours, or alive under another uid
            pass


class _Slot:
    """One child process, its end of the socket pair, and its own temp dir.

    The child's TMPDIR is that dir, so what a killed child leaves there (a code sandbox's work dir)
    goes with kill(). `restarts`: failed starts before this one, None for a slot of the first build.
    """

    def __init__(self, specs: list[dict], uid: int | None, restarts: int | None = None):
        self.restarts, self.uid = restarts, uid
        self.tmp = tempfile.mkdtemp(prefix=f"{SLOT_DIR_PREFIX}{os.getpid()}-")
        ours, theirs = Pipe()
        env = dict(os.environ, TMPDIR=self.tmp, PYTHONPATH=os.pathsep.join(
            [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        if uid is not None:
            env["GROUPFLOW_SANDBOX_UID"] = str(uid)
        try:  # subprocess execs right after forking, which is safe in a process with threads. Its
            # own process group, so a kill also ends whatever the reward started (a shell, a compiler).
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "rewards.procpool", str(theirs.fileno()), str(os.getpid())],
                pass_fds=(theirs.fileno(),), env=env, start_new_session=True)
        except BaseException:
            ours.close()
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        finally:
            theirs.close()
        self.conn = ours
        self.conn.send(specs)
        self.starting = True
        self.job: int | None = None
        self.deadline = time.monotonic() + STARTUP_TIMEOUT_S

    def kill(self) -> int:
        """SIGKILLs the group (leftovers too, if it already exited), removes its temp dir, returns the code."""
        if self.proc.returncode is None:  # not reaped yet, so the group id cannot have been reused
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.conn.close()
        self.starting, self.job = False, None
        code = self.proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)
        return code


class ScorerPool:
    """`processes` children, each holding one scorer per spec {"name", "options"} built once.
    With uid_base, slot i's code sandboxes run as uid_base + i."""

    def __init__(self, specs: list[dict], processes: int, sample_timeout_s: float,
                 uid_base: int | None = None):
        self.specs, self.sample_timeout_s, self.uid_base = specs, sample_timeout_s, uid_base
        _sweep_orphan_dirs()
        self.slots: list[_Slot] = []
        for i in range(processes):
            self.slots.append(_Slot(specs, self._uid(i)))

    def _uid(self, i: int) -> int | None:
        return None if self.uid_base is None else self.uid_base + i

    def pids(self) -> list[int]:
        return [s.proc.pid for s in self.slots]

    def run(self, jobs: list[tuple[int, str, str, dict]], deadline: float | None = None
            ) -> list[tuple[str, object]]:
        """Each job (spec index, prompt, completion, metadata) -> ("ok", value) or (kind, detail), in order.

        Kinds: "raised" (the scorer raised), "invalid" (not a finite float / step list), "timeout" (no
        answer within sample_timeout_s, or none before `deadline` (time.monotonic()): the process is
        killed), "crashed" (the process exited). Slots still restarting are left to the next run.
        """
        results: list = [None] * len(jobs)
        todo = deque(range(len(jobs)))
        try:
            while todo or any(s.job is not None or (s.starting and not jobs) for s in self.slots):
                if deadline is not None and time.monotonic() >= deadline:
                    for j in [s.job for s in self.slots if s.job is not None] + list(todo):
                        results[j] = ("timeout", "batch deadline")
                    self._kill_busy()
                    break
                for s in self.slots:
                    if not s.starting and s.job is None and todo:
                        self._send(s, todo.popleft(), jobs, todo)
                busy = [s for s in self.slots if s.starting or s.job is not None]
                until = min([s.deadline for s in busy] + ([deadline] if deadline is not None else []))
                ready = wait([s.conn for s in busy], max(0.0, until - time.monotonic()))
                for i, s in enumerate(self.slots):
                    if s in busy:
                        self._poll(i, s, s.conn in ready, results)
        except BaseException:
            # A job still running would answer into a later batch: kill its process before raising.
            try:
                self._kill_busy()
            except Exception:  # noqa: BLE001 - the original error is the one to report
                pass
            raise
        return results

    def wait_ready(self) -> list[int]:
        """Block until every child has built its scorers; returns their pids."""
        self.run([])
        return self.pids()

    def _kill_busy(self) -> None:
        for i, s in enumerate(self.slots):
            if s.job is not None:
                self._replace(i)

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
                job, starting, code = s.job, s.starting, s.kill()
                if starting:
                    self._start_failed(i, f"reward process exited with code {code} while building "
                                          f"the scorers {[x['name'] for x in self.specs]}")
                    return
                results[job] = ("crashed", f"process exited with code {code}")
                self._replace(i)
                return
            if s.starting:
                if msg[0] == "error":
                    self._start_failed(i, f"building the reward scorers failed:\n{msg[1]}")
                    return
                s.starting = False
            else:
                results[s.job], s.job = msg, None
        elif time.monotonic() >= s.deadline:
            if s.starting:
                self._start_failed(i, f"reward process did not start within {STARTUP_TIMEOUT_S}s")
                return
            results[s.job] = ("timeout", f"no result within {self.sample_timeout_s}s")
            self._replace(i)

    def _start_failed(self, i: int, why: str) -> None:
        """The first build failing is fatal (a broken reward); a restart is retried RESTARTS times."""
        s = self.slots[i]
        s.kill()
        if s.restarts is None or s.restarts >= RESTARTS:
            raise RuntimeError(why if s.restarts is None else f"{why}\n(after {s.restarts} retries)")
        log.warning("reward process restart failed (retry %d/%d): %s", s.restarts + 1, RESTARTS, why)
        self._replace(i, s.restarts + 1)

    def _replace(self, i: int, restarts: int = 0) -> None:
        self.slots[i].kill()
        for attempt in range(RESTARTS + 1):  # Popen itself can fail for a moment (EAGAIN, ENOMEM)
            try:
                self.slots[i] = _Slot(self.specs, self._uid(i), restarts)
                return
            except OSError:
                if attempt == RESTARTS:
                    raise
                time.sleep(0.5 * (attempt + 1))

    def shutdown(self) -> None:
        for s in self.slots:
            s.kill()

    def __del__(self):
        try:
            self.shutdown()
        except Exception:  # interpreter teardown: the children exit on their own with the parent
            pass


if __name__ == "__main__":
    child_main(int(sys.argv[1]), int(sys.argv[2]))
