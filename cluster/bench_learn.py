"""`groupflow bench learn`: time to accuracy, the figure of merit for a default (precision, recipe).

Each variant (a name and config overrides) trains for each seed, one after the other on this machine,
with held-out greedy accuracy measured at the start, every `eval_every` steps and at the end. The
report gives, per variant, the accuracy reached against training wall time (the sum of the steps'
times: start-up and evaluations excluded, as they are the same for every variant) and the mean gain
per minute; `groupflow report RUN_DIR/*` plots the curves side by side.
"""
from __future__ import annotations

import statistics
from pathlib import Path

from .bench import machine_info
from .config import Config, dump_config, load_config
from .metrics import read_metrics

# What the issue on precision compares first (cluster/precision.py picks among these by this bench)
PRECISION_VARIANTS = "bf16 both:engines.dtype=bfloat16 learner.dtype=bfloat16;" \
                     "bf16 engine + fp32 learner:engines.dtype=bfloat16 learner.dtype=float32;" \
                     "fp32 both:engines.dtype=float32 learner.dtype=float32"


def parse_variants(text: str) -> list[tuple[str, list[str]]]:
    """"NAME:KEY=VALUE KEY=VALUE;NAME:..." -> [(name, overrides)]."""
    out = []
    for item in filter(None, (x.strip() for x in text.split(";"))):
        name, _, overrides = item.partition(":")
        out.append((name.strip(), overrides.split()))
    if not out:
        raise ValueError("no variant given: NAME:KEY=VALUE ...;NAME:...")
    return out


def curve(rows: list[dict], start: float | None) -> list[list[float]]:
    """[minutes of training, held-out accuracy] at the start and at every evaluated step."""
    points, minutes = ([[0.0, start]] if start is not None else []), 0.0
    for r in rows:
        minutes += r["time_step_s"] / 60
        if "eval_pass@1" in r:
            points.append([round(minutes, 3), r["eval_pass@1"]])
    return points


def learn_report(cfg: Config, run_dir: Path, variants: list[tuple[str, list[str]]], seeds: list[int]) -> dict:
    from .loop import train

    run_dir.mkdir(parents=True, exist_ok=True)
    base = run_dir / "base.yaml"
    base.write_text(dump_config(cfg))
    report: dict = {"machine": machine_info(), "seeds": seeds, "variants": {}}
    for name, overrides in variants:
        runs = []
        for seed in seeds:
            vcfg = load_config(base, [*overrides, f"trainer.seed={seed}", "trainer.eval=true"])
            out = run_dir / f"{name.replace(' ', '_').replace('+', 'and')}_seed{seed}"
            summary = train(vcfg, out, progress=False)
            rows = read_metrics(out)
            # the end evaluation of a run whose last step had none is the summary's
            points = curve(rows, summary["eval_accuracy_start"])
            if "eval_pass@1" not in rows[-1]:
                points.append([round(sum(r["time_step_s"] for r in rows) / 60, 3), summary["eval_accuracy_end"]])
            runs.append({"seed": seed, "run_dir": str(out), "wall_time_s": round(summary["wall_time_s"], 1),
                         "train_minutes": points[-1][0], "accuracy_start": summary["eval_accuracy_start"],
                         "accuracy_end": summary["eval_accuracy_end"], "curve": points,
                         "step_time_s_median": statistics.median(r["time_step_s"] for r in rows),
                         "logprob_abs_diff_mean": statistics.mean(r["logprob_abs_diff_mean"] for r in rows)})
        gain = [r["accuracy_end"] - r["accuracy_start"] for r in runs]
        report["variants"][name] = {
            "overrides": overrides, "runs": runs,
            "accuracy_end_mean": statistics.mean(r["accuracy_end"] for r in runs),
            "train_minutes_mean": statistics.mean(r["train_minutes"] for r in runs),
            "gain_per_minute_mean": statistics.mean(g / max(r["train_minutes"], 1e-9) for g, r in zip(gain, runs))}
    return report


def table(report: dict) -> str:
    lines = ["| variant | held-out accuracy at end (per seed) | mean | training minutes (mean) | "
             "gain per minute | engine/learner logprob gap |", "|---|---|---|---|---|---|"]
    for name, v in report["variants"].items():
        ends = ", ".join(f"{r['accuracy_end']:.3f}" for r in v["runs"])
        gap = statistics.mean(r["logprob_abs_diff_mean"] for r in v["runs"])
        lines.append(f"| {name} | {ends} | {v['accuracy_end_mean']:.3f} | {v['train_minutes_mean']:.2f} | "
                     f"{v['gain_per_minute_mean']:.3f} | {gap:.2g} |")
    return "\n".join(lines)
