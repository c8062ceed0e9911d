"""Where per-step metrics go: one `RunLog.step(metrics)` call feeds every sink of the run.

jsonl (always: the record a resume rewinds), the progress bar and a line per step, TensorBoard
(`logging.tensorboard`), Prometheus through Ray's metrics API (`logging.prometheus`), Weights & Biases
(`logging.wandb.project`).
A sink takes a flat dict of numbers per step; it never changes what the others see.
"""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Protocol


class Sink(Protocol):
    def write(self, metrics: dict) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """metrics.jsonl: one object per step, appended and flushed line by line."""

    def __init__(self, path: Path):
        self._file = open(path, "a", buffering=1)

    def write(self, metrics: dict) -> None:
        self._file.write(json.dumps(metrics) + "\n")

    def close(self) -> None:
        self._file.close()


class ProgressSink:
    """A tqdm bar on stderr with a few chosen metrics (label -> metrics key)."""

    def __init__(self, total: int, desc: str, postfix: dict[str, str]):
        from tqdm import tqdm
        self.postfix = postfix
        self.bar = tqdm(total=total, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True)

    def write(self, metrics: dict) -> None:
        self.bar.update(1)
        self.bar.set_postfix({label: f"{metrics[key]:.4g}" for label, key in self.postfix.items()
                              if key in metrics}, refresh=False)

    def close(self) -> None:
        self.bar.close()


LINE_KEYS = ("reward_mean", "eval_pass@1", "loss", "kl", "entropy", "response_length_mean", "generated_tokens_per_s",
             "reward_failures", "engine_restarts", "time_generate_s", "time_reward_s", "time_train_s", "time_sync_s",
             "time_step_s")


class LineSink:
    """One structured line per step (key=value) on the driver's output: what `ray job logs` shows."""

    def __init__(self, say):
        self.say = say

    def write(self, metrics: dict) -> None:
        fields = " ".join(f"{k}={metrics[k]:.4g}" for k in LINE_KEYS if isinstance(metrics.get(k), (int, float)))
        self.say(f"groupflow step={metrics['step']} {fields}")

    def close(self) -> None:
        pass


def numbers(metrics: dict, skip: tuple[str, ...] = ("step",)):
    """(key, value) of the finite numbers among a step's metrics (the step itself is the x axis of a
    plot, so skipped by default): what a sink can record."""
    for key, value in metrics.items():
        if key not in skip and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            yield key, value


def tensorboard_tag(key: str) -> str:
    """reward_mean -> reward/mean, time_generate_s -> time/generate_s: TensorBoard groups by prefix."""
    return key.replace("_", "/", 1)


class TensorBoardSink:
    """Event files under RUN/tensorboard: `tensorboard --logdir runs` shows every run."""

    def __init__(self, log_dir: Path, first_step: int = 1):
        from torch.utils.tensorboard import SummaryWriter
        # a resumed run: TensorBoard hides what earlier files hold from first_step on (redone steps)
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=first_step if first_step > 1 else None)

    def write(self, metrics: dict) -> None:
        step = int(metrics["step"])
        for key, value in numbers(metrics):
            self.writer.add_scalar(tensorboard_tag(key), value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def prometheus_name(key: str) -> str:
    """groupflow_<metric> as a valid Prometheus name: eval_pass@1 -> groupflow_eval_pass_at_1."""
    return "groupflow_" + re.sub(r"[^a-zA-Z0-9_]", "_", key.replace("@", "_at_"))


class PrometheusSink:
    """Each per-step metric as a gauge on Ray's metrics endpoint (Ray's exporter prefixes `ray_`;
    deploy/prometheus/prometheus.yml strips it), tagged with the run (the Ray job), role and rank."""

    def __init__(self, run_dir: Path):
        import ray
        self.tags = {"run": ray.get_runtime_context().get_job_id(), "role": "driver", "rank": "0"}
        self.gauges: dict = {}
        from ray.util.metrics import Gauge
        info = Gauge("groupflow_run_info", "1 per run: its run directory", ("run", "role", "rank", "run_dir"))
        info.set(1, tags={**self.tags, "run_dir": str(run_dir)})
        self._info = info

    def write(self, metrics: dict) -> None:
        from ray.util.metrics import Gauge
        for key, value in numbers(metrics, skip=()):  # the step is a gauge too
            if key not in self.gauges:
                self.gauges[key] = Gauge(prometheus_name(key), f"groupflow per-step metric {key}",
                                         ("run", "role", "rank"))
                self.gauges[key].set_default_tags(self.tags)
            self.gauges[key].set(float(value))

    def close(self) -> None:
        import time
        time.sleep(2.0)  # one export of the last values (a local Ray exports every second)


class WandbSink:
    """Weights & Biases, online or offline (files under RUN/wandb, no network: `wandb sync` later).
    Each start of the run (a resume, a restart) is a W&B run of its own, grouped by the run dir."""

    def __init__(self, run_dir: Path, cfg, config: dict, first_step: int = 1):
        try:
            import wandb
        except ImportError:
            raise RuntimeError("logging.wandb.project is set but wandb is not installed: pip install wandb") from None
        name = run_dir.resolve().name + (f"-from-step-{first_step}" if first_step > 1 else "")
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, mode=cfg.mode, dir=str(run_dir),
                              group=run_dir.resolve().name, name=name, config=config)

    def write(self, metrics: dict) -> None:
        self.run.log({tensorboard_tag(k): v for k, v in numbers(metrics)}, step=int(metrics["step"]))

    def close(self) -> None:
        self.run.finish()
