"""`groupflow bench learner` on real DeepSpeed ranks: every optimization of the learner leaves the
step-1 metrics as they were (same seed, fp32), and the report carries the figures it promises."""
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e


def test_learner_optimizations_keep_step1_metrics(tmp_path):
    out = tmp_path / "learner.json"
    proc = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "bench", "learner", "--config", "deploy/configs/smoke.yaml",
         "--run-dir", str(tmp_path / "run"), "--steps", "2", "--json", str(out),
         # all optimizations together against none (the shared prefix alone: tests/unit/test_batch.py)
         "--variants", "baseline,both (default),both + beta=0,both + beta=0 + skip zero-advantage",
         "learner.minibatches=2", "learner.micro_batch_size=4"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    report = json.loads(out.read_text())
    variants = report["variants"]
    assert list(variants)[:2] == ["baseline", "both (default)"]
    base = variants["baseline"]["step1_metrics"]
    assert {"loss", "kl", "kl_k3", "entropy_pre", "grad_norm", "clip_fraction"} <= base.keys()
    assert base["grad_norm"] > 0  # the update really ran
    # beta=0, zero-advantage samples skipped: the same loss and gradient as computing them
    skipped = variants["both + beta=0 + skip zero-advantage"]
    assert skipped["step1_same_as"] == "both + beta=0" and skipped["step1_metrics"]["update_skipped_fraction"] > 0
    assert variants["both + beta=0"]["step1_max_abs_diff"] is None  # another objective than the baseline's
    for name, r in variants.items():
        assert name == "both + beta=0" or r["step1_max_abs_diff"] < 1e-4, (name, r["step1_metrics"], base)
        assert r["learner_tokens_per_s"] > 0 and r["speedup"] > 0
    assert report["matmul_flops_per_s"] > 0 and report["learner"]["dtype"] == "float32"
    assert "speedup" in proc.stdout and "both (default)" in proc.stdout  # the terminal table
