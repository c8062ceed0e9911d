"""SmolLM2-135M-Instruct really learns: the default run, shortened, lifts held-out accuracy."""
import json
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e


def test_default_run_raises_held_out_accuracy(tmp_path):
    # The default run, shortened for CI: 4 steps at 3x its learning rate. Measured (AMD EPYC AVX2, fp32
    # by dtype auto, ~5.5 min): 0.18 -> 0.34 on these 100 held-out problems with seed 0, 0.20 -> 0.32
    # with seed 1. The default's own 8 steps at 1e-5 took 9.5 min there for 0.18 -> 0.40.
    run_dir = tmp_path / "learn"
    cmd = [sys.executable, "-m", "cluster.cli", "train", "--run-dir", str(run_dir), "--no-progress",
           "trainer.steps=4", "learner.lr=3e-5", "rewards.task.eval_size=100"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-8000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["eval_accuracy_end"] >= summary["eval_accuracy_start"] + 0.08, summary
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    # engine vs learner logprobs on the same weights, at the floor of the dtypes `auto` chose: fp32 on
    # both sides ~1e-6 (AVX2: 0.0 measured); a bf16 engine against an fp32 learner 0.03-0.07 per step
    # at this lr (AMX), its weights' rounding alone
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    floor = 1e-4 if cfg["engines"]["dtype"] == cfg["learner"]["dtype"] == "float32" else 0.1
    assert all(r["logprob_abs_diff_mean"] < floor for r in rows), (floor, [r["logprob_abs_diff_mean"] for r in rows])
    assert (run_dir / "checkpoints" / "final" / "model.safetensors").is_file()
