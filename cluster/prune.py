"""`groupflow prune`: each training prompt's pass rate under a model, and the prompts inside a band.

A prompt the model always solves, or never, gives a GRPO group with all-equal rewards: zero advantage,
no gradient. Pruning keeps the prompts in between; comparing a run on the kept prompts with one on a
random subset of the same size tells data pruning apart from mere downsampling.

Prompts go to the engines in chunks: the bar shows progress, and only per-prompt counts are kept.
"""
from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from rewards.config import TaskConfig
from rewards.tasks import make_task

from . import phases
from .config import Config
from .evaluate import serving, solved_counts
from .metrics import atomic_write


def in_band(rate: float, low: float, high: float, inclusive_low: bool = False, inclusive_high: bool = False) -> bool:
    return (rate > low or (inclusive_low and rate == low)) and (rate < high or (inclusive_high and rate == high))


def _plain(answer: Any) -> Any:
    """12.0 -> 12: arithmetic answers read back as the integers they are."""
    return int(answer) if isinstance(answer, float) and answer.is_integer() else answer


def export_row(tc: TaskConfig, row: dict, pass_rate: float) -> dict:
    """A kept row in the task's own field names, so the same task config reads kept.jsonl as its data
    (gsm8k: question/answer with the raw '#### N'); arithmetic reads back as name=dataset with
    id_field=id and system_prompt_field=system."""
    meta = dict(row.get("metadata") or {})
    raw = meta.pop("answer", row["answer"])  # dataset tasks keep the answer text before answer_after
    msgs = row["messages"]
    out = {(tc.id_field or "id"): row["id"],
           tc.prompt_field: phases.prompt_text(row)}
    if tc.answer_field is not None:
        out[tc.answer_field] = _plain(raw)
    system = next((m["content"] for m in msgs if m["role"] == "system"), None)
    if system:
        out[tc.system_prompt_field or "system"] = system
    out.update({k: meta[k] for k in tc.metadata_fields if k in meta})
    out.setdefault("pass_rate", pass_rate)
    return out


def _answer_column(rows: list[dict]) -> pa.Array:
    return pa.array([None if r["answer"] is None else str(_plain(r["answer"])) for r in rows], pa.string())


def prune(cfg: Config, model_path: str, out: Path, samples: int, low: float = 0.0, high: float = 1.0,
          limit: Optional[int] = None, inclusive_low: bool = False, inclusive_high: bool = False,
          chunk: int = 64, progress: bool = True) -> dict:
    """Writes out/pass_rates.parquet, out/kept.jsonl and out/report.json; returns the report."""
    if not (0.0 <= low <= high <= 1.0):
        raise ValueError(f"the band needs 0 <= low <= high <= 1, got low={low}, high={high}")
    if samples < 1 or chunk < 1:
        raise ValueError(f"samples and chunk must be >= 1, got {samples}, {chunk}")
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    task = make_task(cfg.rewards.task, cfg.trainer.seed, tokenizer_path=model_path)
    rows = task.train_prompts(limit)
    counts: list[int] = []
    failures = 0
    with serving(cfg, model_path) as (generator, pool):
        ready = time.monotonic()
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(rows), desc="prune", unit="prompt", file=sys.stderr, dynamic_ncols=True)
        try:
            for a in range(0, len(rows), chunk):
                part = rows[a:a + chunk]
                solved, _, fails = solved_counts(generator, pool, part, samples, greedy=False)
                counts += solved
                failures += phases.failed_samples(fails)
                if bar is not None:  # postfix first: update() redraws the bar with it
                    bar.set_postfix({"pass": f"{sum(counts) / (samples * len(counts)):.3f}"}, refresh=False)
                    bar.update(len(part))
        finally:
            if bar is not None:
                bar.close()
    scored_s = time.monotonic() - ready
    rates = [c / samples for c in counts]
    kept = [in_band(r, low, high, inclusive_low, inclusive_high) for r in rates]

    table = pa.table({
        "prompt_id": pa.array([r["id"] for r in rows], pa.string()),
        "prompt": pa.array([phases.prompt_text(r) for r in rows], pa.string()),
        "answer": _answer_column(rows),
        "n": pa.array([samples] * len(rows), pa.int32()),
        "correct": pa.array(counts, pa.int32()),
        "pass_rate": pa.array(rates, pa.float64()),
        "kept": pa.array(kept, pa.bool_()),
    })
    atomic_write(out / "pass_rates.parquet", lambda p: pq.write_table(table, p))
    lines = [json.dumps(export_row(task.cfg, r, rate)) + "\n" for r, rate, k in zip(rows, rates, kept) if k]
    atomic_write(out / "kept.jsonl", lambda p: p.write_text("".join(lines)))

    hist = Counter(counts)
    report = {
        "prompts": len(rows), "kept": sum(kept),
        "dropped_always_solved": sum(1 for r, k in zip(rates, kept) if r == 1.0 and not k),
        "dropped_never_solved": sum(1 for r, k in zip(rates, kept) if r == 0.0 and not k),
        "dropped_other": sum(1 for r, k in zip(rates, kept) if 0.0 < r < 1.0 and not k),
        "band": {"low": low, "high": high, "inclusive_low": inclusive_low, "inclusive_high": inclusive_high},
        "samples": samples, "pass_rate_mean": sum(rates) / max(len(rates), 1),
        "pass_rate_histogram": {f"{c}/{samples}": hist[c] for c in range(samples + 1)},
        "reward_failures": failures, "task": cfg.rewards.task.name, "model": str(model_path),
        "temperature": cfg.engines.temperature, "max_new_tokens": cfg.engines.max_new_tokens,
        "prompts_per_s": round(len(rows) / max(scored_s, 1e-9), 2),
        "time_startup_s": round(ready - started, 1), "wall_time_s": round(time.monotonic() - started, 1),
        "files": {name: str(out / name) for name in ("pass_rates.parquet", "kept.jsonl", "report.json")},
    }
    atomic_write(out / "report.json", lambda p: p.write_text(json.dumps(report, indent=2) + "\n"))
    return report
