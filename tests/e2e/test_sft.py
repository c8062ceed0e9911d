"""`groupflow sft` on OpenThoughts-layout traces (problem, solution) with the real learner, then
`groupflow train` starting from its output checkpoint."""
import json
import subprocess
import sys

from tests.conftest import ROOT

SFT_YAML = """
model:
  path: smollm2
  random_init: {hidden_size: 128, num_layers: 2, num_heads: 2}
data:
  path: DATA
  prompt_field: problem
  response_field: solution
  max_tokens: 128
trainer: {epochs: 4, batch_size: 8}
learner: {num_ranks: 2, dtype: float32, lr: 3.0e-3, minibatches: 1, micro_batch_size: 4, threads: 1, cpus_per_rank: 0.5}
"""


def test_sft_then_grpo_from_its_checkpoint(tmp_path):
    data = tmp_path / "traces.jsonl"
    with data.open("w") as f:
        for a in range(16):
            b = (a * 7) % 10
            f.write(json.dumps({"problem": f"What is {a} + {b}?",
                                "solution": f"<think>{a} plus {b} is {a + b}.</think> \\boxed{{{a + b}}}"}) + "\n")
        f.write('{"problem": "no solution field"}\n')  # malformed: skipped and counted
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(SFT_YAML.replace("DATA", str(data)))
    run = tmp_path / "sft"
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "sft", "--config", str(cfg), "--run-dir", str(run),
                           "--no-progress", "data.on_malformed=skip"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 8  # 16 rows / batch 8 x 4 epochs
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"], [r["loss"] for r in rows]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["skipped"]["malformed"] == 1 and summary["rows"] == 16
    ckpt = run / "checkpoints" / "final"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "tokenizer.json").is_file()

    # the SFT output is a valid starting model for GRPO
    train = tmp_path / "grpo"
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "train", "--config",
                           str(ROOT / "deploy/configs/smoke.yaml"), "--run-dir", str(train), "--no-progress",
                           f"model.path={ckpt}", "model.random_init=null", "trainer.steps=1", "trainer.eval=false",
                           "trainer.checkpoint_every=0", "engines.num_engines=1", "learner.num_ranks=1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    step = json.loads((train / "metrics.jsonl").read_text().splitlines()[0])
    assert step["logprob_abs_diff_mean"] < 1e-4  # engines loaded the SFT weights the learner holds


def test_sft_config_errors_name_the_key(tmp_path):
    cfg = tmp_path / "sft.yaml"
    cfg.write_text("data: {path: /nonexistent/traces.jsonl}\n")
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "sft", "--config", str(cfg)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "data.path" in proc.stderr
