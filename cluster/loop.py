"""The whole training loop: prompts -> generate -> score -> advantages -> learn -> sync -> log -> save."""
from __future__ import annotations

import time
from pathlib import Path

from rewards.tasks import make_task

from . import phases
from .config import Config, ConfigError, dump_config
from .evaluate import eval_metrics
from .metrics import RunLog
from .placement import create_roles, start_ray
from .precision import resolve_precision
from .prepare import starting_point


def train(cfg: Config, run_dir: Path, progress: bool = True) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    begin = starting_point(cfg, run_dir)
    task = make_task(cfg.rewards.task, cfg.trainer.seed, tokenizer_path=begin.policy)
    if begin.data_state is not None:
        try:
            task.load_state(begin.data_state)
        except ValueError as e:  # a cursor taken on other data or with another seed
            raise ConfigError(f"trainer.resume_from: {e}") from None
    start_ray(cfg.run, cfg.cpus_needed)
    cfg = resolve_precision(cfg)  # `auto` dtypes become what the hardware computes natively
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    roles = create_roles(cfg, str(begin.policy), str(begin.reference))
    log = RunLog(run_dir, cfg.trainer.steps - begin.first_step + 1, progress)
    T, P, G, R = cfg.run.timeout_s, cfg.trainer.prompts_per_step, cfg.trainer.group_size, cfg.learner.num_ranks
    started = time.monotonic()
    summary: dict = {"run_dir": str(run_dir), "data_skipped": task.skipped}

    def state(step: int) -> dict:  # trainer_state.json of a checkpoint: what a resume needs
        return {"step": step, "data": task.state(), "reference_model": str(begin.reference)}

    def evaluate() -> dict:  # pass@1 (greedy) or pass@k on the held-out prompts: eval_* metrics
        return eval_metrics(roles.engines, roles.rewards, task.eval_prompts(), cfg.trainer.eval_samples, T)

    m: dict = {}
    try:
        if cfg.trainer.eval:
            summary["eval_accuracy_start"] = evaluate()["eval_pass@1"]
            log.print(f"held-out accuracy at start: {summary['eval_accuracy_start']:.3f}")
        for step in range(begin.first_step, cfg.trainer.steps + 1):
            start = time.monotonic()
            batch, collected = phases.collect(roles.engines, roles.rewards, task, P, G, cfg.algorithm, T)
            prep, kl_sums = roles.learner.prepare(phases.shards(batch, R, cfg.trainer.seed + step))
            batch = phases.with_advantages(batch, cfg.algorithm, kl_sums, cfg.engines.max_new_tokens)
            stats = roles.learner.train(phases.train_shards(batch, R, cfg.trainer.seed + step, cfg.algorithm))
            trained = time.monotonic()
            sync = roles.sync.push(step) if cfg.sync.enabled else {"time_sync_s": 0.0, "sync_bytes": 0}
            m = {"step": step, **phases.rollout_stats(batch), **collected, **prep, **stats, **sync,
                 "time_train_s": trained - start - collected["time_generate_s"] - collected["time_reward_s"],
                 "time_step_s": time.monotonic() - start}
            m["generated_tokens_per_s"] = m["generated_tokens"] / max(m["time_generate_s"], 1e-9)
            if cfg.trainer.eval_every and step % cfg.trainer.eval_every == 0:
                m.update(evaluate())
            log.step(m)
            if cfg.trainer.save_rollouts:
                log.rollouts(step, phases.with_token_counts(batch))
            if cfg.trainer.checkpoint_every and step % cfg.trainer.checkpoint_every == 0 and step < cfg.trainer.steps:
                roles.learner.save(str(run_dir / "checkpoints" / f"step_{step:06d}"), state(step))
        if cfg.trainer.eval:
            summary["eval_accuracy_end"] = (m if "eval_pass@1" in m else evaluate())["eval_pass@1"]
            log.print(f"held-out accuracy at end: {summary['eval_accuracy_end']:.3f} "
                      f"(start {summary['eval_accuracy_start']:.3f})")
        summary["checkpoint"] = roles.learner.save(str(run_dir / "checkpoints" / "final"),
                                                   state(cfg.trainer.steps))
        summary["wall_time_s"] = time.monotonic() - started
        log.write_json("summary.json", summary)
        return summary
    finally:
        log.close()
        roles.shutdown()
