"""Preemption with real signals sent to a real process: drop, finish, or stop at once."""
import signal
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import ROOT

SCRIPT = textwrap.dedent(f"""
    import os, signal, sys, threading, time
    sys.path.insert(0, {str(ROOT)!r})
    from cluster.preemption import Preempted, Preemption

    scenario, grace = sys.argv[1], float(sys.argv[2])
    send = lambda after, sig=signal.SIGTERM: threading.Timer(after, os.kill, (os.getpid(), sig)).start()
    with Preemption(grace) as stop:
        try:
            if scenario == "drop":        # a signal while generating: dropped once the grace is over
                send(0.3)
                stop.droppable(lambda: time.sleep(30))
            elif scenario == "finish":    # the droppable part ends within the grace: its result is kept
                send(0.2)
                print("value", stop.droppable(lambda: (time.sleep(1.0), 7)[1]), stop.requested)
            elif scenario == "update":    # an update in flight is never dropped, past the grace too
                stop.droppable(lambda: None)
                send(0.2)
                time.sleep(1.5)
                print("update finished", stop.requested)
                stop.droppable(lambda: None)  # the next step's rollout: refused, the grace is over
            elif scenario == "twice":     # a second signal: at once
                send(0.2), send(0.6)
                stop.droppable(lambda: time.sleep(30))
        except Preempted as p:
            print("preempted", p.signum)
    """)


def run(scenario: str, grace: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT, scenario, str(grace)], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("scenario,grace,code,out", [
    ("drop", 0.5, 0, f"preempted {int(signal.SIGTERM)}"),
    ("finish", 5.0, 0, "value 7 True"),
    ("update", 0.5, 0, f"update finished True\npreempted {int(signal.SIGTERM)}"),
    ("twice", 30.0, -signal.SIGTERM, "second SIGTERM: stopping at once"),
])
def test_preemption(scenario, grace, code, out):
    proc = run(scenario, grace)
    assert proc.returncode == code, proc.stderr[-3000:]
    assert out in proc.stdout, proc.stdout
    assert "SIGTERM: stopping after the step in flight" in proc.stdout
