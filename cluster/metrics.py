"""What a run writes: metrics.jsonl (one object per step), rollouts parquet, and a progress bar."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def _atomic_write_table(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


class RunLog:
    def __init__(self, run_dir: Path, total_steps: int, show_progress: bool = True, desc: str = "grpo",
                 postfix: dict[str, str] | None = None):
        self.run_dir = run_dir
        (run_dir / "rollouts").mkdir(parents=True, exist_ok=True)
        self._metrics = open(run_dir / "metrics.jsonl", "a", buffering=1)
        self.bar = None
        # progress-bar label -> metrics key
        self.postfix = postfix or {"reward": "reward_mean", "kl": "kl", "tok_s": "generated_tokens_per_s"}
        if show_progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, desc=desc, unit="step", file=sys.stderr,
                            dynamic_ncols=True)

    def step(self, metrics: dict) -> None:
        self._metrics.write(json.dumps(metrics) + "\n")
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({label: f"{metrics[key]:.4g}" for label, key in self.postfix.items()
                                  if key in metrics}, refresh=False)

    def rollouts(self, step: int, table: pa.Table) -> None:
        _atomic_write_table(table, self.run_dir / "rollouts" / f"step_{step:06d}.parquet")

    def write_json(self, name: str, obj: dict) -> None:
        tmp = self.run_dir / f".{name}.tmp"
        tmp.write_text(json.dumps(obj, indent=2))
        os.replace(tmp, self.run_dir / name)

    def print(self, msg: str) -> None:
        (self.bar.write if self.bar is not None else print)(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self._metrics.close()


def read_metrics(run_dir: Path) -> list[dict]:
    with open(Path(run_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]
