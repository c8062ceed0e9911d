"""Two hosts on one machine: network namespaces joined by a veth pair, each with its own IP
(10.231.0.1 and .2, traffic stays inside them), a Ray head in one and a Ray worker in the other. The
smoke run puts its engines on host B and spreads its learner ranks over both, so the weight sync and
the learner's own collectives cross hosts over TCP; Ray's state API shows where every actor landed."""
import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e

RAY = str(ROOT / ".venv" / "bin" / "ray")
TAG = str(os.getpid() % 100000)
NS = {"a": f"gfa{TAG}", "b": f"gfb{TAG}"}
IP = {"a": "10.231.0.1", "b": "10.231.0.2"}
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled"}


def sh(*cmd, ns=None, check=True, timeout=180) -> subprocess.CompletedProcess:
    full = (["ip", "netns", "exec", NS[ns]] if ns else []) + list(cmd)
    return subprocess.run(full, capture_output=True, text=True, check=check, timeout=timeout, env=ENV, cwd=ROOT)


@pytest.fixture(scope="module")
def hosts():
    if sh("ip", "netns", "add", NS["a"], check=False).returncode != 0:
        pytest.skip("network namespaces need root (CAP_SYS_ADMIN)")
    try:
        sh("ip", "netns", "add", NS["b"])
        sh("ip", "link", "add", f"va{TAG}", "type", "veth", "peer", "name", f"vb{TAG}")
        for h in "ab":
            sh("ip", "link", "set", f"v{h}{TAG}", "netns", NS[h])
            sh("ip", "addr", "add", f"{IP[h]}/24", "dev", f"v{h}{TAG}", ns=h)
            sh("ip", "link", "set", f"v{h}{TAG}", "up", ns=h)
            sh("ip", "link", "set", "lo", "up", ns=h)
        sh(RAY, "start", "--head", "--port=6400", f"--node-ip-address={IP['a']}", "--num-cpus=2",
           "--resources={\"host_a\": 100}", f"--temp-dir=/tmp/gf-ray-a{TAG}", f"--dashboard-host={IP['a']}",
           "--dashboard-port=8265", "--disable-usage-stats", ns="a")
        sh(RAY, "start", f"--address={IP['a']}:6400", f"--node-ip-address={IP['b']}", "--num-cpus=2",
           "--resources={\"host_b\": 100}", f"--temp-dir=/tmp/gf-ray-b{TAG}", "--disable-usage-stats", ns="b")
        yield
    finally:
        sh(RAY, "stop", "--force", check=False)
        for h in "ab":
            sh("ip", "netns", "delete", NS[h], check=False)


STATE = """
import json, ray
from ray.util.state import list_actors, list_nodes
ip = {n.node_id: n.node_ip for n in list_nodes(address="http://%s:8265")}
print(json.dumps([[a.class_name, ip.get(a.node_id)] for a in list_actors(address="http://%s:8265", detail=True,
                                                                          limit=1000)]))
"""


def test_engines_on_one_host_learner_across_both_weights_cross_over_tcp(hosts, tmp_path):
    run_dir = tmp_path / "run"
    proc = sh(sys.executable, "-m", "cluster.cli", "train", "--config", "deploy/configs/smoke.yaml",
              "--run-dir", str(run_dir), "--no-progress", "trainer.steps=2", "trainer.eval=false",
              "trainer.eval_every=0", "rewards.num_workers=1", f"run.ray_address={IP['a']}:6400",
              "placement.engines.resources={host_b: 0.01}", "placement.learner.strategy=STRICT_SPREAD",
              "placement.rewards.resources={host_a: 0.01}", ns="a", check=False, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # the engines (host B) hold what the learner (rank 0 on one host) sent them over TCP
    assert [r["step"] for r in rows] == [1, 2] and all(r["logprob_abs_diff_mean"] < 1e-3 for r in rows), rows
    time.sleep(2)
    placed = json.loads(sh(sys.executable, "-c", STATE % (IP["a"], IP["a"]), ns="a").stdout.strip().splitlines()[-1])
    where: dict = {}
    for cls, ip in placed:
        where.setdefault(cls, []).append(ip)
    assert sorted(where["RolloutActor"]) == [IP["b"], IP["b"]], where
    assert sorted(where["LearnerActor"]) == [IP["a"], IP["b"]], where  # STRICT_SPREAD: one rank per host
    assert where["RewardWorker"] == [IP["a"]], where


def raylet_of(ip: str) -> int:
    for entry in os.listdir("/proc"):
        try:
            cmd = open(f"/proc/{entry}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"raylet") and f"--node_ip_address={ip}".encode() in cmd:
            return int(entry)
    raise AssertionError(f"no raylet of {ip}")


def test_losing_the_engines_host_stops_the_run_with_a_clear_error_and_a_checkpoint(hosts, tmp_path):
    """Host B (every engine) dies mid-run: no engine can be placed again, so the run stops within
    run.timeout_s with a message that says so, the last finished step checkpointed (this test runs
    last: the cluster has one host left after it)."""
    run_dir = tmp_path / "run"
    cmd = ["ip", "netns", "exec", NS["a"], sys.executable, "-m", "cluster.cli", "train", "--config",
           "deploy/configs/smoke.yaml", "--run-dir", str(run_dir), "--no-progress", "trainer.steps=50",
           "trainer.eval=false", "trainer.eval_every=0", "trainer.checkpoint_every=0", "rewards.num_workers=1",
           "run.timeout_s=45", f"run.ray_address={IP['a']}:6400", "placement.engines.resources={host_b: 0.01}",
           "placement.learner.resources={host_a: 0.01}", "placement.rewards.resources={host_a: 0.01}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    while not ((run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-5000:]
        time.sleep(0.5)
    os.kill(raylet_of(IP["b"]), 9)  # the host's Ray is gone, and every process Ray ran there with it
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1, out[-5000:]
    # found dead while generating (no replacement starts) or during a weight push (a restart cannot place
    # the engines): either way a message that says so, within run.timeout_s
    assert ("the replacement of engine" in out and "did not start within 45.0s" in out) or \
        ("'groupflow-engines'" in out and "could not be placed within 45.0s" in out), out[-5000:]
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == [f"step_{steps[-1]:06d}"]
