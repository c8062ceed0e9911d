"""The whole training loop: prompts -> generate -> score -> advantages -> learn -> sync -> log -> save."""
from __future__ import annotations

import time
from pathlib import Path

from rewards.tasks import make_task

from . import phases
from .config import Config, dump_config
from .metrics import RunLog
from .placement import create_roles, start_ray
from .prepare import prepare_model


def train(cfg: Config, run_dir: Path, progress: bool = True) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    model_path = prepare_model(cfg.model, run_dir, cfg.trainer.seed)
    task = make_task(cfg.rewards.task, cfg.trainer.seed)
    start_ray(cfg)
    roles = create_roles(cfg, str(model_path))
    log = RunLog(run_dir, cfg.trainer.steps, progress)
    T, G, started = cfg.run.timeout_s, cfg.trainer.group_size, time.monotonic()
    summary: dict = {"run_dir": str(run_dir)}
    try:
        if cfg.trainer.eval:
            summary["eval_accuracy_start"] = phases.evaluate(roles.engines, roles.rewards, task.eval_prompts(), T)
            log.print(f"held-out accuracy at start: {summary['eval_accuracy_start']:.3f}")
        for step in range(1, cfg.trainer.steps + 1):
            t = {"start": time.monotonic()}
            rows = task.next_prompts(cfg.trainer.prompts_per_step)
            rollouts = phases.generate(roles.engines, rows, G, T)
            t["generate"] = time.monotonic()
            batch, failures = phases.score(roles.rewards, rollouts, rows)
            t["reward"] = time.monotonic()
            batch = phases.with_advantages(batch, cfg.algorithm)
            stats = roles.learner.train(phases.shards(batch, cfg.learner.num_ranks, cfg.trainer.seed + step))
            t["train"] = time.monotonic()
            sync = roles.sync.push(step) if cfg.sync.enabled else {"time_sync_s": 0.0, "sync_bytes": 0}
            t["sync"] = time.monotonic()
            m = {"step": step, **phases.rollout_stats(batch), **stats, **sync, "reward_failures": failures,
                 "time_generate_s": t["generate"] - t["start"], "time_reward_s": t["reward"] - t["generate"],
                 "time_train_s": t["train"] - t["reward"], "time_step_s": t["sync"] - t["start"]}
            m["generated_tokens_per_s"] = m["generated_tokens"] / max(m["time_generate_s"], 1e-9)
            log.step(m)
            if cfg.trainer.save_rollouts:
                log.rollouts(step, phases.with_token_counts(batch))
            if cfg.trainer.checkpoint_every and step % cfg.trainer.checkpoint_every == 0 and step < cfg.trainer.steps:
                roles.learner.save(str(run_dir / "checkpoints" / f"step_{step:06d}"))
        if cfg.trainer.eval:
            summary["eval_accuracy_end"] = phases.evaluate(roles.engines, roles.rewards, task.eval_prompts(), T)
            log.print(f"held-out accuracy at end: {summary['eval_accuracy_end']:.3f} "
                      f"(start {summary['eval_accuracy_start']:.3f})")
        summary["checkpoint"] = roles.learner.save(str(run_dir / "checkpoints" / "final"))
        summary["wall_time_s"] = time.monotonic() - started
        log.write_json("summary.json", summary)
        return summary
    finally:
        log.close()
        roles.shutdown()
