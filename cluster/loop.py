"""The whole training loop: prompts -> generate -> score -> advantages -> learn -> sync -> log -> save."""
from __future__ import annotations

import time
from pathlib import Path

from learner.group import MemberDied
from rewards.tasks import make_task

from . import checkpoint, phases
from .config import Config, ConfigError, dump_config
from .evaluate import eval_metrics
from .ledger import Ledger
from .metrics import RunLog
from .pipeline import Rollouts
from .placement import create_roles, start_ray
from .precision import resolve_precision
from .preemption import Preempted, Preemption
from .prepare import starting_point


def train(cfg: Config, run_dir: Path, progress: bool = True) -> dict:
    """The run; when learner state is lost (a learner rank dies), it stops, says who, and starts again
    from its newest checkpoint (before the first one: from where it began), up to
    trainer.max_restarts times. A dead engine is replaced in place (actors/group.py, weight_sync.py)."""
    checkpoint.ensure_writable(run_dir)  # before any actor starts
    for restarts in range(cfg.trainer.max_restarts + 1):
        try:
            return _run(cfg, run_dir, progress, restarts)
        except MemberDied as e:
            if restarts == cfg.trainer.max_restarts:
                raise RuntimeError(f"{e}; trainer.max_restarts={restarts} restarts are used up") from None
            # a fresh run or `--resume PATH` that saved nothing yet starts again from the same point
            resume = "auto" if checkpoint.latest(run_dir) is not None else cfg.trainer.resume_from or "auto"
            print(f"groupflow: {e}: restarting from {resume if resume != 'auto' else 'the newest checkpoint'} "
                  f"({restarts + 1} of at most {cfg.trainer.max_restarts})", flush=True)
            cfg = cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"resume_from": resume})})


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
    ledger = Ledger(cfg, begin.first_step - 1, begin.state.get("counts"))
    if begin.resumed is not None:  # the parts of what we resumed must tell one history
        try:
            ledger.check_loaded(begin.resumed, roles.loaded, task.state())
        except checkpoint.CheckpointError:
            roles.shutdown()
            raise
    log = RunLog(run_dir, cfg.trainer.steps - begin.first_step + 1, progress, sinks=cfg.logging,
                 first_step=begin.first_step, config=cfg.model_dump(mode="json"))
    R = cfg.learner.num_ranks
    started = time.monotonic()
    summary: dict = {"run_dir": str(run_dir), "data_skipped": task.skipped,
                     "eval_accuracy_start": begin.state.get("eval_accuracy_start")}
    done, data = begin.first_step - 1, task.state()  # the last step the learner holds, the data cursor after it
    saved = recorded = done if begin.resumed else 0  # the last step checkpointed, and logged
    m, batch, in_learner = {}, None, False

    def save(step: int) -> Path:  # a checkpoint: every state a resume needs, then the oldest pruned
        nonlocal saved
        path = checkpoint.write(roles.learner, checkpoint.step_dir(run_dir, step), lambda counters: {
            "step": step, "data": data, "reference_model": str(begin.reference), "policy_version": step,
            "eval_accuracy_start": summary["eval_accuracy_start"],
            "counts": ledger.agree(step, counters, data)})  # refused unless the learner holds exactly `step`
        checkpoint.prune(run_dir, cfg.trainer.keep_checkpoints)
        saved = step
        return path

    def record(step: int) -> None:  # the step's metrics and rollouts, once
        nonlocal recorded
        log.step(m)
        if cfg.trainer.save_rollouts:
            log.rollouts(step, phases.with_token_counts(batch))
        recorded = step

    def evaluate() -> dict:  # pass@1 (greedy) or pass@k of the current policy on the held-out prompts
        rollouts.drain()
        return eval_metrics(roles.generator, roles.rewards, task.eval_prompts(), cfg.trainer.eval_samples)

    rollouts = Rollouts(roles, task, cfg, begin.first_step)  # which batch generates when (pipeline.py)
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
                in_learner = True
                prep, kl_sums = stop.droppable(lambda: roles.learner.prepare(
                    phases.shards(taken.batch, R, cfg.trainer.seed + step, batch_id=step)))
                batch = phases.with_advantages(taken.batch, cfg.algorithm, kl_sums, cfg.engines.max_new_tokens)
                stats = roles.learner.train(phases.train_shards(batch, R, cfg.trainer.seed + step, cfg.algorithm,
                                                                batch_id=step))
                # the learner holds this step from here on: whatever fails next, its checkpoint is this step's
                in_learner, done, data = False, step, taken.cursor
                m = {"step": step, **waited, **taken.stats, **prep, **stats,
                     "time_train_s": time.monotonic() - start - waited["time_learner_waited_s"]}
                rollouts.feed()  # sync: the new weights, then the next batch
                m.update(**rollouts.pushes(), engine_restarts=roles.engines.restarts, restarts=restarts,
                         time_step_s=time.monotonic() - start)
                m["generated_tokens_per_s"] = m["generated_tokens"] / max(m["time_generate_s"], 1e-9)
                m["learner_idle_fraction"] = m["time_learner_waited_s"] / max(m["time_step_s"], 1e-9)
                if cfg.trainer.eval_every and step % cfg.trainer.eval_every == 0 and not stop.requested:
                    m.update(evaluate())
                record(step)
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
    except Exception as e:
        # Keep the last step the learner holds, whatever failed, unless the learner's state is what is
        # in doubt: a rank died, or its call failed (a preemption only drops a step not yet begun).
        lost = isinstance(e, MemberDied) and e.member.startswith("learner")
        if saved < done and not lost and (not in_learner or isinstance(e, Preempted)) \
                and not isinstance(e, checkpoint.CheckpointError):
            if recorded < done:  # what the step measured before the failure
                record(done)
            log.print(f"groupflow: {e}; writing the checkpoint of step {done} before stopping")
            try:
                save(done)
            except checkpoint.CheckpointError as ce:
                log.print(f"groupflow: {ce}")
        raise
    finally:
        log.close()
        roles.shutdown()
        rollouts.close()  # a collect in flight ends once its engines are gone
