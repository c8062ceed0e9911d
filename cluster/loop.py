"""The whole training loop: prompts -> generate -> score -> advantages -> learn -> sync -> log -> save."""
from __future__ import annotations

import time
from pathlib import Path

from actors.group import EngineFailure
from learner.group import MemberDied
from rewards.tasks import make_task

from . import checkpoint, phases
from .config import Config, ConfigError, dump_config
from .evaluate import eval_metrics
from .metrics import RunLog
from .pipeline import Rollouts
from .placement import create_roles, start_ray
from .precision import resolve_precision
from .preemption import Preempted, Preemption
from .prepare import starting_point


def train(cfg: Config, run_dir: Path, progress: bool = True) -> dict:
    """The run; when an actor of a collective call dies (a learner rank, an engine during a weight push),
    it stops, says who, and starts again from its newest checkpoint, up to trainer.max_restarts times."""
    checkpoint.ensure_writable(run_dir)  # before any actor starts
    for restarts in range(cfg.trainer.max_restarts + 1):
        try:
            return _run(cfg, run_dir, progress, restarts)
        except MemberDied as e:
            if restarts == cfg.trainer.max_restarts:
                raise RuntimeError(f"{e}; trainer.max_restarts={restarts} restarts are used up") from None
            print(f"groupflow: {e}: restarting from the newest checkpoint ({restarts + 1} of at most "
                  f"{cfg.trainer.max_restarts})", flush=True)
            cfg = cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"resume_from": "auto"})})


def _run(cfg: Config, run_dir: Path, progress: bool, restarts: int) -> dict:
    begin = starting_point(cfg, run_dir)
    if begin.first_step > cfg.trainer.steps:  # `--resume auto` of a run that had finished
        print(f"groupflow: {run_dir} already finished its {cfg.trainer.steps} steps; nothing to do")
        return {"run_dir": str(run_dir), "already_finished": True, "checkpoint": str(begin.resumed)}
    task = make_task(cfg.rewards.task, cfg.trainer.seed, tokenizer_path=begin.policy)
    if begin.data_state is not None:
        try:
            task.load_state(begin.data_state)
        except ValueError as e:  # a cursor taken on other data or with another seed
            raise ConfigError(f"trainer.resume_from: {e}") from None
    start_ray(cfg.run, cfg.cpus_needed)
    cfg = resolve_precision(cfg)  # `auto` dtypes become what the hardware computes natively
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    roles = create_roles(cfg, str(begin.policy), str(begin.reference), begin.resumed, begin.first_step - 1)
    log = RunLog(run_dir, cfg.trainer.steps - begin.first_step + 1, progress, sinks=cfg.logging,
                 first_step=begin.first_step, config=cfg.model_dump(mode="json"))
    R = cfg.learner.num_ranks
    started = time.monotonic()
    summary: dict = {"run_dir": str(run_dir), "data_skipped": task.skipped,
                     "eval_accuracy_start": begin.state.get("eval_accuracy_start")}
    done, data = begin.first_step - 1, task.state()  # the last finished step, the data cursor after it
    saved = done if begin.resumed else 0

    def save(step: int) -> Path:  # a checkpoint: every state a resume needs, then the oldest pruned
        nonlocal saved
        path = checkpoint.write(roles.learner, checkpoint.step_dir(run_dir, step), {
            "step": step, "data": data, "reference_model": str(begin.reference), "policy_version": step,
            "eval_accuracy_start": summary["eval_accuracy_start"]})
        checkpoint.prune(run_dir, cfg.trainer.keep_checkpoints)
        saved = step
        return path

    def evaluate() -> dict:  # pass@1 (greedy) or pass@k of the current policy on the held-out prompts
        rollouts.drain()
        return eval_metrics(roles.generator, roles.rewards, task.eval_prompts(), cfg.trainer.eval_samples)

    rollouts = Rollouts(roles, task, cfg, begin.first_step)  # which batch generates when (pipeline.py)
    m: dict = {}
    try:
        with Preemption(cfg.trainer.preempt_grace_s) as stop:
            if cfg.trainer.eval and summary["eval_accuracy_start"] is None:
                summary["eval_accuracy_start"] = evaluate()["eval_pass@1"]
                log.print(f"held-out accuracy at start: {summary['eval_accuracy_start']:.3f}")
            for step in range(begin.first_step, cfg.trainer.steps + 1):
                start = time.monotonic()
                # the batch generated and scored, then pi_old/pi_ref: dropped whole on a preemption
                taken, waited = rollouts.take(stop)
                rollouts.feed()  # async: the next batch generates while this one trains
                prep, kl_sums = stop.droppable(lambda: roles.learner.prepare(
                    phases.shards(taken.batch, R, cfg.trainer.seed + step, batch_id=step)))
                batch = phases.with_advantages(taken.batch, cfg.algorithm, kl_sums, cfg.engines.max_new_tokens)
                stats = roles.learner.train(phases.train_shards(batch, R, cfg.trainer.seed + step, cfg.algorithm,
                                                                batch_id=step))
                trained = time.monotonic()
                rollouts.feed()  # sync: the new weights, then the next batch
                m = {"step": step, **waited, **taken.stats, **prep, **stats, **rollouts.pushes(),
                     "engine_restarts": roles.engines.restarts, "restarts": restarts,
                     "time_train_s": trained - start - waited["time_learner_waited_s"],
                     "time_step_s": time.monotonic() - start}
                m["generated_tokens_per_s"] = m["generated_tokens"] / max(m["time_generate_s"], 1e-9)
                m["learner_idle_fraction"] = m["time_learner_waited_s"] / max(m["time_step_s"], 1e-9)
                if cfg.trainer.eval_every and step % cfg.trainer.eval_every == 0 and not stop.requested:
                    m.update(evaluate())
                log.step(m)
                if cfg.trainer.save_rollouts:
                    log.rollouts(step, phases.with_token_counts(batch))
                done, data = step, taken.cursor
                if stop.requested:
                    raise Preempted(stop.signum)
                if cfg.trainer.checkpoint_every and step % cfg.trainer.checkpoint_every == 0:
                    save(step)
            if cfg.trainer.eval:
                summary["eval_accuracy_end"] = (m if "eval_pass@1" in m else evaluate())["eval_pass@1"]
                log.print(f"held-out accuracy at end: {summary['eval_accuracy_end']:.3f} "
                          f"(start {summary['eval_accuracy_start']:.3f})")
            summary["checkpoint"] = str(checkpoint.mark_final(run_dir, save(done) if saved < done else
                                                              checkpoint.step_dir(run_dir, done)))
        summary["wall_time_s"] = time.monotonic() - started
        log.write_json("summary.json", summary)
        return summary
    except (Preempted, EngineFailure, MemberDied) as e:
        # the learner holds the last finished step: keep it, unless a learner rank is what died
        if saved < done and not (isinstance(e, MemberDied) and e.member.startswith("learner")):
            log.print(f"groupflow: {e}; writing the checkpoint of step {done} before stopping")
            save(done)
        raise
    finally:
        log.close()
        roles.shutdown()
        rollouts.close()  # a collect in flight ends once its engines are gone
