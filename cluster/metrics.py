"""What a run writes: per-step metrics through the sinks (sinks.py), rollouts parquet, summary.json."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .config import LoggingConfig
from .sinks import JsonlSink, LineSink, ProgressSink, PrometheusSink, Sink, TensorBoardSink, WandbSink


def atomic_write(path: Path, write) -> None:
    """write(tmp) then rename over `path`: a reader never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


class RunLog:
    """The run directory's writer: per-step metrics to every sink, rollouts, summary, messages."""

    def __init__(self, run_dir: Path, total_steps: int, show_progress: bool = True, desc: str = "grpo",
                 postfix: dict[str, str] | None = None, sinks: LoggingConfig = LoggingConfig(prometheus=False),
                 first_step: int = 1, config: dict | None = None):
        """`sinks` picks TensorBoard, Prometheus (needs Ray started) and W&B; `config` is what W&B records."""
        self.run_dir = run_dir
        (run_dir / "rollouts").mkdir(parents=True, exist_ok=True)
        self.sinks: list[Sink] = [JsonlSink(run_dir / "metrics.jsonl")]
        self.bar = None
        if show_progress:
            # progress-bar label -> metrics key
            progress = ProgressSink(total_steps, desc, postfix or {"reward": "reward_mean", "kl": "kl",
                                                                   "tok_s": "generated_tokens_per_s"})
            self.bar = progress.bar
            self.sinks.append(progress)
        self.sinks.append(LineSink(self.print))
        if sinks.tensorboard:
            self.sinks.append(TensorBoardSink(run_dir / "tensorboard", first_step))
        if sinks.prometheus:
            self.sinks.append(PrometheusSink(run_dir))
        if sinks.wandb.project:
            self.sinks.append(WandbSink(run_dir, sinks.wandb, config or {}, first_step))

    def step(self, metrics: dict) -> None:
        for sink in self.sinks:
            sink.write(metrics)

    def rollouts(self, step: int, table: pa.Table) -> None:
        atomic_write(self.run_dir / "rollouts" / f"step_{step:06d}.parquet", lambda p: pq.write_table(table, p))

    def write_json(self, name: str, obj: dict) -> None:
        atomic_write(self.run_dir / name, lambda p: p.write_text(json.dumps(obj, indent=2)))

    def print(self, msg: str) -> None:
        (self.bar.write if self.bar is not None else print)(msg)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def read_metrics(run_dir: Path) -> list[dict]:
    with open(Path(run_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]
