"""A reward that turns slow on demand, so a fault test can land a signal inside a step's scoring.

Once the file named by GF_SLOW_MARK exists, each call leaves `<mark>.seen` and takes a second.
"""
import os
import time


def slow_when_marked(prompt: str, completion: str, metadata: dict) -> float:
    mark = os.environ.get("GF_SLOW_MARK", "")
    if mark and os.path.exists(mark):
        open(mark + ".seen", "w").close()
        time.sleep(1.0)
    return float(len(completion) % 2 == 0)
