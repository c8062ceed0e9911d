"""A short real run (smoke config: tiny random model, real Ray + vLLM + DeepSpeed + gloo) for each
`algorithm.name`, with process supervision, the other objective options and async training among
them: it completes and every logged number is finite."""
import json
import math
import subprocess
import sys

import pytest

from tests.conftest import ROOT

FAST = ["trainer.steps=2", "trainer.eval=false", "trainer.checkpoint_every=0", "engines.num_engines=1",
        "learner.num_ranks=1", "rewards.num_workers=1"]
# Each algorithm.name once; process supervision and the GRPO-family options ride along (a run costs
# a minute of Ray, vLLM and DeepSpeed start-up, so options share runs rather than get one each).
RUNS = {
    # beta=0: samples whose per-token advantages are all zero are not computed by the update
    "dr_grpo+process": ["algorithm.name=dr_grpo", "algorithm.supervision=process", "algorithm.beta=0",
                        "rewards.components=[{name: python, options: {function: deploy/rewards/steps.py:line_steps}}]"],
    "rloo+variants+async": ["trainer.mode=async", "algorithm.name=rloo", "algorithm.kl_estimator=k2", "algorithm.clip_eps_high=0.28",
                      "algorithm.ratio_level=sequence", "algorithm.clip_eps=0.001", "algorithm.dual_clip=3.0",
                      "algorithm.divergence=js", "algorithm.entropy_coef=0.01", "algorithm.tis_cap=2.0",
                      "algorithm.overlong.mask_truncated=true", "algorithm.dynamic_sampling.enabled=true"],
    "ppo+async": ["trainer.mode=async", "algorithm.name=ppo", "algorithm.ppo.critic_lr=1e-3"],
}


@pytest.mark.parametrize("name", list(RUNS))
def test_short_run_per_algorithm(name, tmp_path):
    run_dir = tmp_path / name
    cmd = [sys.executable, "-m", "cluster.cli", "train", "--config", str(ROOT / "deploy/configs/smoke.yaml"),
           "--run-dir", str(run_dir), "--no-progress", *FAST, *RUNS[name]]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        bad = {k: v for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)}
        assert not bad, bad
        for key in ("div_reverse_kl", "div_forward_kl", "div_js", "div_tv", "entropy", "kl", "loss"):
            assert key in row, key
    if name.endswith("+async"):  # step 2's batch was generated while step 1 trained
        assert [r["policy_lag_max"] for r in rows] == [0, 1] and "tis_weight_mean" in rows[1]
    if name.startswith("ppo"):  # the critic's DeepSpeed states are in the checkpoint next to the policy's
        assert "value_loss" in rows[0]
        assert (run_dir / "checkpoints" / "final" / "deepspeed" / "critic").is_dir()
    # the untrained model's groups mostly score alike: skipped where that adds no gradient (beta=0), else not
    assert (rows[0]["update_skipped_fraction"] > 0) == ("algorithm.beta=0" in RUNS[name])
    if name.startswith("rloo"):
        assert "tis_weight_mean" in rows[0] and "pruned_groups" in rows[0]
    assert (run_dir / "checkpoints" / "final" / "trainer_state.json").is_file()
