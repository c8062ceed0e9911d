"""What a run writes: metrics.jsonl (one object per step), rollouts parquet, and a progress bar."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def atomic_write(path: Path, write) -> None:
    """write(tmp) then rename over `path`: a reader never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
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
        atomic_write(self.run_dir / "rollouts" / f"step_{step:06d}.parquet", lambda p: pq.write_table(table, p))

    def write_json(self, name: str, obj: dict) -> None:
        atomic_write(self.run_dir / name, lambda p: p.write_text(json.dumps(obj, indent=2)))

    def print(self, msg: str) -> None:
        (self.bar.write if self.bar is not None else print)(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self._metrics.close()


def read_metrics(run_dir: Path) -> list[dict]:
    with open(Path(run_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]
