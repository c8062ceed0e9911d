"""The smoke run, shared: one run of deploy/configs/smoke.yaml serves every test that only reads it
(test_train.py's checks, the dashboard's queries, test_eval_prune.py's checkpoint)."""
import json
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT


def train_smoke(run_dir, *overrides) -> list[dict]:
    cmd = [sys.executable, "-m", "cluster.cli", "train", "--config", "deploy/configs/smoke.yaml",
           "--run-dir", str(run_dir), "--no-progress", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    assert f"run directory {run_dir}" in proc.stdout
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def smoke(tmp_path_factory):
    """The smoke run (3 steps, 2 engines, 2 learner ranks), scraped meanwhile by a real Prometheus
    (kept for the dashboard test). Tests only read what it wrote."""
    from weightsync.torch_dist import free_port
    from tests.prometheus import Prometheus
    run_dir, port = tmp_path_factory.mktemp("smoke"), free_port()
    prometheus = Prometheus(tmp_path_factory.mktemp("prometheus"), port)
    start = time.time()
    try:
        rows = train_smoke(run_dir, f"run.metrics_export_port={port}")
        time.sleep(3)  # a last scrape after the last step
        yield run_dir, rows, {"prometheus": prometheus, "start": start, "end": time.time()}
    finally:
        prometheus.stop()
