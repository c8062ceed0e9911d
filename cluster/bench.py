"""Benchmarks: measured side by side in one run, reported as JSON (never timed asserts in tests)."""
from __future__ import annotations

import os
import platform
import statistics
from pathlib import Path

from .config import Config
from .metrics import read_metrics

PHASES = ("generate", "reward", "train", "sync")


def phase_shares(rows: list[dict]) -> dict:
    total = sum(r["time_step_s"] for r in rows)
    return {p: sum(r[f"time_{p}_s"] for r in rows) / total for p in PHASES}


def train_report(cfg: Config, run_dir: Path) -> dict:
    from .loop import train

    summary = train(cfg, run_dir, progress=True)
    rows = read_metrics(run_dir)
    return {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "wall_time_s": summary["wall_time_s"],
        "eval_accuracy_start": summary.get("eval_accuracy_start"),
        "eval_accuracy_end": summary.get("eval_accuracy_end"),
        "steps": len(rows),
        "step_time_s_median": statistics.median(r["time_step_s"] for r in rows),
        "phase_share": phase_shares(rows),
        "generated_tokens_per_s_median": statistics.median(r["generated_tokens_per_s"] for r in rows),
        "reward_mean_first_last": [rows[0]["reward_mean"], rows[-1]["reward_mean"]],
        "run_dir": str(run_dir),
    }
