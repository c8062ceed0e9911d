"""`ray job submit` as users run it, on a real Ray head of its own (127.0.0.1, own ports and temp dir):
`ray job stop` on a running job ends it with a checkpoint; the job submitted again finishes the run."""
import json
import os
import re
import subprocess
import time

import pytest

from weightsync.torch_dist import free_port
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e

RAY = str(ROOT / ".venv" / "bin" / "ray")
GROUPFLOW = str(ROOT / ".venv" / "bin" / "groupflow")


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    temp = tmp_path_factory.mktemp("ray")  # Ray's sockets need a short path: keep it under /tmp
    port, dash = free_port(), free_port()
    # the job supervisor reads this: `ray job stop` leaves the driver time for its checkpoint
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_JOB_STOP_WAIT_TIME_S": "120"}
    env.pop("RAY_ADDRESS", None)
    subprocess.run([RAY, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=4",
                    f"--temp-dir={temp}", f"--ray-client-server-port={free_port()}",
                    "--disable-usage-stats"], env=env, check=True, capture_output=True, timeout=180)
    try:
        yield {"address": f"http://127.0.0.1:{dash}", "env": env}
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


def job(head, *args, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, "job", *args[:1], "--address", head["address"], *args[1:]], cwd=ROOT, env=head["env"],
                          capture_output=True, text=True, timeout=timeout)


def status(head, job_id: str) -> str:
    proc = job(head, "status", job_id, timeout=60)
    return proc.stdout + proc.stderr


def submit(head, run_dir, *overrides, wait=True, env_vars=None) -> subprocess.CompletedProcess:
    runtime = ["--runtime-env-json", json.dumps({"env_vars": env_vars})] if env_vars else []
    return job(head, "submit", *([] if wait else ["--no-wait"]), "--working-dir", ".", *runtime, "--",
               GROUPFLOW, "train", "--config", "deploy/configs/smoke.yaml", "--run-dir", str(run_dir), "--no-progress",
               "trainer.eval=false", "trainer.eval_every=0", *overrides)


def metric_steps(run_dir) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x)["step"] for x in path.read_text().splitlines()] if path.is_file() else []


def until(condition, what: str, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_ray_job_stop_checkpoints_and_the_resubmitted_job_finishes_the_run(head, tmp_path):
    """`ray job stop` (SIGTERM to the driver) while a step is being scored: the step is dropped after
    trainer.preempt_grace_s, the last finished step is checkpointed whole, the job ends STOPPED. The same
    command submitted again with --resume auto finishes the run, each step logged exactly once."""
    run_dir, mark = tmp_path / "run", tmp_path / "slow"
    args = ("trainer.steps=4", "trainer.checkpoint_every=0", "trainer.preempt_grace_s=2", "--resume", "auto",
            "rewards.components=[{name: python, options: {function: tests/e2e/slow_reward.py:slow_when_marked}}]")
    proc = submit(head, run_dir, *args, wait=False, env_vars={"GF_SLOW_MARK": str(mark)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    job_id = re.search(r"raysubmit_\w+", proc.stdout + proc.stderr).group(0)
    until(lambda: len(metric_steps(run_dir)) >= 1, "step 1")
    mark.touch()  # from now on scoring takes ~16 s a step: the stop lands inside it
    until(lambda: (tmp_path / "slow.seen").exists(), "a slow scoring")
    assert job(head, "stop", job_id, timeout=300).returncode == 0
    until(lambda: "was stopped" in status(head, job_id), "the job to be stopped", 300)
    logs = job(head, "logs", job_id).stdout
    assert "stopped by SIGTERM" in logs and "writing the checkpoint of step" in logs, logs[-5000:]
    done = metric_steps(run_dir)
    assert done == list(range(1, len(done) + 1)) and done[-1] < 4, done
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == [f"step_{done[-1]:06d}"], ckpts  # the step in flight was dropped, the last one is whole
    state = json.loads((run_dir / "checkpoints" / ckpts[0] / "trainer_state.json").read_text())
    assert state["step"] == done[-1] and state["data"]["cursor"] == 8 * done[-1]

    mark.unlink()
    # resubmitted with a checkpoint every step, one kept: the checkpoint it resumed from is pruned after
    # the next save, and later saves and replacement engines must not need it
    args = (*args, "trainer.checkpoint_every=1", "trainer.keep_checkpoints=1")
    proc = submit(head, run_dir, *args)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "succeeded" in out, out[-5000:]
    assert f"groupflow: run directory {run_dir}" in out  # the job's logs reach the submitter
    assert metric_steps(run_dir) == [1, 2, 3, 4]  # each step exactly once
    assert sorted(p.name for p in (run_dir / "rollouts").iterdir()) == [f"step_{s:06d}.parquet" for s in range(1, 5)]
    assert os.readlink(run_dir / "checkpoints" / "final") == "step_000004"
    assert (run_dir / "checkpoints" / "final" / "model.safetensors").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["final", "step_000004"]  # keep 1
    state = json.loads((run_dir / "checkpoints" / "final" / "trainer_state.json").read_text())
    assert state["counts"] == {"policy_version": 4, "optimizer_steps": 8, "rows_drawn": 32}  # each step once

    # the same command once more: the run has finished, nothing starts
    again = subprocess.run([GROUPFLOW, "train", "--config", "deploy/configs/smoke.yaml", "--run-dir", str(run_dir),
                            *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "already finished" in again.stdout, again.stdout + again.stderr[-3000:]
