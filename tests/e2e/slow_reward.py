"""Rewards that turn faulty on demand, so a fault test can land a fault inside a step's scoring.

Once the file named by GF_SLOW_MARK exists:
- slow_when_marked: each call leaves `<mark>.seen` and takes a second;
- kill_worker_when_marked: each call kills the reward worker that runs it (the scoring subprocess's
  parent), so a share's replacement worker dies too.
"""
import os
import signal
import time


def _marked() -> bool:
    mark = os.environ.get("GF_SLOW_MARK", "")
    if mark and os.path.exists(mark):
        open(mark + ".seen", "w").close()
        return True
    return False


def slow_when_marked(prompt: str, completion: str, metadata: dict) -> float:
    if _marked():
        time.sleep(1.0)
    return float(len(completion) % 2 == 0)


def kill_worker_when_marked(prompt: str, completion: str, metadata: dict) -> float:
    if _marked():
        os.kill(os.getppid(), signal.SIGKILL)
        time.sleep(10)
    return float(len(completion) % 2 == 0)
