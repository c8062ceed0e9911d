"""Evaluation: pass@1 and pass@k of what the engines hold, on a task's prompts, scored by the reward pool.

`eval_metrics` runs on engines and a pool that already exist (the training loop calls it every
trainer.eval_every steps); `evaluate_checkpoint` is `groupflow eval`: it starts Ray, engines on a
checkpoint and a reward pool, evaluates one split and stops everything it started.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.util.placement_group import remove_placement_group

from rewards.tasks import make_task

from . import phases
from .config import Config
from .generator import Generator
from .placement import create_engines, create_reward_pool, start_ray
from .precision import resolve_precision

# A sample counts as solved when its reward reaches 1: the task scorers give exactly 1 for a correct
# answer, and a summed reward (correctness plus shaping terms) reaches 1 only with the answer right.
SOLVED_AT = 1.0 - 1e-6
SPLITS = ("eval", "train")
CORRECTNESS = ("math", "last_number", "code")  # reward components that judge the answer itself


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021): 1 - C(n-c,k)/C(n,k),
    as a product so large n does not overflow."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def solved_counts(generator, pool, rows: list[dict], samples: int, greedy: bool) -> tuple[list[int], pa.Table, dict]:
    """Generate `samples` completions (or conversations) per row and score them: (solved count per
    row, the scored rollouts, reward failure counts)."""
    scored, failures = phases.score(pool, generator.generate(rows, samples, greedy=greedy), rows)
    return count_solved(scored, len(rows)), scored, failures


def count_solved(scored: pa.Table, groups: int) -> list[int]:
    """Solved samples per group. Correctness, not the summed reward: with a format term a well-formatted
    wrong answer must not count. One correctness component -> its own column; otherwise the total."""
    judged = [f"reward_{k}" for k in CORRECTNESS if f"reward_{k}" in scored.column_names]
    column = judged[0] if len(judged) == 1 else "reward"
    counts = [0] * groups
    for g, r in zip(scored.column("group_id").to_pylist(), scored.column(column).to_pylist()):
        counts[g] += r >= SOLVED_AT
    return counts


def eval_metrics(generator, pool, rows: list[dict], samples: int, greedy_when_one: bool = True) -> dict:
    """{"eval_pass@1", "eval_pass@K", "eval_prompts", "eval_samples", "eval_reward_mean",
    "eval_reward_failures", "eval_time_s"} over `rows`, K = samples.

    samples == 1 decodes greedily (unless greedy_when_one=False); K > 1 samples at
    engines.temperature, so pass@1 is then the mean success rate of sampled completions.
    """
    if not rows or samples < 1:
        raise ValueError(f"evaluation needs prompts and samples >= 1 (got {len(rows)} prompts, samples={samples})")
    start = time.monotonic()
    counts, scored, failures = solved_counts(generator, pool, rows, samples, greedy=greedy_when_one and samples == 1)
    out = {"eval_pass@1": sum(c / samples for c in counts) / len(rows)}
    out[f"eval_pass@{samples}"] = sum(pass_at_k(samples, c, samples) for c in counts) / len(rows)
    out.update({"eval_prompts": len(rows), "eval_samples": samples,
                "eval_reward_mean": float(pc.mean(scored.column("reward")).as_py()),
                "eval_reward_failures": phases.failed_samples(failures),
                "eval_time_s": time.monotonic() - start})
    return out


@contextmanager
def serving(cfg: Config, model_path: str) -> Iterator[tuple[Generator, object]]:
    """Engines on `model_path` (behind a Generator: one turn, or conversations) and the configured reward pool; on exit every actor, placement group
    and (if this started it) Ray itself is stopped, also after an error or Ctrl-C."""
    owns_ray = not ray.is_initialized()
    start_ray(cfg.run, cfg.engines.num_engines * cfg.engines.cpus_per_engine
              + cfg.rewards.num_workers * cfg.rewards.cpus_per_worker)
    cfg = resolve_precision(cfg)
    engines, pool, pgs = [], None, []
    try:
        pool, pg = create_reward_pool(cfg)  # seconds; a broken reward fails before engines load
        pgs.append(pg)
        engines, pg = create_engines(cfg, model_path)
        pgs.append(pg)
        yield Generator(engines, pool, cfg.rollout, cfg.engines.max_model_len, cfg.run.timeout_s), pool
    finally:
        for a in engines:
            ray.kill(a)
        if pool is not None:
            pool.shutdown()
        for pg in pgs:
            remove_placement_group(pg)
        if owns_ray:
            ray.shutdown()


def split_rows(cfg: Config, model_path: str, split: str) -> list[dict]:
    """"eval": the task's held-out prompts; "train": the first rewards.task.eval_size training rows."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    task = make_task(cfg.rewards.task, cfg.trainer.seed, tokenizer_path=model_path)
    return task.eval_prompts() if split == "eval" else task.train_prompts(cfg.rewards.task.eval_size)


def evaluate_checkpoint(cfg: Config, checkpoint: str, split: str = "eval", samples: int = 1) -> dict:
    """`groupflow eval`: pass@1 and pass@samples of a HF checkpoint on one split of the configured task."""
    started = time.monotonic()
    checkpoint = str(Path(checkpoint).resolve())
    rows = split_rows(cfg, checkpoint, split)
    with serving(cfg, checkpoint) as (generator, pool):
        ready = time.monotonic()
        m = eval_metrics(generator, pool, rows, samples)
    report = {"checkpoint": checkpoint, "task": cfg.rewards.task.name, "split": split, "prompts": m["eval_prompts"],
              "samples": samples, "decoding": "greedy" if samples == 1 else f"temperature {cfg.engines.temperature}"}
    report.update({k.removeprefix("eval_"): v for k, v in m.items()
                   if k.startswith("eval_pass@") or k in ("eval_reward_mean", "eval_reward_failures")})
    report.update({"max_new_tokens": cfg.engines.max_new_tokens, "time_startup_s": round(ready - started, 1),
                   "time_eval_s": round(m["eval_time_s"], 1), "wall_time_s": round(time.monotonic() - started, 1)})
    return report
