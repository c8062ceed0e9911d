"""Multi-turn rollouts on real Ray, vLLM, DeepSpeed and the reward workers' subprocesses: a tiny
random model converses with the calculator (tool_envs.py forces the calls), tools that hang, raise or
flood end their trajectories, and the learner trains on the model's tokens only. The python tool runs
the same path (a reward worker's subprocess, then its sandbox): tests/unit/test_envs.py."""
import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e
ENVS = ROOT / "tests/e2e/tool_envs.py"


def train_tools(run_dir, *overrides) -> list[dict]:
    cmd = [sys.executable, "-m", "cluster.cli", "train", "--config", "deploy/configs/smoke-tools.yaml",
           "--run-dir", str(run_dir), "--no-progress", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_calculator_conversations_train_on_model_tokens_only(tmp_path):
    from transformers import AutoTokenizer
    rows = train_tools(tmp_path / "calc", f"rollout.env={ENVS}:ForcedCalculator")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["turns_max"] == 3 and r["turns_mean"] > 1.5, r
        assert r["tool_calls_per_sample"] > 0 and r["tool_call_success_rate"] == 1.0
        # observations sit in the context, not in the loss: engine and learner agree on the model's tokens
        assert r["logprob_abs_diff_mean"] < 1e-3, r["logprob_abs_diff_mean"]
        assert r["observation_tokens"] > 0 and r["generated_tokens"] > 0
    reasons = {k: sum(r[k] for r in rows) for k in rows[0] if k.startswith("stop_")}
    for reason in ("done", "env_timeout", "env_raised", "observation_tokens"):  # each misbehaving tool, counted
        assert reasons[f"stop_{reason}_fraction"] > 0, reasons
    assert sum(r["env_failures"] for r in rows) > 0

    table = pq.read_table(tmp_path / "calc" / "rollouts" / "step_000001.parquet").to_pylist()
    tok = AutoTokenizer.from_pretrained(tmp_path / "calc" / "initial_model")
    full = [s for s in table if s["turns"] == 3]
    assert full, "no trajectory took three turns"
    for s in full:
        ids, mask, ends = s["completion_token_ids"], s["loss_mask"], s["turn_ends"]
        assert len(ids) == len(mask) == len(s["logprobs"]) and ends[-1] == len(ids)
        # model turns: mask 1; between them the observation and template tokens: mask 0
        starts = [0] + [next(j for j in range(e, len(ids)) if mask[j]) for e in ends[:-1]]
        for a, e in zip(starts, ends):
            assert all(mask[a:e]), mask
        for e, a in zip(ends[:-1], starts[1:]):
            assert not any(mask[e:a]) and a > e
            observation = tok.decode(ids[e:a])
            assert "<result>" in observation and "<|im_start|>assistant" in observation, observation
        # the calculator's answer to the call forced from the first turn is what came back
        first_turn = tok.decode(ids[: ends[0]], skip_special_tokens=True)
        assert f"<result>{len(first_turn) * 7 + 1}</result>" in tok.decode(ids[ends[0]: starts[1]])
        assert all(lp == 0.0 for lp, m in zip(s["logprobs"], mask) if not m)
